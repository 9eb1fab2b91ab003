//! Hot reload: what a re-read configuration may change, and why a reload failed. (The admin
//! endpoint that asks for a reload is `proxy::admin`; the answer travels as `messages::Summary` or
//! a `ReloadError`.)
//!
//! The reload itself runs on the control-plane thread (`plane`): re-read and validate the file;
//! an invalid one is refused and the running config stays; a valid one has its restart-only
//! settings put back to the running values (with a warning each), then the backend set is diffed
//! and the new table and config reach every core as one message. Nothing is locked and nothing
//! in flight is touched: requests finish on the config and backend they started with.

use std::path::PathBuf;

use crate::config::{Config, ConfigError};

/// Why a reload did not happen. Its text is what the log, the `reload` command and the admin
/// answer show, so it carries the cause's text itself; none is also returned as `source()`,
/// which would print it twice in a `{:#}` chain.
/// A static backend that does not resolve, by its index in `backends`. The text carries the
/// cause (startup prints it through `anyhow`, a reload through `ReloadError`), so it is not also
/// a `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StaticsError {
    #[error("backends[{index}].url: cannot resolve {host}: {error}")]
    Lookup {
        index: usize,
        host: String,
        error: std::io::Error,
    },
    #[error("backends[{index}].url: {host} has no address")]
    NoAddress { index: usize, host: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A demo proxy has no file to re-read.
    #[error("the proxy was started without a config file")]
    NoConfigFile,
    /// The file did not load or validate; one line, its problems separated by `; `.
    #[error("{}: {}", .path.display(), .error.to_string().replace('\n', "; "))]
    Invalid { path: PathBuf, error: ConfigError },
    /// A static backend new in the file does not resolve.
    #[error(transparent)]
    Statics(#[from] StaticsError),
    /// The control plane's inbox is full (the admin endpoint does not wait for room).
    #[error("the control plane is busy; try again")]
    Busy,
    /// The control plane's inbox stayed full or closed for the whole wait (SIGHUP).
    #[error("the control plane is not running")]
    NotRunning,
    /// The control plane dropped the request without an answer.
    #[error("the control plane did not answer")]
    NoAnswer,
    /// The control plane is still working on it (resolving names, say) after the admin wait.
    #[error("reload did not finish in time")]
    TooSlow,
}

impl ReloadError {
    /// The status `POST /admin/reload` answers with: the file's fault is the client's (400); a
    /// control plane that cannot take or finish the request is a server condition.
    pub fn status(&self) -> u16 {
        match self {
            ReloadError::NoConfigFile | ReloadError::Invalid { .. } | ReloadError::Statics(_) => {
                400
            }
            ReloadError::Busy | ReloadError::NotRunning => 503,
            ReloadError::NoAnswer => 500,
            ReloadError::TooSlow => 504,
        }
    }
}

/// Puts the settings that cannot change without a restart back to their running values;
/// returns one warning per setting that the new file changed.
pub(crate) fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
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
    // The store's sync thread is started once, with these settings.
    keep!(ratelimit, "ratelimit");
    warnings
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

    #[test]
    fn a_bad_file_is_the_clients_fault_and_a_stuck_plane_is_not() {
        let invalid = ReloadError::Invalid {
            path: "/etc/llmproxy.yaml".into(),
            error: ConfigError::Invalid(vec![
                "backends[0].weight: must be at least 1".into(),
                "retry.attempts: too large".into(),
            ]),
        };
        assert_eq!(invalid.status(), 400);
        assert_eq!(
            invalid.to_string(),
            "/etc/llmproxy.yaml: backends[0].weight: must be at least 1; retry.attempts: too large"
        );
        let unresolved = ReloadError::from(StaticsError::NoAddress {
            index: 1,
            host: "gone.example".into(),
        });
        assert_eq!(unresolved.status(), 400);
        assert_eq!(
            unresolved.to_string(),
            "backends[1].url: gone.example has no address"
        );
        assert_eq!(ReloadError::NoConfigFile.status(), 400);
        assert_eq!(ReloadError::Busy.status(), 503);
        assert_eq!(ReloadError::NotRunning.status(), 503);
        assert_eq!(ReloadError::NoAnswer.status(), 500);
        assert_eq!(ReloadError::TooSlow.status(), 504);
        assert_eq!(
            ReloadError::Busy.to_string(),
            "the control plane is busy; try again"
        );
        assert_eq!(
            ReloadError::NoAnswer.to_string(),
            "the control plane did not answer"
        );
        assert_eq!(
            ReloadError::TooSlow.to_string(),
            "reload did not finish in time"
        );
    }
}
