//! A tiny DNS server on 127.0.0.1 (UDP, and TCP on the same port) whose answer the test changes:
//! every A question gets the current address list (whatever the name), AAAA questions get no
//! records. It can also fail (SERVFAIL), go silent (the resolver is down), or answer over UDP with
//! only the first address and the truncation bit set, the whole list over TCP (a large Service).
//! Stopped when dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Answer {
    Addrs(Vec<Ipv4Addr>),
    /// Over UDP, the first address and TC; over TCP, all of them.
    Truncated(Vec<Ipv4Addr>),
    ServFail,
    Silent,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    tcp_thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(answer: Answer) -> DnsServer {
        // UDP and TCP on the same port: a UDP port the kernel picked may be taken for TCP by
        // another test running at the same time, so a few ports are tried.
        let (sock, tcp) = (0..50)
            .find_map(|_| {
                let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
                let tcp = TcpListener::bind(sock.local_addr().expect("addr")).ok()?;
                Some((sock, tcp))
            })
            .expect("a port free for both UDP and TCP");
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
                    if let Some(reply) = respond(&buf[..n], &current, false) {
                        let _ = sock.send_to(&reply, peer);
                    }
                }
            })
        };
        tcp.set_nonblocking(true).expect("nonblocking");
        let tcp_thread = {
            let (answer, queries, stop) = (answer.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut len = [0u8; 2];
                    if conn.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut q).is_err() {
                        continue;
                    }
                    queries.fetch_add(1, Ordering::Relaxed);
                    let current = answer.lock().unwrap().clone();
                    if let Some(reply) = respond(&q, &current, true) {
                        let _ = conn.write_all(&(reply.len() as u16).to_be_bytes());
                        let _ = conn.write_all(&reply);
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
            tcp_thread: Some(tcp_thread),
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
        for t in [self.thread.take(), self.tcp_thread.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// The reply to one query, or `None` to stay silent.
fn respond(q: &[u8], answer: &Answer, over_tcp: bool) -> Option<Vec<u8>> {
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
    let mut tc = 0u16;
    let (rcode, ips): (u16, Vec<Ipv4Addr>) = match answer {
        Answer::Silent => return None,
        Answer::ServFail => (2, Vec::new()),
        Answer::Addrs(ips) if qtype == 1 => (0, ips.clone()),
        Answer::Truncated(ips) if qtype == 1 && over_tcp => (0, ips.clone()),
        Answer::Truncated(ips) if qtype == 1 => {
            tc = 0x0200;
            (0, ips.iter().take(1).copied().collect())
        }
        Answer::Addrs(_) | Answer::Truncated(_) => (0, Vec::new()),
    };
    let mut r = q[..2].to_vec();
    r.extend_from_slice(&(0x8180u16 | tc | rcode).to_be_bytes());
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
