//! The keys-file watcher: a blocking thread that polls `auth.keys_file` (inode, size, mtime — so a
//! Kubernetes Secret update, which swaps a symlink, is seen) and replaces the process-wide key set
//! when it changes. A broken file keeps the previous keys. Cores never wait for it: they pick up
//! the new set by its version number (`auth::CoreAuth`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::KeyStore;
use crate::control::stamp::stamp;

/// Starts the thread that re-reads `path` whenever it changes.
pub(crate) fn watch(
    store: Arc<KeyStore>,
    path: PathBuf,
    every: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmproxy-keys".into())
        .spawn(move || {
            // Unknown at first: the file may have changed since it was loaded at startup, so the
            // first poll reads it once more.
            let mut last = None;
            loop {
                std::thread::sleep(every);
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                match store.reload_file(&path) {
                    Ok(n) => log::info!("auth.keys_file {} reloaded: {n} keys", path.display()),
                    Err(e) => log::error!(
                        "auth.keys_file {}: {e}; keeping the previous keys",
                        path.display()
                    ),
                }
            }
        })
}
