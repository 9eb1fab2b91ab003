//! Request and response heads parsed with `httparse`, kept as ranges into the bytes they came from
//! so no header is copied. Body framing is decided here, strictly: anything a smuggling attack
//! could exploit (both Content-Length and Transfer-Encoding, conflicting lengths, unknown codings)
//! is an error, never a guess.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;

use super::name::Name;

/// Most heads seen in practice have < 30 headers; more than this is abuse.
pub const MAX_HEADERS: usize = 100;
// `Fields::first` holds header indexes + 1 in a u8, and `fields` numbers them with a u8 range
// (which would stop short, silently, past 255).
const _: () = assert!(MAX_HEADERS < u8::MAX as usize);

/// One header: where its name and value lie in the head's bytes, and which known name it is.
#[derive(Debug, Clone)]
struct Field {
    name: Range<usize>,
    value: Range<usize>,
    known: Name,
}

impl Field {
    /// The header's line as the peer wrote it, without its line end: the name, the colon
    /// (httparse allows nothing between the two) and from there through the value. An empty
    /// value may lie outside the head (httparse's static ""): then the line ends at the colon.
    fn line(&self) -> Range<usize> {
        self.name.start..self.value.end.max(self.name.end + 1)
    }
}

/// The headers of a head, and where the first of each known name is: lookups of known names
/// cost one index, not a pass over the headers (a client such as OpenAI's SDK sends about 17).
#[derive(Debug, Clone)]
struct Fields {
    all: Vec<Field>,
    /// Index + 1 of the first header of each known name (0: none).
    first: [u8; Name::COUNT],
    /// The known names that occur more than once.
    repeated: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed HTTP head: {0}")]
    Malformed(&'static str),
    #[error("too many headers (more than {MAX_HEADERS})")]
    TooManyHeaders,
    #[error("conflicting or invalid body framing: {0}")]
    Framing(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the peer closes.
    UntilClose,
}

pub enum ParseStatus {
    Complete(Head),
    /// Need more bytes; nothing consumed.
    Partial,
}

/// A parsed head. `raw` holds exactly the head bytes (through the blank line).
#[derive(Debug, Clone)]
pub struct Head {
    raw: Bytes,
    /// Request: method; response: reason phrase.
    first: Range<usize>,
    /// Response status (0 for requests).
    pub status: u16,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    headers: Fields,
    /// Request: the method when it is a standard one (no UTF-8 check per call).
    known_method: Option<&'static str>,
    /// Request: the target, checked as UTF-8 once ("" if it is not), and where its path ends.
    /// Routing, metrics, logs and usage ask for it several times per request.
    target_str: Box<str>,
    path_len: usize,
}

/// Where `part` lies inside `base`. httparse hands back slices of the buffer, except for a reason
/// phrase that is not UTF-8 (obs-text), which it replaces by a static `""`: that maps to an empty
/// range instead of an address difference that would underflow (and later slice out of bounds).
fn known_method(m: &str) -> Option<&'static str> {
    const KNOWN: [&str; 7] = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"];
    KNOWN.into_iter().find(|k| *k == m)
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= base.len() => start..end,
        _ => 0..0,
    }
}

