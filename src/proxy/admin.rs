//! The proxy's own endpoints, answered on the core without a backend: `/health`, `/ready`, `/metrics`,
//! `/v1/models` and `POST /admin/reload` (which asks the control plane and polls for its answer,
//! so the core never blocks on it).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::backends::route::Local;
use crate::backends::State;
use crate::config::Priority;
use crate::control::{PlaneMsg, ReloadError};
use crate::error::{error_body, ProxyError};
use crate::proxy::account::{account, Done};
use crate::proxy::answer::{respond, Answer};
use crate::proxy::downstream::Downstream;
use crate::proxy::request::Request;
use crate::worker::{PaddedCount, Worker};

/// How long the admin endpoint waits for the control plane (it may be resolving names).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// Answers a local endpoint and accounts for it; returns whether the connection stays open.
pub(crate) async fn serve(w: &Worker, d: &mut Downstream, req: &Request<'_>, local: Local) -> bool {
    let answer = match local {
        Local::Reload if !req.caller.may_administer() => {
            log::warn!(
                "request {} POST /admin/reload: {}",
                req.id,
                ProxyError::NotAdmin
            );
            Answer::error(&ProxyError::NotAdmin)
        }
        Local::Reload => reload(w).await,
        _ => answer(w, local),
    };
    let status = answer.status;
    let keep = respond(d, req, answer, req.close).await;
    let probe = matches!(
        local,
        Local::Health | Local::Ready | Local::Metrics | Local::MetricsElsewhere
    );
    account(
        w,
        d,
        Done {
            probe,
            ..Done::answered(req, None, status)
        },
    );
    keep
}

/// What a local endpoint answers (`Reload` is asynchronous: see `reload`).
fn answer(w: &Worker, local: Local) -> Answer {
    match local {
        Local::Health => health(w),
        Local::Ready => ready(w),
        Local::Metrics => {
            // This core's view is the freshest at hand; other cores flush on their tick.
            w.drain_inbox();
            w.flush_metrics(true);
            w.decisions.flush(&w.shared.metrics.routing);
            let g = &w.shared.metrics;
            let sum = |v: &[PaddedCount]| -> i64 {
                v.iter().map(|c| c.0.load(Ordering::Relaxed) as i64).sum()
            };
            g.connections_active.set(sum(&w.shared.connections));
            g.requests_inflight.set(sum(&w.shared.inflight));
            g.requests_queued.set(w.shared.capacity.queued() as i64);
            let per_class = w.shared.capacity.fair.per_class();
            let per_class = Priority::ALL.map(|p| (p.as_str(), per_class[p.index()]));
            g.queue.set_waiting(&per_class);
            Answer {
                content_type: "text/plain; version=0.0.4",
                ..Answer::json(200, g.encode())
            }
        }
        Local::Models => Answer::json(200, w.table().routes.models_body()),
        Local::Reload => Answer::json(500, Vec::new()),
        Local::AdminElsewhere => Answer::error(&ProxyError::NotFound(
            "/admin/reload (POST, on the admin listener when admin_listen is set)".into(),
        )),
        Local::MetricsElsewhere => Answer::error(&ProxyError::NotFound(
            "/metrics (served on the admin listener)".into(),
        )),
    }
}

/// `/health`: 200 while some active backend is up and the process is not draining; the body
/// lists every backend with its state, health, breaker and in-flight count.
fn health(w: &Worker) -> Answer {
    w.drain_inbox();
    let draining = w.shared.draining();
    let table = w.table();
    let backends: Vec<serde_json::Value> = table
        .entries()
        .map(|(i, e)| {
            serde_json::json!({
                "url": e.spec.url,
                "name": e.spec.name,
                "state": e.state.as_str(),
                "up": w.view.is_up(i),
                "breaker": w.breakers.phase(i).as_str(),
                "inflight": w.view.load(i),
            })
        })
        .collect();
    let any_up = table
        .entries()
        .any(|(i, e)| e.state == State::Active && w.view.is_up(i));
    let (status, state) = match (draining, any_up) {
        (true, _) => (503, "draining"),
        (false, false) => (503, "unavailable"),
        (false, true) => (200, "ok"),
    };
    let body = serde_json::json!({"status": state, "backends": backends});
    Answer::json(status, body.to_string().into_bytes())
}

/// `/ready`: 200 while the process serves and is not draining, whatever the backends' state (a
/// proxy with every backend down still answers every request, with a JSON 503), so a readiness
/// probe on it lets a rollout converge before the backends exist; `/health` is for load
/// balancers, which should route around a proxy with nothing behind it.
fn ready(w: &Worker) -> Answer {
    if w.shared.draining() {
        Answer::json(503, br#"{"status":"draining"}"#.to_vec())
    } else {
        Answer::json(200, br#"{"status":"ready"}"#.to_vec())
    }
}

/// `POST /admin/reload`: asks the control plane to reload and waits for its answer without
/// blocking the core (the reply channel is polled).
async fn reload(w: &Worker) -> Answer {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if w.shared
        .plane
        .try_send(PlaneMsg::Reload { reply: tx })
        .is_err()
    {
        return failure(&ReloadError::Busy);
    }
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        match rx.try_recv() {
            Ok(Ok(summary)) => {
                let body = serde_json::json!({"status": "reloaded", "reload": summary});
                return Answer::json(200, body.to_string().into_bytes());
            }
            Ok(Err(e)) => return failure(&e),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return failure(&ReloadError::NoAnswer)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if std::time::Instant::now() >= deadline {
            return failure(&ReloadError::TooSlow);
        }
        monoio::time::sleep(POLL).await;
    }
}

fn failure(e: &ReloadError) -> Answer {
    let body = error_body(
        &format!("reload rejected: {e}"),
        "invalid_request_error",
        "reload_failed",
    );
    Answer::json(e.status(), body)
}
