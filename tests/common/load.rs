//! Steady background traffic for tests that change the proxy under load: a few client threads
//! sending short chat completions (one connection each, closed after the response) until told to
//! stop, recording every answer that is not a 200.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, threads: usize, stream: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok) = (stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let body = super::chat_body(stream, 2);
                        let r = std::panic::catch_unwind(|| {
                            super::post_json(addr, "/v1/chat/completions", &body, &[])
                        });
                        match r {
                            Ok(r)
                                if r.status == 200 && (!stream || r.text().contains("[DONE]")) =>
                            {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => errors.push(format!("{}: {}", r.status, r.text())),
                            Err(_) => errors.push("client panicked (connection failed)".into()),
                        }
                    }
                    errors
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients and asserts that nothing failed and at least `min_ok` succeeded.
    pub fn finish_clean(self, min_ok: u64) {
        let (ok, errors) = self.finish();
        assert!(
            errors.is_empty(),
            "{} failed requests under load, e.g. {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        assert!(ok >= min_ok, "only {ok} requests succeeded");
    }

    /// Stops the clients; returns (successes, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.threads {
            match t.join() {
                Ok(e) => errors.extend(e),
                Err(_) => errors.push("load thread panicked".into()),
            }
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}
