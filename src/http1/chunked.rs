//! Incremental decoder for `Transfer-Encoding: chunked` bodies. It is fed whatever bytes arrived
//! and hands back data slices at once, so a streamed token is never held waiting for the rest of
//! its chunk. Sizes and line endings are checked strictly: a malformed size is a smuggling vector.

/// Longest chunk-size line we accept (size, extensions and CRLF). Real servers send a few bytes.
const MAX_LINE: usize = 1024;
/// Trailer section bound; trailers are read and discarded.
const MAX_TRAILERS: usize = 8 * 1024;
/// A size line whose end lies within this many bytes of input is parsed where it lies: the
/// usual one ("1a3\r\n") is a few bytes, and a stream carries one per event.
const SHORT_LINE: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    #[error("invalid chunk size line")]
    BadSize,
    #[error("chunk size line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    BadTerminator,
    #[error("trailer section too large")]
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size line (bytes accumulated in `line_len`).
    Size,
    Data(u64),
    /// Expecting the CR of the CRLF after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    line: Vec<u8>,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes as much of `input` as possible, calling `out` with each data slice. Returns the
    /// number of bytes consumed; bytes after the terminating chunk are left unconsumed.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Size | State::Trailer => {
                    let rest = &input[i..];
                    // The common case, a whole short size line and nothing held from the last
                    // input: found by hand (`memchr`'s set-up costs more than the line) and
                    // parsed in place, not copied into `line` first.
                    if self.state == State::Size && self.line.is_empty() {
                        let short = &rest[..rest.len().min(SHORT_LINE)];
                        if let Some(p) = short.iter().position(|b| *b == b'\n') {
                            let size = parse_size_line(&rest[..=p])?;
                            i += p + 1;
                            self.state = if size == 0 {
                                State::Trailer
                            } else {
                                State::Data(size)
                            };
                            continue;
                        }
                    }
                    let nl = memchr::memchr(b'\n', rest);
                    let take = nl.map_or(rest.len(), |p| p + 1);
                    let limit = if self.state == State::Size {
                        MAX_LINE
                    } else {
                        MAX_TRAILERS
                    };
                    if self.line.len() + take > limit {
                        return Err(if self.state == State::Size {
                            ChunkedError::LineTooLong
                        } else {
                            ChunkedError::TrailersTooLarge
                        });
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    i += take;
                    if nl.is_none() {
                        continue;
                    }
                    if self.state == State::Size {
                        let size = parse_size_line(&self.line)?;
                        self.line.clear();
                        self.state = if size == 0 {
                            State::Trailer
                        } else {
                            State::Data(size)
                        };
                    } else {
                        let empty = self.line == b"\r\n";
                        self.trailer_bytes += self.line.len();
                        if self.trailer_bytes > MAX_TRAILERS {
                            return Err(ChunkedError::TrailersTooLarge);
                        }
                        if !self.line.ends_with(b"\r\n") {
                            return Err(ChunkedError::BadTerminator);
                        }
                        self.line.clear();
                        if empty {
                            self.state = State::Done;
                            return Ok(i);
                        }
                    }
                }
                State::Data(left) => {
                    let avail = (input.len() - i) as u64;
                    let n = left.min(avail) as usize;
                    out(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left > 0 {
                        State::Data(left)
                    } else if input.get(i..i + 2) == Some(b"\r\n") {
                        // The chunk's CRLF came with it (as it usually does): past both at once.
                        i += 2;
                        State::Size
                    } else {
                        State::DataCr
                    };
                }
                State::DataCr => {
                    if input[i] != b'\r' {
                        return Err(ChunkedError::BadTerminator);
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if input[i] != b'\n' {
                        return Err(ChunkedError::BadTerminator);
                    }
                    i += 1;
                    self.state = State::Size;
                }
                State::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

fn parse_size_line(line: &[u8]) -> Result<u64, ChunkedError> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(ChunkedError::BadTerminator)?;
    // Extensions (";name=value") are allowed and ignored; whitespace before them is tolerated
    // the way common servers do, but the size itself must be pure hex.
    // Lines are a few bytes: a plain loop, not `memchr` (its set-up costs more than the line).
    let size = match line.iter().position(|b| *b == b';') {
        Some(p) => line[..p].trim_ascii_end(),
        None => line,
    };
    if size.is_empty() || size.len() > 15 {
        return Err(ChunkedError::BadSize);
    }
    // Digits folded by hand: `str::from_utf8` + `from_str_radix` were a twentieth of a streamed
    // request. At most 15 digits, so the value fits (no overflow check needed).
    size.iter().try_fold(0u64, |n, b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(ChunkedError::BadSize),
        };
        Ok(n << 4 | u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(parts: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        for p in parts {
            consumed += d.decode(p, |s| out.extend_from_slice(s))?;
        }
        Ok((out, d.is_done(), consumed))
    }

    #[test]
    fn decodes_whole_and_split_input() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        let (out, done, n) = decode_all(&[body]).unwrap();
        assert_eq!(out, b"hello world");
        assert!(done);
        assert_eq!(n, body.len());
        // Every split point gives the same result.
        for cut in 0..body.len() {
            let (out, done, _) = decode_all(&[&body[..cut], &body[cut..]]).unwrap();
            assert_eq!(out, b"hello world", "cut at {cut}");
            assert!(done);
        }
    }

    /// Size lines short and long (past `SHORT_LINE`, with extensions), chunks of one byte and
    /// many: the in-place path and the general one agree at every split point.
    #[test]
    fn short_and_long_size_lines_at_every_split_point() {
        let long_ext = format!("3;{}=1\r\nabc\r\n", "x".repeat(40));
        let body = [
            "1\r\nd\r\n",
            "1A\r\n",
            "abcdefghijklmnopqrstuvwxyz\r\n",
            &long_ext,
            "2 ;e=\"v\"\r\nde\r\n",
            "0\r\nX-Trailer: 1\r\n\r\n",
        ]
        .concat();
        let body = body.as_bytes();
        let want = b"dabcdefghijklmnopqrstuvwxyzabcde";
        for cut in 0..body.len() {
            for cut2 in [cut, (cut + 7).min(body.len())] {
                let (out, done, n) =
                    decode_all(&[&body[..cut], &body[cut..cut2], &body[cut2..]]).unwrap();
                assert_eq!(out, want, "cuts at {cut}, {cut2}");
                assert!(done);
                assert_eq!(n, body.len());
            }
        }
        // A bad terminator right after a chunk's data, whole or split.
        for input in [&b"2\r\nabXY"[..], b"2\r\nab\rY"] {
            assert_eq!(
                decode_all(&[input]).unwrap_err(),
                ChunkedError::BadTerminator
            );
        }
    }

    #[test]
    fn leaves_pipelined_bytes() {
        let mut d = ChunkedDecoder::new();
        let input = b"1\r\na\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1";
        let n = d.decode(input, |_| {}).unwrap();
        assert!(d.is_done());
        assert_eq!(&input[n..], b"GET / HTTP/1.1");
    }

    #[test]
    fn rejects_bad_sizes_and_terminators() {
        assert_eq!(decode_all(&[b"zz\r\n"]).unwrap_err(), ChunkedError::BadSize);
        assert_eq!(decode_all(&[b"-1\r\n"]).unwrap_err(), ChunkedError::BadSize);
        assert_eq!(
            decode_all(&[b"ffffffffffffffffff\r\n"]).unwrap_err(),
            ChunkedError::BadSize
        );
        assert_eq!(
            decode_all(&[b"1\r\nab\r\n"]).unwrap_err(),
            ChunkedError::BadTerminator
        );
        assert_eq!(
            decode_all(&[b"1\n"]).unwrap_err(),
            ChunkedError::BadTerminator
        );
        let long = vec![b'1'; 2000];
        assert_eq!(decode_all(&[&long]).unwrap_err(), ChunkedError::LineTooLong);
    }
}
