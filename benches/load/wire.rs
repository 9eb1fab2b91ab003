//! What goes over the wire per request on each of the proxy's two hops, from the kernel's own
//! per-socket counters (`ss -tin`, iproute2: `segs_out`, `data_segs_in`, ...). The proxy's client
//! side is every socket on its listening port; its backend side every socket connected to the
//! mock's port (only the proxy connects there during a window). Read (`ss`, pinned to CPU 1)
//! near the window's start and end, each time with the mock's count of completed requests (the
//! end a little early: when the window closes the load generator drops its connections). A socket
//! opened in between counts whole, one closed in between is missed (the workloads keep theirs).
//!
//! The system-wide segment count (`TCP segments/req`) mixes four hops and both directions; this
//! splits it, so a difference between llmproxy and a C proxy shows on the hop where it is: how many
//! writes reach the client, how many ACKs the proxy sends its backend (issue 17's first question).
//! Without `ss` (or when it fails) the note is left out.

use std::collections::HashMap;
use std::process::{Command, Stdio};

/// One socket's counters.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct Counts {
    segs_out: u64,
    segs_in: u64,
    data_out: u64,
    data_in: u64,
}

impl Counts {
    fn since(self, before: Counts) -> Counts {
        Counts {
            segs_out: self.segs_out.saturating_sub(before.segs_out),
            segs_in: self.segs_in.saturating_sub(before.segs_in),
            data_out: self.data_out.saturating_sub(before.data_out),
            data_in: self.data_in.saturating_sub(before.data_in),
        }
    }

    fn add(&mut self, c: Counts) {
        self.segs_out += c.segs_out;
        self.segs_in += c.segs_in;
        self.data_out += c.data_out;
        self.data_in += c.data_in;
    }
}

/// One side's sockets, keyed by their two addresses.
type Side = HashMap<String, Counts>;

pub(crate) struct Snapshot {
    client: Side,
    backend: Side,
}

/// The proxy's sockets now: those on `listen_port`, those connected to `backend_port`.
pub(crate) fn snapshot(listen_port: u16, backend_port: u16) -> Option<Snapshot> {
    Some(Snapshot {
        client: side(&format!("sport = :{listen_port}"))?,
        backend: side(&format!("dport = :{backend_port}"))?,
    })
}

fn side(filter: &str) -> Option<Side> {
    // On the load side's CPU: the proxy's stays the proxy's.
    let out = Command::new("taskset")
        .args(["-c", "1", "ss", "-tinH", "state", "established", filter])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse(&String::from_utf8_lossy(&out.stdout)))
}

/// `ss -tinH state ...`: a line per socket (`Recv-Q Send-Q Local Peer`, the state column left out
/// under a state filter), then an indented line of its TCP information.
fn parse(text: &str) -> Side {
    let mut side = Side::new();
    let mut key: Option<String> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with(char::is_whitespace) {
            let f: Vec<&str> = line.split_whitespace().collect();
            key = (f.len() >= 4).then(|| format!("{} {}", f[2], f[3]));
        } else if let Some(k) = key.take() {
            side.insert(k, counts(line));
        }
    }
    side
}

fn counts(info: &str) -> Counts {
    let mut c = Counts::default();
    for field in info.split_whitespace() {
        let Some((name, value)) = field.split_once(':') else {
            continue;
        };
        let slot = match name {
            "segs_out" => &mut c.segs_out,
            "segs_in" => &mut c.segs_in,
            "data_segs_out" => &mut c.data_out,
            "data_segs_in" => &mut c.data_in,
            _ => continue,
        };
        *slot = value.parse().unwrap_or(0);
    }
    c
}

fn delta(before: &Side, after: &Side) -> Counts {
    let mut total = Counts::default();
    for (k, c) in after {
        total.add(c.since(before.get(k).copied().unwrap_or_default()));
    }
    total
}

/// Segments per completed request on each hop, seen from the proxy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PerRequest {
    from_client: f64,
    client_acks: f64,
    to_client: f64,
    acks_to_client: f64,
    to_backend: f64,
    acks_to_backend: f64,
    from_backend: f64,
    backend_acks: f64,
}

