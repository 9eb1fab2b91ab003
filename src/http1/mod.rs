//! HTTP/1.1 wire handling owned by the proxy: head parsing with hard size limits, chunked body
//! decoding, hop-by-hop header rules and response framing we write ourselves.
//!
//! Why not monoio-http's codec on the data path: it has no header/body limits, does not know the
//! request method (HEAD/204/304), reads close-delimited bodies as empty and batches small chunks in
//! its encoder, which would hold SSE tokens back. Everything here is synchronous and allocation-light
//! so it can be unit-tested and fuzzed without a runtime; sockets are driven by `proxy::conn` and
//! `upstream`.

pub mod chunked;
pub mod head;
pub mod headers;
pub mod io;
pub mod name;
pub mod write;

pub use chunked::{ChunkedDecoder, ChunkedError};
pub use head::{BodyFraming, Head, HeadError, ParseStatus};
