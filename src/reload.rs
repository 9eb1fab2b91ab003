//! Hot reload: what a re-read configuration may change, and the admin endpoint that asks for it.
//!
//! The reload itself runs on the control-plane thread (`plane`): re-read and validate the file;
//! an invalid one is refused and the running config stays; a valid one has its restart-only
//! settings put back to the running values (with a warning each), then the backend set is diffed
//! and the new table and config reach every core as one message. Nothing is locked and nothing
//! in flight is touched: requests finish on the config and backend they started with.

use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::control::PlaneMsg;
use crate::error::error_body;
use crate::worker::Worker;

/// How long the admin endpoint waits for the control plane (it may be resolving names).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// The outcome of a successful reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The backend table version now in force.
    pub version: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub updated: Vec<String>,
    /// Settings that changed in the file but need a restart (their running value is kept).
    pub warnings: Vec<String>,
}

/// Puts the settings that cannot change without a restart back to their running values;
/// returns one warning per setting that the new file changed.
pub fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
    let mut warnings = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:expr) => {
            if new.$($field).+ != old.$($field).+ {
                warnings.push(format!(
                    "{} changed; it needs a restart to take effect (keeping the running value)",
                    $name
                ));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(listen, "listen");
    keep!(admin_listen, "admin_listen");
    keep!(workers, "workers");
    keep!(cpus, "cpus");
    keep!(shutdown_grace, "shutdown_grace");
    keep!(io_driver, "io_driver");
    keep!(pool, "pool");
    keep!(usage_hook, "usage_hook");
    keep!(usage.log, "usage.log");
    keep!(logging.level, "logging.level");
    keep!(logging.format, "logging.format");
    // Keys listed in the config are read once; `auth.keys_file` is the way to change keys live.
    keep!(auth, "auth");
    warnings
}

/// `POST /admin/reload`: asks the control plane to reload and waits for its answer without
/// blocking the core (the reply channel is polled).
pub async fn admin(w: &Worker) -> (u16, &'static str, Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let old = Config::from_yaml_str(
            "listen: \"127.0.0.1:1\"\nworkers: 2\nbackends: [{ url: \"http://a:1\" }]\n",
        )
        .unwrap();
        let mut new = Config::from_yaml_str(
            "listen: \"127.0.0.1:2\"\nworkers: 2\nbackends: [{ url: \"http://b:1\", weight: 3 }]\nretry: { attempts: 5 }\n",
        )
        .unwrap();
        let warnings = keep_restart_only(&old, &mut new);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("listen changed"));
        assert_eq!(new.listen, old.listen);
        assert_eq!(new.backends[0].weight, 3);
        assert_eq!(new.retry.attempts, 5);
    }
}
