//! TLS both ways: the client side on `listen` (with optional client certificates) and https
//! backends (CA, client certificate, server name). rustls with the `ring` provider: it builds
//! with the C compiler alone, where aws-lc-rs needs cmake for its C build (not on the build
//! machine, and one more thing for every builder to install); ureq already links the same
//! rustls with ring, so the health checks and scrapers share it.
//!
//! Owns: reading PEM files into rustls configs (`files`), the connection driver (`stream`), the
//! plain-or-TLS halves the request path holds (`io`). Must never import the request path or the
//! config module (config imports it, to turn files into configs at load time, so a bad pair is a
//! load error naming the file and a reload that fails keeps the running certificate).

pub(crate) mod blocking;
pub(crate) mod files;
pub(crate) mod io;
pub(crate) mod stream;

pub use files::{ClientTls, ServerTls};
