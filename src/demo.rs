//! `llmproxy demo`: the whole product on loopback. Two simulated backends, the proxy in front of
//! them, and an in-process usage receiver that prints each usage event as it is delivered, so one
//! command shows streaming, routing and metering.
//!
//! The receiver is a plain blocking listener on its own thread (the proxy's usage delivery posts
//! to it over HTTP like to any billing endpoint); it is demo furniture, not a webhook server: one
//! request per connection, bodies up to 1 MiB, and it never fails the demo, only skips what it
//! cannot read.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

use llmproxy::config::{self, Config, HookFormat};
use llmproxy::mock;

/// The largest body the receiver reads.
const MAX_BODY: usize = 1 << 20;

/// The demo's config: two simulated backends, text logs, and usage posted one event at a time to
/// the receiver, promptly (a demo shows the event right after the answer).
pub(crate) fn config(port: u16) -> anyhow::Result<Config> {
    let mut backends = Vec::new();
    for _ in 0..2 {
        let handle = mock::spawn(mock::MockOptions {
            ttft: Duration::from_millis(150),
            token_delay: Duration::from_millis(40),
            ..mock::MockOptions::default()
        })
        .context("starting a simulated backend")?;
        backends.push(format!("http://{}", handle.addr));
    }
    let receiver = spawn_receiver().context("starting the usage receiver")?;
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cfg = Config::with_backends(listen, &backends)?;
    cfg.health_check.interval = Duration::from_secs(2);
    cfg.shutdown_grace = Duration::from_secs(5);
    cfg.logging.format = config::LogFormat::Text;
    cfg.usage_hook.enabled = true;
    cfg.usage_hook.url = Some(format!("http://{receiver}/usage"));
    cfg.usage_hook.format = HookFormat::Single;
    cfg.usage_hook.flush_interval = Duration::from_millis(100);
    println!(
        "llmproxy demo: simulated backends at {}; usage events go to http://{receiver}/usage",
        backends.join(", ")
    );
    Ok(cfg)
}

/// What to try, once the proxy's real address is known (`--port 0` picks one).
pub(crate) fn announce(addr: SocketAddr) {
    let base = format!("http://{addr}");
    println!("proxy on {base}; try (Ctrl-C to stop):\n");
    println!(
        "  curl -N {base}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"mock-model\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello there\"}}]}}'\n"
    );
    println!("  curl {base}/health\n");
    println!("  curl {base}/metrics\n");
    println!("each request's usage event (what a billing system receives) is printed below, as JSON, when it is delivered\n");
}

fn spawn_receiver() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("llmproxy-demo-usage".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = receive(conn) {
                    log::debug!("demo usage receiver: {e}");
                }
            }
        })?;
    Ok(addr)
}

/// Reads one POST, answers 200, prints its events.
fn receive(conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(MAX_BODY)];
    reader.read_exact(&mut body)?;
    (&conn).write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
    for event in events(&body) {
        println!("usage event: {event}");
    }
    Ok(())
}

/// The events of one delivery: a single event, or `{"events":[...]}` (batch format).
fn events(body: &[u8]) -> Vec<serde_json::Value> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => match o.remove("events") {
            Some(serde_json::Value::Array(list)) => list,
            Some(other) => {
                o.insert("events".into(), other);
                vec![serde_json::Value::Object(o)]
            }
            None => vec![serde_json::Value::Object(o)],
        },
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_batch_bodies_give_their_events() {
        assert_eq!(events(br#"{"event_id":"a"}"#).len(), 1);
        let batch = events(br#"{"events":[{"event_id":"a"},{"event_id":"b"}]}"#);
        assert_eq!(batch[1]["event_id"], "b");
        assert!(events(b"not json").is_empty());
    }
}
