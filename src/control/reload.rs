//! Hot reload: what a re-read configuration may change. (The admin endpoint that asks for a
//! reload is `proxy::admin`; the answer travels as `messages::Summary`.)
//!
//! The reload itself runs on the control-plane thread (`plane`): re-read and validate the file;
//! an invalid one is refused and the running config stays; a valid one has its restart-only
//! settings put back to the running values (with a warning each), then the backend set is diffed
//! and the new table and config reach every core as one message. Nothing is locked and nothing
//! in flight is touched: requests finish on the config and backend they started with.

use crate::config::Config;

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
}
