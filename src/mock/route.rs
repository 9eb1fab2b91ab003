//! Which answer a request gets: the `x-mock-*` overrides and `/mock/control` failures first,
//! then the endpoint. Deciding only: nothing here waits or writes (that is `answer`), so the
//! decision for a request is made before its first byte is sent.

use http::Method;
use serde_json::{json, Value};

use super::{
    control::{control, stats_json},
    exchange::{Action, Exchange, Kind},
    generation::generation,
    hooks::MAX_HOOK_DELAY,
    metrics::metrics,
    openai::embeddings,
    state::Server,
    wire::Reply,
};

/// The endpoints whose requests are counted in `MockStats` and can be failed or reset.
pub(super) fn is_inference_path(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/generate"
            | "/generate_stream"
    )
}

pub(super) fn route(ex: &Exchange, server: &Server) -> Action {
    let path = ex.path.as_str();
    if ex.hooks.echo || path == "/mock/echo" {
        return Action::Reply(echo(ex, server.port));
    }
    let admin = path.starts_with("/mock/");
    if let Some(status) = ex.hooks.status.filter(|_| !admin) {
        return Action::Reply(Reply::error(
            status,
            &format!("mock status {status} (x-mock-status)"),
        ));
    }
    if is_inference_path(path) {
        if let Some(status) = server.fail_status.get() {
            return Action::Reply(Reply::error(
                status,
                &format!("mock failure {status} (/mock/control)"),
            ));
        }
    }
    let opts = &server.opts;
    match (&ex.method, path) {
        (&Method::POST, "/v1/chat/completions") => generation(ex, server, Kind::Chat),
        (&Method::POST, "/v1/completions") => generation(ex, server, Kind::Text),
        (&Method::POST, "/generate") => generation(ex, server, Kind::Tgi),
        (&Method::POST, "/generate_stream") => generation(ex, server, Kind::TgiStream),
        (&Method::POST, "/v1/embeddings") => Action::Reply(embeddings(ex, opts)),
        (&Method::GET, "/v1/models") => Action::Reply(Reply::json(
            200,
            &json!({"object": "list", "data": [{"id": opts.model, "object": "model", "owned_by": "mock"}]}),
        )),
        (&Method::GET, "/health") => Action::Reply(health(server.health_status.get())),
        (&Method::GET, "/metrics") if server.engine.get().hang => Action::Delayed {
            reply: metrics(server),
            wait: MAX_HOOK_DELAY,
        },
        (&Method::GET, "/metrics") => Action::Reply(metrics(server)),
        (&Method::GET, "/mock/stats") => Action::Reply(Reply::json(200, &stats_json(server))),
        (&Method::POST, "/mock/control") => Action::Reply(control(ex, server)),
        _ => Action::Reply(Reply::error(
            404,
            &format!("no route for {} {}", ex.method, ex.target),
        )),
    }
}

fn echo(ex: &Exchange, port: u16) -> Reply {
    let headers: Vec<Value> = ex
        .headers
        .iter()
        .map(|(name, value)| json!([name, value]))
        .collect();
    Reply::json(
        200,
        &json!({
            "method": ex.method.as_str(),
            "path": ex.target,
            "version": format!("{:?}", ex.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&ex.body),
            "port": port,
        }),
    )
}

fn health(status: Option<u16>) -> Reply {
    let status = status.unwrap_or(200);
    let state = if (200..300).contains(&status) {
        "ok"
    } else {
        "unavailable"
    };
    Reply::json(status, &json!({"status": state}))
}