fn fields(base: &[u8], headers: &[httparse::Header<'_>]) -> Fields {
    let mut first = [0u8; Name::COUNT];
    let mut repeated = 0;
    let all = headers
        .iter()
        .zip(1u8..)
        .map(|(h, i)| {
            let known = Name::of(h.name.as_bytes());
            // Every index fits a u8 (`MAX_HEADERS`, checked at compile time beside it).
            match first.get_mut(known as usize) {
                Some(slot @ 0) => *slot = i,
                Some(_) => repeated |= known.bit(),
                None => {}
            }
            Field {
                name: offset(base, h.name.as_bytes()),
                value: offset(base, h.value),
                known,
            }
        })
        .collect();
    Fields {
        all,
        first,
        repeated,
    }
}

impl Head {
    /// Parses a request head from the front of `buf`. On success the head's bytes are split off
    /// `buf` (the caller keeps what follows: body or the next pipelined request).
    pub fn parse_request(buf: &mut bytes::BytesMut) -> Result<ParseStatus, HeadError> {
        // Left uninitialised: httparse writes only the headers it finds (filling all hundred cost
        // more than parsing a typical head's few).
        let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut storage) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(ParseStatus::Partial),
            Err(e) => return Err(map_err(e)),
        };
        let base: &[u8] = &buf[..];
        let method = offset(base, req.method.unwrap_or("").as_bytes());
        let version = req.version.unwrap_or(1);
        let headers = fields(base, req.headers);
        let known_method = known_method(req.method.unwrap_or(""));
        let target_str: Box<str> = req.path.unwrap_or("").into();
        let path_len = memchr::memchr(b'?', target_str.as_bytes()).unwrap_or(target_str.len());
        let raw = crate::http1::io::take_copy(buf, len);
        Ok(ParseStatus::Complete(Head {
            raw,
            first: method,
            status: 0,
            version,
            headers,
            known_method,
            target_str,
            path_len,
        }))
    }

    /// Parses a response head from the front of `buf`, splitting it off on success.
    pub fn parse_response(buf: &mut bytes::BytesMut) -> Result<ParseStatus, HeadError> {
        let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let len = match parser.parse_response_with_uninit_headers(&mut res, buf, &mut storage) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(ParseStatus::Partial),
            Err(e) => return Err(map_err(e)),
        };
        let base: &[u8] = &buf[..];
        let reason = offset(base, res.reason.unwrap_or("").as_bytes());
        let status = res.code.unwrap_or(0);
        let version = res.version.unwrap_or(1);
        let headers = fields(base, res.headers);
        let raw = crate::http1::io::take_copy(buf, len);
        Ok(ParseStatus::Complete(Head {
            raw,
            first: reason,
            status,
            version,
            headers,
            known_method: None,
            target_str: Box::default(),
            path_len: 0,
        }))
    }

    fn str_at(&self, r: &Range<usize>) -> &str {
        // httparse only accepts token/visible ASCII for method, target and reason.
        std::str::from_utf8(&self.raw[r.clone()]).unwrap_or("")
    }

    pub fn method(&self) -> &str {
        match self.known_method {
            Some(m) => m,
            None => self.str_at(&self.first),
        }
    }

    pub fn target(&self) -> &str {
        &self.target_str
    }

    /// The request path without the query string.
    pub fn path(&self) -> &str {
        self.target_str.get(..self.path_len).unwrap_or("")
    }

    pub fn reason(&self) -> &str {
        self.str_at(&self.first)
    }

    /// The reason phrase's bytes (`reason` without its UTF-8 check).
    pub fn reason_bytes(&self) -> &[u8] {
        &self.raw[self.first.clone()]
    }

    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// Header names and values as raw bytes (names are tokens, so ASCII).
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields().map(|(_, n, v)| (n, v))
    }

    /// The headers with the known name each is (`Name::Other` for the rest).
    pub fn fields(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> {
        self.headers.all.iter().map(move |f| {
            (
                f.known,
                &self.raw[f.name.clone()],
                &self.raw[f.value.clone()],
            )
        })
    }

    /// The values of the headers called `name`, in order.
    pub fn values(&self, name: Name) -> impl Iterator<Item = &[u8]> {
        let fields = &self.headers.all;
        // From the first of them, and only it when the name is not repeated.
        let (from, most) = match usize::from(self.headers.first[name as usize]) {
            0 => (fields.len(), 0),
            i if self.headers.repeated & name.bit() == 0 => (i - 1, 1),
            i => (i - 1, fields.len()),
        };
        fields
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter(move |f| f.known == name)
            .take(most)
            .map(move |f| &self.raw[f.value.clone()])
    }

    /// First value of a known header.
    pub fn get(&self, name: Name) -> Option<&[u8]> {
        let i = usize::from(*self.headers.first.get(name as usize)?);
        let f = self.headers.all.get(i.checked_sub(1)?)?;
        self.raw.get(f.value.clone())
    }

    /// How many headers are called `name`.
    pub fn count(&self, name: Name) -> usize {
        self.values(name).count()
    }

    /// The lines ("Name: value", without the line end) of the headers whose names are not in
    /// `names` (a set of `Name::bit`s), in order.
    pub fn lines_except(&self, names: u32) -> impl Iterator<Item = &[u8]> {
        self.headers
            .all
            .iter()
            .filter(move |f| names & f.known.bit() == 0)
            .filter_map(move |f| self.raw.get(f.line()))
    }

    pub fn header_count(&self) -> usize {
        self.headers.all.len()
    }

    /// First value of a header (case-insensitive name). Compares raw bytes: lookups happen
    /// several times per request and must not validate UTF-8 each time. A known name is found
    /// by its tag (`get` skips classifying `name`); any other is compared only with the
    /// headers that are not known names.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let name = name.as_bytes();
        match Name::of(name) {
            Name::Other => self
                .headers
                .all
                .iter()
                .filter(|f| f.known == Name::Other)
                .find(|f| self.raw[f.name.clone()].eq_ignore_ascii_case(name))
                .map(|f| &self.raw[f.value.clone()]),
            known => self.get(known),
        }
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// First value of a known header, if it is UTF-8.
    pub fn get_str(&self, name: Name) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// True when some `Connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.values(Name::Connection).any(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// Whether the peer wants the connection kept open after this message.
    pub fn keep_alive(&self) -> bool {
        if self.version == 0 {
            self.connection_has("keep-alive")
        } else {
            !self.connection_has("close")
        }
    }

    /// Request body framing per RFC 9112 §6.3, rejecting every ambiguous form.
    pub fn request_framing(&self) -> Result<BodyFraming, HeadError> {
        match self.framing_headers()? {
            Some(f) => Ok(f),
            None => Ok(BodyFraming::Empty),
        }
    }

    /// Response body framing; `request_method` and the status decide bodiless responses.
    pub fn response_framing(&self, request_method: &str) -> Result<BodyFraming, HeadError> {
        if request_method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(BodyFraming::Empty);
        }
        match self.framing_headers()? {
            Some(f) => Ok(f),
            None => Ok(BodyFraming::UntilClose),
        }
    }

    fn framing_headers(&self) -> Result<Option<BodyFraming>, HeadError> {
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut saw_te = false;
        // Straight over the fields: only two names matter, and the other headers' bytes are
        // never looked at.
        for f in &self.headers.all {
            match f.known {
                Name::ContentLength => {
                    // A list ("5, 5") or repeated header must agree exactly; anything else is
                    // smuggling.
                    for part in self.raw[f.value.clone()].split(|b| *b == b',') {
                        let n = parse_length(part.trim_ascii())
                            .ok_or(HeadError::Framing("invalid Content-Length"))?;
                        if length.is_some_and(|l| l != n) {
                            return Err(HeadError::Framing("conflicting Content-Length values"));
                        }
                        length = Some(n);
                    }
                }
                Name::TransferEncoding => {
                    saw_te = true;
                    let mut codings = self.raw[f.value.clone()]
                        .split(|b| *b == b',')
                        .map(|t| t.trim_ascii())
                        .filter(|t| !t.is_empty());
                    let only = codings.next();
                    // Only "chunked", once, is understood; anything else cannot be framed
                    // safely.
                    if chunked
                        || codings.next().is_some()
                        || !only.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                    {
                        return Err(HeadError::Framing("unsupported Transfer-Encoding"));
                    }
                    chunked = true;
                }
                _ => {}
            }
        }
        if saw_te && length.is_some() {
            return Err(HeadError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if chunked {
            if self.version == 0 {
                return Err(HeadError::Framing("Transfer-Encoding in HTTP/1.0"));
            }
            return Ok(Some(BodyFraming::Chunked));
        }
        Ok(length.map(|n| {
            if n == 0 {
                BodyFraming::Empty
            } else {
                BodyFraming::Length(n)
            }
        }))
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Nineteen digits always fit a u64: folded by hand (`str::parse` cost a hundred and fifty
    // instructions a head, twice per request).
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn map_err(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::Version => HeadError::Malformed("invalid HTTP version"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn req(s: &str) -> Result<Head, HeadError> {
        let mut b = BytesMut::from(s.as_bytes());
        match Head::parse_request(&mut b)? {
            ParseStatus::Complete(h) => Ok(h),
            ParseStatus::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_request_and_leaves_the_rest() {
        let mut b = BytesMut::from(
            &b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}GET"[..],
        );
        let ParseStatus::Complete(h) = Head::parse_request(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(h.method(), "POST");
        assert_eq!(h.target(), "/v1/chat?x=1");
        assert_eq!(h.path(), "/v1/chat");
        assert_eq!(h.header_str("host"), Some("a"));
        assert_eq!(h.request_framing().unwrap(), BodyFraming::Length(2));
        assert_eq!(&b[..], b"{}GET");
    }

    #[test]
    fn partial_head_consumes_nothing() {
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nHost"[..]);
        assert!(matches!(
            Head::parse_request(&mut b).unwrap(),
            ParseStatus::Partial
        ));
        assert_eq!(b.len(), 20);
    }

    #[test]
    fn rejects_smuggling_shapes() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(req(both).unwrap().request_framing().is_err());
        let dup = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(req(dup).unwrap().request_framing().is_err());
        let same = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            req(same).unwrap().request_framing().unwrap(),
            BodyFraming::Length(3)
        );
        let bad = "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n";
        assert!(req(bad).unwrap().request_framing().is_err());
        let gzip = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(req(gzip).unwrap().request_framing().is_err());
        let twice =
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(req(twice).unwrap().request_framing().is_err());
        // obs-fold is rejected by the parser itself.
        assert!(req("GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n").is_err());
    }

    #[test]
    fn response_framing_by_method_and_status() {
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..]);
        let ParseStatus::Complete(h) = Head::parse_response(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(h.status, 200);
        assert_eq!(h.response_framing("HEAD").unwrap(), BodyFraming::Empty);
        assert_eq!(h.response_framing("GET").unwrap(), BodyFraming::Length(5));
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\n\r\n"[..]);
        let ParseStatus::Complete(h) = Head::parse_response(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(h.response_framing("GET").unwrap(), BodyFraming::UntilClose);
        let mut b = BytesMut::from(&b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"[..]);
        let ParseStatus::Complete(h) = Head::parse_response(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(h.response_framing("GET").unwrap(), BodyFraming::Empty);
    }

    #[test]
    fn non_utf8_reason_phrase_is_empty_not_a_panic() {
        // Found by the fuzzer: httparse replaces an obs-text reason by a static "".
        let mut b = BytesMut::from(&b"HTTP/1.1 200 \xd6K\r\nContent-Length: 0\r\n\r\n"[..]);
        let ParseStatus::Complete(h) = Head::parse_response(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(h.status, 200);
        assert_eq!(h.reason(), "");
        assert_eq!(h.reason_bytes(), b"");
        let mut b2 = BytesMut::from(&b"HTTP/1.1 404 Not Found\r\n\r\n"[..]);
        let ParseStatus::Complete(h2) = Head::parse_response(&mut b2).unwrap() else {
            panic!()
        };
        assert_eq!(h2.reason_bytes(), b"Not Found");
        assert_eq!(h.header_str("content-length"), Some("0"));
    }

    #[test]
    fn content_lengths_read_as_str_parse_reads_them() {
        for v in [
            "0",
            "7",
            "007",
            "1234",
            "9999999999999999999",
            "18446744073709551615",
            "",
            "-1",
            "+1",
            "1 ",
            "1.0",
            "0x10",
            "99999999999999999999",
        ] {
            let want = (v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<u64>().ok())
                .flatten();
            assert_eq!(parse_length(v.as_bytes()), want, "{v:?}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        assert!(req("GET / HTTP/1.1\r\n\r\n").unwrap().keep_alive());
        assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .keep_alive());
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive());
        assert!(req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .keep_alive());
    }

    #[test]
    fn lookups_by_known_name_and_by_any_name_agree() {
        let h = req(
            "POST / HTTP/1.1\r\nHOST: a\r\nX-Custom: 1\r\nContent-Type: text/plain\r\n\
             x-request-id: r1\r\nX-Custom: 2\r\nConnection: keep-alive, X-Custom\r\n\
             Content-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.header("host"), Some(&b"a"[..]));
        assert_eq!(h.get(Name::Host), Some(&b"a"[..]));
        assert_eq!(h.header("content-TYPE"), Some(&b"text/plain"[..]));
        assert_eq!(h.get_str(Name::XRequestId), Some("r1"));
        assert_eq!(h.header("x-custom"), Some(&b"1"[..]));
        assert_eq!(h.header_str("X-CUSTOM"), Some("1"));
        assert_eq!(h.header("x-missing"), None);
        assert_eq!(h.get(Name::Authorization), None);
        assert_eq!(h.count(Name::Host), 1);
        assert!(h.connection_has("x-custom"));
        assert!(h.connection_has("keep-alive"));
        assert!(!h.connection_has("close"));
        // Repeated known names: every value is seen, the first is the one `get` gives.
        let h2 = req(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-a\r\nHost: b\r\n\
             Connection: close\r\nHost: c\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h2.count(Name::Host), 3);
        assert_eq!(h2.get(Name::Host), Some(&b"a"[..]));
        assert_eq!(h2.count(Name::Connection), 2);
        assert!(h2.connection_has("close") && h2.connection_has("x-a"));
        assert!(!h2.keep_alive());
        assert_eq!(h2.count(Name::Expect), 0);
        assert_eq!(h.count(Name::ContentType), 1);
        let known: Vec<Name> = h.fields().map(|(k, _, _)| k).collect();
        assert_eq!(
            known,
            [
                Name::Host,
                Name::Other,
                Name::ContentType,
                Name::XRequestId,
                Name::Other,
                Name::Connection,
                Name::ContentLength
            ]
        );
    }

    #[test]
    fn a_head_with_the_most_headers_parses_and_one_more_is_refused() {
        let head = |n: usize| {
            let mut s = String::from("GET / HTTP/1.1\r\n");
            for i in 0..n {
                s.push_str(&format!("x-h{i}: {i}\r\n"));
            }
            s + "\r\n"
        };
        let h = req(&head(MAX_HEADERS)).unwrap();
        assert_eq!(h.header_count(), MAX_HEADERS);
        assert_eq!(h.header_str("x-h99"), Some("99"));
        assert!(matches!(
            req(&head(MAX_HEADERS + 1)),
            Err(HeadError::TooManyHeaders)
        ));
        let mut b = BytesMut::from(
            format!(
                "HTTP/1.1 200 OK\r\n{}",
                &head(MAX_HEADERS)["GET / HTTP/1.1\r\n".len()..]
            )
            .as_bytes(),
        );
        let ParseStatus::Complete(r) = Head::parse_response(&mut b).unwrap() else {
            panic!("partial")
        };
        assert_eq!(r.header_count(), MAX_HEADERS);
    }
}
