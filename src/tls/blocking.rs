//! The blocking side's https (health checks, engine-metrics scrapes): a ureq agent with the
//! backend's own TLS settings, pinned to the backend's address, and the URL to ask it. The
//! URL names the verified server name (ureq verifies against the URL's host and sends it as
//! SNI), while the resolver sends the connection to the address the table holds.

use std::net::SocketAddr;

use super::ClientTls;

/// `builder` with TLS for `tls` and every name resolved to `addr`; `None` keeps it plain.
pub(crate) fn agent(
    builder: ureq::AgentBuilder,
    tls: Option<&ClientTls>,
    addr: SocketAddr,
) -> ureq::Agent {
    match tls {
        None => builder.build(),
        Some(t) => builder
            .tls_config(t.config.clone())
            .resolver(move |_: &str| Ok(vec![addr]))
            .build(),
    }
}

/// `http://ADDR/path`, or `https://SERVER_NAME:PORT/path` for a TLS backend.
pub(crate) fn url(tls: Option<&ClientTls>, addr: SocketAddr, path_and_query: &str) -> String {
    match tls {
        None => format!("http://{addr}{path_and_query}"),
        Some(t) => {
            let name = t.name();
            // An IP address as the name: brackets for IPv6, as a URL needs.
            let host = match name.parse::<std::net::Ipv6Addr>() {
                Ok(_) => format!("[{name}]"),
                Err(_) => name,
            };
            format!("https://{host}:{}{path_and_query}", addr.port())
        }
    }
}
