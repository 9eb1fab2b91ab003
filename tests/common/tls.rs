//! Certificates made at test time (rcgen), a blocking TLS client, and a TLS-terminating
//! forwarder that puts rustls in front of a plain mock backend (an https backend for tests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses), valid from yesterday for `days`.
    pub fn leaf(&self, names: &[&str], days: i64) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + time::Duration::days(days);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert).unwrap();
        std::fs::write(&k, &self.key).unwrap();
        (c, k)
    }
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` verifying `name` against `ca_pem`, optionally with a client
/// certificate; the handshake is completed before returning.
pub fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    name: &str,
    client: Option<&Leaf>,
) -> std::io::Result<TlsStream> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let cfg = match client {
        Some(l) => b
            .with_client_auth_cert(
                chain(&l.cert),
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.set_nodelay(true)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    // TLS 1.3: a refused client certificate shows as an alert on the first read, not here.
    Ok(s)
}

/// The leaf certificate the server presented, as DER.
pub fn peer_cert(s: &TlsStream) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// An https backend for tests: terminates TLS with `leaf` (requiring client certificates from
/// `client_ca` when given) and pipes each connection to the plain backend at `to`.
pub struct Forwarder {
    pub addr: SocketAddr,
    /// Handshakes that completed.
    pub handshakes: Arc<AtomicUsize>,
    /// Of those, the ones that resumed an earlier session (no certificate exchange).
    pub resumed: Arc<AtomicUsize>,
}

impl Forwarder {
    pub fn start(leaf: &Leaf, client_ca: Option<&str>, to: SocketAddr) -> Forwarder {
        let b = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = match client_ca {
            Some(ca) => b.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)),
                    provider(),
                )
                .build()
                .unwrap(),
            ),
            None => b.with_no_client_auth(),
        };
        let cfg = Arc::new(
            b.with_single_cert(
                chain(&leaf.cert),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let resumed = Arc::new(AtomicUsize::new(0));
        let counts = (handshakes.clone(), resumed.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let cfg = cfg.clone();
                let counts = counts.clone();
                std::thread::spawn(move || serve(tcp, cfg, to, counts));
            }
        });
        Forwarder {
            addr,
            handshakes,
            resumed,
        }
    }
}

fn serve(
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    to: SocketAddr,
    (count, resumed): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) {
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        resumed.fetch_add(1, Ordering::SeqCst);
    }
    let Ok(up) = TcpStream::connect(to) else {
        return;
    };
    let _ = up.set_nodelay(true);
    // One thread per direction would need the TLS stream twice; poll both ways instead.
    let _ = tls.sock.set_read_timeout(Some(Duration::from_millis(5)));
    let _ = up.set_read_timeout(Some(Duration::from_millis(5)));
    let mut up_r = up.try_clone().unwrap();
    let mut up_w = up;
    let mut buf = vec![0u8; 16384];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if up_w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => return,
        }
        match up_r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tls.write_all(&buf[..n]).is_err() || tls.flush().is_err() {
                    return;
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => return,
        }
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
