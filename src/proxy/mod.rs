//! One request, on its core, in order. Each step is a module, and `handle` reads as the list:
//!
//! 1. `conn`: the client connection; the head and body read under their limits; authentication.
//!    (`downstream` is the connection as later steps see it, `answer` every answer the proxy
//!    writes itself.)
//! 2. `admin`: the proxy's own endpoints, answered locally.
//! 3. `request`: what the body says (model, stream, identity), the route and fallback pools with
//!    the body each needs, the upstream request.
//! 4. `pick`: the backend, as a `Lease` that gives back everything it took when dropped.
//! 5. `forward`: send upstream; retries before the client saw a byte; fallback pools.
//! 6. `relay`: the response back as it arrives, through the usage tap; the client watched.
//! 7. `account`: metrics, the access line and the usage event, once, for every request.
//!
//! Everything here runs on one core and never blocks: what other threads need to know leaves as
//! a message (`worker`, `usage`), and what they decide arrives in the worker's inbox.

pub(crate) mod account;
pub(crate) mod admin;
pub(crate) mod affinity;
pub(crate) mod answer;
pub(crate) mod conn;
pub(crate) mod downstream;
pub(crate) mod forward;
pub(crate) mod pick;
pub(crate) mod relay;
pub(crate) mod request;

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use crate::alarm::Elapsed;
use crate::auth::Caller;
use crate::clock;
use crate::error::{Outcome, ProxyError};
use crate::http1::head::Head;
use crate::proxy::account::{account, Done};
use crate::proxy::answer::{error_response, fail, respond, Answer};
use crate::proxy::downstream::Downstream;
use crate::proxy::forward::forward_with_fallbacks;
use crate::proxy::relay::{watch_client, Sent};
use crate::proxy::request::{Exchange, Plan, Request};
use crate::worker::Worker;

/// Handles one complete request; returns whether the connection may serve another.
pub(crate) async fn handle(
    w: &Rc<Worker>,
    d: &mut Downstream,
    head: Head,
    body: Bytes,
    received: Instant,
    caller: Caller,
) -> bool {
    let req = Request::new(w, &head, received, &caller);
    // Debug builds only: lets the test suite prove a panic stays inside its connection.
    #[cfg(debug_assertions)]
    if head.header("x-llmproxy-debug-panic").is_some() {
        panic!("panic requested by x-llmproxy-debug-panic");
    }
    // A reload answered just before this request must already apply to how its body is read
    // (e.g. whether an affinity key is computed), not only to the pick.
    w.drain_inbox();
    if let Some(local) = request::local_route(w, d.admin, &head) {
        return admin::serve(w, d, &req, local).await;
    }
    if d.admin {
        let e = ProxyError::NotFound(head.path().to_string());
        return fail(w, d, &req, e, None).await;
    }
    let info = match request::inspect(&w.config(), &head, &body) {
        Ok(info) => info,
        Err(e) => return fail(w, d, &req, e, None).await,
    };
    let admitted = caller
        .check_model(head.method(), info.model.as_deref())
        .and_then(|()| caller.flow(&head))
        .and_then(|flow| caller.admit(received).map(|()| flow));
    let flow = match admitted {
        Ok(flow) => flow,
        Err(e) => return fail(w, d, &req, e, Some(&info)).await,
    };
    let table = w.table();
    let plan = match Plan::new(w, &head, &body, &info, &table, flow) {
        Ok(plan) => plan,
        Err(e) => return fail(w, d, &req, e, Some(&info)).await,
    };
    let x = Exchange::new(w, &req, d.peer_ip.clone(), &info, &body, &plan);
    let Downstream {
        rd, wr, buf, alarm, ..
    } = d;
    let forward = Box::pin(forward_with_fallbacks(w, &x, &plan, &body, wr, alarm));
    let started = Instant::now();
    let deadline = clock::after(started, w.config().timeouts.request);
    let result = watch_client(rd, buf, started, deadline, &x.last_write, forward).await;
    let (status, outcome, keep) = match result {
        None => (x.status.get(), Outcome::ClientAborted, false),
        Some(Ok(Ok(Sent {
            status,
            outcome,
            close,
        }))) => (status, outcome, !close),
        Some(Ok(Err(e))) => {
            let keep = error_response(w, d, &req, &e, log::Level::Warn).await;
            (e.status(), e.outcome(), keep)
        }
        Some(Err(Elapsed)) if !x.head_sent.get() => {
            let e = ProxyError::RequestTimeout;
            respond(d, &req, Answer::error(&e), true).await;
            (e.status(), Outcome::Timeout, false)
        }
        Some(Err(Elapsed)) => (x.status.get(), Outcome::Timeout, false),
    };
    let done = Done {
        req: &req,
        info: Some(&info),
        status,
        backend: x.backend.get(),
        outcome,
        first_byte: x.first_byte.get(),
        usage: x.tap.borrow().usage(),
        probe: false,
        served_model: x.served_model.get(),
    };
    account(w, d, done);
    w.taps.give(x.tap.into_inner());
    keep
}
