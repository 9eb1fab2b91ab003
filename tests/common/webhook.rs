//! A real billing-webhook receiver on loopback: records every POST (headers and body) and
//! answers as the test tells it (2xx, an error status, or a hang), so delivery, retries,
//! signatures and dead-lettering are tested over real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Post {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Answered with a 2xx (the sender may consider it delivered).
    pub accepted: bool,
}

impl Post {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// Read the request, then say nothing for this long.
    Hang(Duration),
}

struct State {
    posts: Vec<Post>,
    reply: Reply,
}

pub struct Webhook {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Webhook {
    pub fn start() -> Webhook {
        Webhook::start_on("127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(addr: SocketAddr) -> Webhook {
        let listener = TcpListener::bind(addr).expect("bind webhook");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            posts: Vec::new(),
            reply: Reply::Status(200),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        std::thread::spawn(move || serve(conn, &s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Webhook { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}/usage", self.addr)
    }

    pub fn reply(&self, r: Reply) {
        self.state.lock().unwrap().reply = r;
    }

    pub fn posts(&self) -> Vec<Post> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Waits (bounded) until at least `n` events arrived, then a little longer so that extra
    /// ones would show; returns them all.
    pub fn wait_events(&self, n: usize) -> Vec<serde_json::Value> {
        let start = std::time::Instant::now();
        while self.events().len() < n && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let got = self.events().len();
        assert!(got >= n, "expected {n} events, got {got}");
        std::thread::sleep(Duration::from_millis(100));
        self.events()
    }

    /// The `usage_hook` config section that delivers to this receiver, flushing every 50 ms.
    pub fn config_yaml(&self) -> String {
        format!(
            "usage_hook:\n  enabled: true\n  url: \"{}\"\n  flush_interval: 50ms\n",
            self.url()
        )
    }

    /// Waits until at least `n` events arrived (panics after `timeout`), then returns them all.
    pub fn wait_events_within(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let start = std::time::Instant::now();
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                start.elapsed() < timeout,
                "expected {n} usage events within {timeout:?}, got {}",
                events.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every event in an accepted POST, batches flattened, in arrival order.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for p in self.posts().into_iter().filter(|p| p.accepted) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.body) else {
                continue;
            };
            match v.get("events").and_then(|e| e.as_array()) {
                Some(list) => out.extend(list.iter().cloned()),
                None => out.push(v),
            }
        }
        out
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = Vec::new();
    loop {
        // Read one request (head + Content-Length body).
        let (head_len, headers, len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(0);
                break (n, headers, len);
            }
            let mut tmp = [0u8; 8192];
            match conn.read(&mut tmp) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(_) if !stop.load(Ordering::Relaxed) => continue,
                Err(_) => return,
            }
        };
        while buf.len() < head_len + len {
            let mut tmp = [0u8; 65536];
            match conn.read(&mut tmp) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(_) if !stop.load(Ordering::Relaxed) => continue,
                Err(_) => return,
            }
        }
        let body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);
        let reply = {
            let mut s = state.lock().unwrap();
            let accepted = matches!(s.reply, Reply::Status(c) if (200..300).contains(&c));
            s.posts.push(Post {
                headers,
                body,
                accepted,
            });
            s.reply
        };
        match reply {
            Reply::Status(code) => {
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{{}}"
                );
                if conn.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            Reply::Hang(d) => {
                std::thread::sleep(d);
                return;
            }
        }
    }
}
