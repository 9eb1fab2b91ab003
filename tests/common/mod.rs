//! Test harness: starts real `llmproxy` processes (the proxy and simulated backends) on loopback
//! ephemeral ports and talks HTTP/1.1 to them over plain sockets, so tests see exactly the bytes
//! a client would. Every process is stopped by its PID when its handle drops.
#![allow(dead_code)]

pub mod dns;
pub mod load;
pub mod redis;
pub mod tls;
pub mod webhook;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_llmproxy");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A directory of one test's files, removed with everything in it when dropped (a run of the
/// suite used to leave thousands behind in /tmp).
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("llmproxy-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// A child process killed (by PID) on drop, with its stderr captured line by line.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn llmproxy");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("LLMPROXY_TEST_VERBOSE").is_some() {
                        eprintln!("| {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, lines }
    }

    /// Waits until some output line contains `needle`; returns that line.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if start.elapsed() > timeout {
                panic!(
                    "no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: kill(2) through libc on our own child's PID.
        let rc = unsafe_kill(self.pid(), sig);
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // The libc crate exposes kill as unsafe; wrap it in one place.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_addr(line: &str) -> SocketAddr {
    let idx = line.find("127.0.0.1:").expect("address in line");
    let rest = &line[idx..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().expect("socket address")
}

pub struct Mock {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Mock {
    pub fn start() -> Mock {
        Mock::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Mock {
        Mock::start_on(0, args)
    }

    /// A mock on a given port (0 = any), e.g. to bring a killed backend back where it was.
    pub fn start_on(port: u16, args: &[&str]) -> Mock {
        let mut cmd = Command::new(BIN);
        cmd.arg("mock-backend")
            .arg("--port")
            .arg(port.to_string())
            .args(args);
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for_line("listening on", Duration::from_secs(10));
        let addr = parse_addr(&line);
        Mock { proc, addr }
    }

    /// A mock on a given loopback address (127.0.0.0/8 all reaches this host), so that several
    /// mocks can share one port as the replicas behind one DNS name do.
    pub fn start_at(ip: &str, port: u16, args: &[&str]) -> Mock {
        let mut cmd = Command::new(BIN);
        cmd.arg("mock-backend")
            .args(["--host", ip, "--port", &port.to_string()])
            .args(args);
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for_line("listening on", Duration::from_secs(10));
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.trim().parse().ok())
            .expect("mock address");
        Mock { proc, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> serde_json::Value {
        let r = get(self.addr, "/mock/stats");
        serde_json::from_slice(&r.body).expect("stats json")
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap_or(0)
    }

    pub fn control(&self, body: &str) {
        let r = post_json(self.addr, "/mock/control", body, &[]);
        assert_eq!(r.status, 200, "mock control: {}", r.text());
    }
}

pub struct Proxy {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub dir: TempDir,
    /// Other directories the proxy reads (certificates...), removed after it stopped.
    pub keep: Vec<TempDir>,
}

impl Proxy {
    /// Starts the proxy with `yaml` as its config (which should listen on 127.0.0.1:0).
    pub fn start(yaml: &str, args: &[&str]) -> Proxy {
        Proxy::start_env(yaml, args, &[])
    }

    pub fn start_env(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let dir = temp_dir("proxy");
        let path = dir.join("config.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&path).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for_line("listening on", Duration::from_secs(10));
        let addr = parse_addr(&line);
        Proxy {
            proc,
            addr,
            dir,
            keep: Vec::new(),
        }
    }

    /// Lines of captured output that parse as JSON objects with `"type":"access"`.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.proc
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "access")
            .collect()
    }
}

/// A config with sensible test defaults around the given backend entries (YAML list items).
pub fn config(backends: &[String], extra: &str) -> String {
    let mut s = String::from("listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n");
    for b in backends {
        s.push_str(&format!("  - url: \"{b}\"\n"));
    }
    s.push_str("health_check: { interval: 1s, path: /health, timeout: 500ms }\n");
    s.push_str(extra);
    s
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For chunked bodies: each chunk's data and when it arrived.
    pub chunks: Vec<(Instant, Vec<u8>)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI-shaped error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {}", self.text());
        assert!(v["error"]["message"].is_string());
        assert!(v["error"]["type"].is_string());
        assert!(self.header("x-request-id").is_some());
    }
}

/// A client connection that reads responses one by one (keep-alive, pipelining).
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("write request");
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return n;
                }
                // A signal to the test process (a child exiting) is not the server's doing.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return 0,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads one response; `head_only` for responses to HEAD.
    pub fn read_response_for(&mut self, head_only: bool) -> Response {
        let (status, headers, consumed) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf).expect("valid response head") {
                httparse::Status::Complete(n) => {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (r.code.unwrap_or(0), headers, n);
                }
                httparse::Status::Partial => {
                    if self.fill() == 0 {
                        panic!(
                            "connection closed before a response head; got {:?}",
                            String::from_utf8_lossy(&self.buf)
                        );
                    }
                }
            }
        };
        self.buf.drain(..consumed);
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
        };
        if status == 100 {
            return resp;
        }
        if head_only || status == 204 || status == 304 {
            return resp;
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    if self.fill() == 0 {
                        panic!("EOF inside chunked body");
                    }
                };
                let size_str = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if self.fill() == 0 {
                        panic!("EOF inside chunk");
                    }
                }
                let data: Vec<u8> = self.buf.drain(..size).collect();
                assert_eq!(&self.buf[..2], b"\r\n", "chunk terminator");
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
                resp.body.extend_from_slice(&data);
                resp.chunks.push((Instant::now(), data));
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                if self.fill() == 0 {
                    panic!("EOF inside body");
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            while self.fill() > 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    pub fn read_response(&mut self) -> Response {
        self.read_response_for(false)
    }

    /// Sends `raw` and reads its response.
    pub fn read_response_after(&mut self, raw: &[u8]) -> Response {
        self.send(raw);
        self.read_response()
    }

    /// Reads raw bytes until the server closes the connection; panics if that takes longer than
    /// `limit` (a hang).
    pub fn read_until_closed(&mut self, limit: Duration) -> String {
        let start = Instant::now();
        self.stream.set_read_timeout(Some(limit)).expect("timeout");
        let mut all = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 8192];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("connection still open after {:?}: {e}", start.elapsed()),
            }
            assert!(start.elapsed() < limit, "the response never ends");
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    /// True if the server closed the connection (EOF) within `timeout`.
    pub fn is_closed(&mut self, timeout: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut tmp = [0u8; 1024];
        let closed = matches!(self.stream.read(&mut tmp), Ok(0) | Err(_));
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(20)));
        closed
    }
}

pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw.as_bytes());
    c.read_response()
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

pub fn post_json(addr: SocketAddr, path: &str, body: &str, headers: &[(&str, &str)]) -> Response {
    let mut c = Client::connect(addr);
    c.send(post_raw(path, body, headers, true).as_bytes());
    c.read_response()
}

pub fn post_raw(path: &str, body: &str, headers: &[(&str, &str)], close: bool) -> String {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        raw.push_str("Connection: close\r\n");
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    raw
}

/// The value of the first line of the proxy's `/metrics` that starts with `prefix`.
pub fn metric(proxy: &Proxy, prefix: &str) -> Option<f64> {
    get(proxy.addr, "/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sends `n` non-streamed chat requests one after another; every one must be answered 200.
pub fn chats_ok(addr: SocketAddr, n: usize) {
    for i in 0..n {
        let r = post_json(addr, "/v1/chat/completions", &chat_body(false, 1), &[]);
        assert_eq!(r.status, 200, "request {i} of {n}: {}", r.text());
    }
}

pub fn chat_body(stream: bool, tokens: u32) -> String {
    format!(
        r#"{{"model":"mock-model","stream":{stream},"max_tokens":{tokens},"messages":[{{"role":"user","content":"hello there proxy"}}]}}"#
    )
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
