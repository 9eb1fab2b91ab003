//! The chunked body decoder (`http1::chunked`), fed the way the server and the relay feed it:
//! whatever arrived is appended to a buffer, the decoder consumes what it can, the rest waits for
//! the next read. Properties: no panic; the decoded data, the bytes consumed, completion and the
//! error are the same however the input is split; after the last chunk the following bytes (a
//! pipelined request) are left alone; decoded data never exceeds the input.

use llmproxy::http1::{ChunkedDecoder, ChunkedError};

use crate::engine::{cuts, feature, pieces, rng_for, Target};

pub const TARGET: Target = Target {
    name: "chunked",
    dict: &[
        b"\r\n",
        b"\n",
        b"0\r\n\r\n",
        b"5\r\nhello\r\n",
        b"1\r\nx\r\n",
        b";ext=1",
        b" ;x",
        b"ffffffffffffffff",
        b"X-Trailer: 1\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"-1",
        b"0x",
    ],
    max_len: 16 * 1024,
    check,
};

#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    data: Vec<u8>,
    consumed: usize,
    done: bool,
    error: Option<ChunkedError>,
}

/// Feeds `parts` one after another through a buffer, like a socket read loop.
fn decode(parts: &[&[u8]]) -> Decoded {
    let mut dec = ChunkedDecoder::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Decoded {
        data: Vec::new(),
        consumed: 0,
        done: false,
        error: None,
    };
    for part in parts {
        buf.extend_from_slice(part);
        match dec.decode(&buf, |d| out.data.extend_from_slice(d)) {
            Ok(n) => {
                assert!(n <= buf.len());
                out.consumed += n;
                buf.drain(..n);
            }
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
        if dec.is_done() {
            out.done = true;
            return out;
        }
        assert!(buf.is_empty(), "an unfinished decoder consumes everything");
    }
    out
}

fn check(input: &[u8]) -> u64 {
    let whole = decode(&[input]);
    assert!(whole.data.len() <= input.len());
    if whole.done {
        assert!(whole.consumed <= input.len());
    }
    let mut rng = rng_for(input);
    for _ in 0..2 {
        let split = decode(&pieces(input, &cuts(input.len(), &mut rng)));
        if whole.error.is_some() {
            // Bytes consumed before the failing read differ; the error and the data handed on
            // before it do not.
            assert_eq!(split.error, whole.error, "error depends on the split");
            assert_eq!(
                split.data, whole.data,
                "data before the error depends on the split"
            );
        } else {
            assert_eq!(split, whole, "decoding depends on the split");
        }
    }
    feature((
        whole.done,
        &whole.error,
        whole.data.len().min(4),
        (input.len() - whole.consumed).min(2),
    ))
}
