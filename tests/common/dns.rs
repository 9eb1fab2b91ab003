//! A tiny DNS server on 127.0.0.1 (UDP) whose answer the test changes: every A question gets the
//! current address list (whatever the name), AAAA questions get no records. It can also fail
//! (SERVFAIL) or go silent (the resolver is down). Stopped when dropped.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Answer {
    Addrs(Vec<Ipv4Addr>),
    ServFail,
    Silent,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(answer: Answer) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let answer = Arc::new(Mutex::new(answer));
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, queries, stop) = (answer.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::Relaxed);
                    let current = answer.lock().unwrap().clone();
                    if let Some(reply) = respond(&buf[..n], &current) {
                        let _ = sock.send_to(&reply, peer);
                    }
                }
            })
        };
        DnsServer {
            addr,
            answer,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to one query, or `None` to stay silent.
fn respond(q: &[u8], answer: &Answer) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // End of the question: the name's labels, then type and class.
    let mut at = 12;
    while *q.get(at)? != 0 {
        at += 1 + usize::from(q[at]);
    }
    let qtype = u16::from_be_bytes([*q.get(at + 1)?, *q.get(at + 2)?]);
    let qend = at + 5;
    let question = q.get(12..qend)?;
    let (rcode, ips): (u16, Vec<Ipv4Addr>) = match answer {
        Answer::Silent => return None,
        Answer::ServFail => (2, Vec::new()),
        Answer::Addrs(ips) if qtype == 1 => (0, ips.clone()),
        Answer::Addrs(_) => (0, Vec::new()),
    };
    let mut r = q[..2].to_vec();
    r.extend_from_slice(&(0x8180u16 | rcode).to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    for ip in ips {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
