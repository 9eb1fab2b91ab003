//! `llmproxy-healthcheck [URL]`: the container image's HEALTHCHECK probe.
//!
//! The runtime image is `scratch` (no shell, no curl, no wget), so the probe is this one file of
//! std-only Rust, compiled with `rustc` next to the proxy and statically linked like it. It sends
//! `GET URL` (default `http://127.0.0.1:8080/ready`, plain HTTP only) and exits 0 when the status is
//! 2xx, 1 otherwise — so a draining proxy (503) or one that does not answer within 2 s is unhealthy.
//! It prints the status line (or the error), which `docker inspect` shows in the health log.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:8080/ready";
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    match probe(&url) {
        Ok(status_line) => {
            println!("{url}: {status_line}");
            let code = status_line.split_whitespace().nth(1).unwrap_or("");
            if code.len() == 3 && code.starts_with('2') {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns the response's status line, e.g. `HTTP/1.1 200 OK`.
fn probe(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr_text = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {authority}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: llmproxy-healthcheck\r\n\
         Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut status_line = String::new();
    BufReader::new(stream)
        .read_line(&mut status_line)
        .map_err(|e| format!("read: {e}"))?;
    let status_line = status_line.trim_end().to_string();
    if !status_line.starts_with("HTTP/") {
        return Err(format!("not an HTTP response: {status_line:?}"));
    }
    Ok(status_line)
}
