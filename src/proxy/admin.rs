//! The proxy's own endpoints, answered on the core without a backend: `/health`, `/metrics`,
//! `/v1/models` and `POST /admin/reload` (which asks the control plane and polls for its answer,
//! so the core never blocks on it).

use std::time::Duration;

use crate::control::PlaneMsg;
use crate::error::error_body;
use crate::worker::Worker;

/// How long the admin endpoint waits for the control plane (it may be resolving names).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// `POST /admin/reload`: asks the control plane to reload and waits for its answer without
/// blocking the core (the reply channel is polled).
pub async fn reload(w: &Worker) -> (u16, &'static str, Vec<u8>) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if w.shared
        .plane
        .try_send(PlaneMsg::Reload { reply: tx })
        .is_err()
    {
        return failure(503, "the control plane is busy; try again");
    }
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        match rx.try_recv() {
            Ok(Ok(summary)) => {
                let body = serde_json::json!({"status": "reloaded", "reload": summary});
                return (200, "application/json", body.to_string().into_bytes());
            }
            Ok(Err(why)) => return failure(400, &why),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return failure(500, "the control plane did not answer")
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if std::time::Instant::now() >= deadline {
            return failure(504, "reload did not finish in time");
        }
        monoio::time::sleep(POLL).await;
    }
}

fn failure(status: u16, why: &str) -> (u16, &'static str, Vec<u8>) {
    let body = error_body(
        &format!("reload rejected: {why}"),
        "invalid_request_error",
        "reload_failed",
    );
    (status, "application/json", body)
}