pub(crate) fn per_request(a: &Snapshot, b: &Snapshot, requests: u64) -> Option<PerRequest> {
    if requests == 0 {
        return None;
    }
    let n = requests as f64;
    let c = delta(&a.client, &b.client);
    let u = delta(&a.backend, &b.backend);
    let per = |v: u64| v as f64 / n;
    Some(PerRequest {
        from_client: per(c.data_in),
        client_acks: per(c.segs_in.saturating_sub(c.data_in)),
        to_client: per(c.data_out),
        acks_to_client: per(c.segs_out.saturating_sub(c.data_out)),
        to_backend: per(u.data_out),
        acks_to_backend: per(u.segs_out.saturating_sub(u.data_out)),
        from_backend: per(u.data_in),
        backend_acks: per(u.segs_in.saturating_sub(u.data_in)),
    })
}

impl PerRequest {
    /// The figures in a fixed order (`from_fields` takes them back): rounds fold each one into
    /// its median.
    pub(crate) fn fields(&self) -> [f64; 8] {
        [
            self.from_client,
            self.client_acks,
            self.to_client,
            self.acks_to_client,
            self.to_backend,
            self.acks_to_backend,
            self.from_backend,
            self.backend_acks,
        ]
    }

    pub(crate) fn from_fields(f: [f64; 8]) -> PerRequest {
        PerRequest {
            from_client: f[0],
            client_acks: f[1],
            to_client: f[2],
            acks_to_client: f[3],
            to_backend: f[4],
            acks_to_backend: f[5],
            from_backend: f[6],
            backend_acks: f[7],
        }
    }

    /// One line for the run's notes: data segments and pure ACKs, each way, on each hop.
    pub(crate) fn note(&self) -> String {
        let [from_client, client_acks, to_client, acks_to_client, to_backend, acks_to_backend, from_backend, backend_acks] =
            self.fields();
        format!(
            "segments/req by hop (data + ACKs): client→proxy {from_client:.1} + {client_acks:.1}, \
             proxy→client {to_client:.1} + {acks_to_client:.1}; proxy→backend {to_backend:.1} + \
             {acks_to_backend:.1}, backend→proxy {from_backend:.1} + {backend_acks:.1}"
        )
    }
}

/// Run by `cargo test --benches` and `.ci/run` (the bench binary without `--bench`): parsing of
/// `ss` output and the per-request arithmetic, including a socket that appeared in the window.
pub(crate) fn self_check() {
    let before = parse(
        "0      0      127.0.0.1:38117 127.0.0.1:43522\n\
         \t bbr wscale:10,10 rto:204 segs_out:100 segs_in:40 data_segs_out:100 data_segs_in:10 \
         lastsnd:1\n",
    );
    let after = parse(
        "0      0      127.0.0.1:38117 127.0.0.1:43522\n\
         \t bbr rto:204 segs_out:1100 segs_in:460 data_segs_out:1095 data_segs_in:110\n\
         572    0      127.0.0.1:38117 127.0.0.1:43600\n\
         \t cubic segs_out:50 segs_in:20 data_segs_out:50 data_segs_in:10\n",
    );
    assert_eq!(after.len(), 2, "{after:?}");
    let up_before = parse("");
    let up_after = parse(
        "0 0 127.0.0.1:50000 127.0.0.1:46605\n\t segs_out:1000 segs_in:2200 data_segs_out:110 \
         data_segs_in:2190\n",
    );
    let a = Snapshot {
        client: before,
        backend: up_before,
    };
    let b = Snapshot {
        client: after,
        backend: up_after,
    };
    let r = per_request(&a, &b, 110).unwrap_or_else(|| panic!("no figures"));
    let want = PerRequest {
        from_client: 1.0,
        client_acks: 3.0,
        to_client: 9.5,
        acks_to_client: 5.0 / 110.0,
        to_backend: 1.0,
        acks_to_backend: 890.0 / 110.0,
        from_backend: 2190.0 / 110.0,
        backend_acks: 10.0 / 110.0,
    };
    let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
    assert!(
        r.fields()
            .iter()
            .zip(want.fields())
            .all(|(x, y)| close(*x, y)),
        "{r:?} != {want:?}"
    );
    assert_eq!(PerRequest::from_fields(r.fields()), r);
    assert!(per_request(&a, &b, 0).is_none());
    assert!(r.note().starts_with("segments/req by hop"), "{}", r.note());
    eprintln!("load benchmark: wire self-check passed");
}
