//! Certificate rotation when the files change (issue 16): the control plane polls the stamps
//! (`stamp`) of `tls.cert_file`, `tls.key_file` and `tls.client_ca_file` every `POLL` and, when
//! one changed, builds the listen TLS anew from the files and publishes the running config with
//! it, the way a reload does: new handshakes use it, open connections keep the session they
//! have. A pair that does not build (half-written, mismatched, expired) is refused with a log
//! line and the running certificate keeps serving; the next change is tried again, so a
//! certificate and key written one after the other end up taken once both are in place.
//!
//! Runs on the plane's thread, which owns the running config (a thread of its own would need
//! the plane to hand it every reload's paths, and to hand the new pair back). Must never run on
//! a core: it stats and reads files.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::control::stamp::{stamp, Stamp};
use crate::tls::ServerTls;

/// How often the files are looked at: a rotation reaches new handshakes within about this.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// The listen TLS files of the running config and their stamps when last read.
pub(crate) struct TlsWatch {
    files: Vec<(PathBuf, Option<Stamp>)>,
}

impl TlsWatch {
    /// Watches `cfg`'s files, as of now (they were just read to build `cfg`).
    pub(crate) fn new(cfg: &Config) -> TlsWatch {
        let files = cfg
            .tls
            .iter()
            .flat_map(|t| {
                [
                    Some(&t.cert_file),
                    Some(&t.key_file),
                    t.client_ca_file.as_ref(),
                ]
                .into_iter()
                .flatten()
            })
            .map(|p| (p.clone(), stamp(p)))
            .collect();
        TlsWatch { files }
    }

    /// Whether any file changed (or appeared, or vanished) since the last look; remembers what
    /// it saw either way.
    pub(crate) fn changed(&mut self) -> bool {
        let mut changed = false;
        for (path, last) in &mut self.files {
            let now = stamp(path);
            if now != *last {
                *last = now;
                changed = true;
            }
        }
        changed
    }
}

/// `cfg` with its listen certificate rebuilt from its files; `None` without `tls:`. An error
/// names the file, like at startup.
pub(crate) fn rebuild(cfg: &Config) -> Option<Result<Config, String>> {
    let t = cfg.tls.as_ref()?;
    Some(
        ServerTls::load(&t.cert_file, &t.key_file, t.client_ca_file.as_deref()).map(|server| {
            let mut new = cfg.clone();
            if let Some(t) = new.tls.as_mut() {
                t.server = server;
            }
            new
        }),
    )
}
