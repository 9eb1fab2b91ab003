//! Test scaffolding: a real `Worker` (core 0 of two) on a real backend table, with the channels
//! the other core, the control plane and the health thread would hold, so tests can play them.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::{PaddedCount, Shared, Worker};
use crate::auth::KeyStore;
use crate::backends::{desired, BackendTable, Registry};
use crate::capacity::{Capacity, ConnectionLimit};
use crate::config::Config;
use crate::control::{Broadcast, ControlMsg, HealthReport, PlaneMsg};
use crate::telemetry::metrics::Metrics;

pub(crate) fn config(urls: &[&str]) -> Arc<Config> {
    let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
    Arc::new(Config::with_backends("127.0.0.1:0".parse().unwrap(), &urls).unwrap())
}

pub(crate) fn registry(cfg: &Config, cores: usize) -> Registry {
    let statics = cfg
        .backends
        .iter()
        .map(|b| {
            (
                b.url.clone(),
                format!("{}:{}", b.host, b.port).parse().unwrap(),
            )
        })
        .collect();
    Registry::new(cores, desired(cfg, &statics, &Default::default()))
}

/// Core 0 of two, with the other core's inbox and the plane's receiver.
pub(crate) fn worker(
    table: Arc<BackendTable>,
) -> (Rc<Worker>, Sender<ControlMsg>, Receiver<PlaneMsg>) {
    let (w, inbox, plane, _health) = worker_and_health(table);
    (w, inbox, plane)
}

/// Also returns what the core sends to the health thread.
pub(crate) fn worker_and_health(
    table: Arc<BackendTable>,
) -> (
    Rc<Worker>,
    Sender<ControlMsg>,
    Receiver<PlaneMsg>,
    Receiver<HealthReport>,
) {
    // The real inboxes are dropped: the test plays the other core and the plane.
    let (peers, _inboxes) = Broadcast::new(2);
    let (plane_tx, plane_rx) = crossbeam_channel::bounded(16);
    let (health_tx, health_rx) = crossbeam_channel::bounded(16);
    let (usage_tx, _usage_rx) = crate::usage::channel();
    let shared = Arc::new(Shared {
        draining: AtomicBool::new(false),
        inflight: (0..2).map(|_| PaddedCount::default()).collect(),
        connections: (0..2).map(|_| PaddedCount::default()).collect(),
        metrics: Arc::new(Metrics::new(&table.config, 2, "test").unwrap()),
        plane: plane_tx,
        keys: Arc::new(KeyStore::new(&table.config.auth).unwrap()),
        connection_limit: ConnectionLimit::new(0),
        capacity: Capacity::from_config(&table.config),
    });
    let (self_tx, self_rx) = crossbeam_channel::bounded(64);
    let w = Worker::new(0, shared, self_rx, peers, health_tx, usage_tx, table);
    (Rc::new(w), self_tx, plane_rx, health_rx)
}

pub(crate) fn statics(urls: &[&str]) -> std::collections::HashMap<String, std::net::SocketAddr> {
    urls.iter()
        .map(|u| (u.to_string(), u["http://".len()..].parse().unwrap()))
        .collect()
}

/// Runs `f` to completion on a fresh single-threaded epoll runtime with timers.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    rt.block_on(f)
}

/// A streamed chat request as the cores see it: its parsed head and body.
pub(crate) fn streaming_chat() -> (crate::http1::head::Head, bytes::Bytes) {
    let raw = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 60\r\n\r\n";
    let mut buf = bytes::BytesMut::from(raw);
    let Ok(crate::http1::ParseStatus::Complete(head)) =
        crate::http1::head::Head::parse_request(&mut buf)
    else {
        panic!("head")
    };
    let body = bytes::Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#);
    (head, body)
}

/// Prints future sizes largest first (`-- --nocapture`) and returns the one named `pinned`.
pub(crate) fn report_sizes(sizes: &mut [(&str, usize)], pinned: &str) -> Option<usize> {
    sizes.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (name, size) in sizes.iter() {
        eprintln!("{size:>6}  {name}");
    }
    sizes.iter().find(|s| s.0 == pinned).map(|s| s.1)
}
