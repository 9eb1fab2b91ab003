//! PEM files → rustls configs, checked the way an operator needs at startup and reload: every
//! error names the file; an expired certificate or a key that does not match it is refused.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// ALPN: the proxy speaks HTTP/1.1 on both sides.
const ALPN_HTTP11: &[u8] = b"http/1.1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: not a CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// The leaf certificate's notAfter, refusing one already expired.
fn check_leaf(path: &Path, leaf: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let not_after = not_after(leaf)
        .ok_or_else(|| format!("{}: cannot read the certificate's validity", path.display()))?;
    if not_after <= SystemTime::now() {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return Err(format!(
            "{}: the certificate expired (notAfter = {} s since the epoch)",
            path.display(),
            secs
        ));
    }
    Ok(not_after)
}

/// The server side of `listen`: the config new handshakes use, and when its certificate
/// expires. Built at config load; a reload builds a new one from the files.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) not_after: SystemTime,
}

impl ServerTls {
    pub(crate) fn load(
        cert: &Path,
        key_file: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, String> {
        let chain = certs(cert)?;
        let not_after = check_leaf(cert, &chain[0])?;
        let key = key(key_file)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            format!(
                "{} does not go with {}: {e}",
                key_file.display(),
                cert.display()
            )
        })?;
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            not_after,
        })
    }

    /// Seconds since the epoch when the serving certificate expires (the metrics gauge).
    pub fn expires_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// Equal when built from the same files with the same contents is not knowable cheaply; a
/// reload always builds anew, so two values are equal only if they are the same build.
impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}
impl Eq for ServerTls {}
impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("expires_unix", &self.expires_unix())
            .finish()
    }
}

/// How the proxy talks TLS to one backend entry: the rustls config (roots, client certificate,
/// session cache for resumption) and the name it verifies and sends as SNI.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
    /// The client certificate's notAfter, if one is configured.
    pub(crate) not_after: Option<SystemTime>,
}

impl ClientTls {
    pub(crate) fn load(
        host: &str,
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
        server_name: Option<&str>,
        insecure_skip_verify: bool,
    ) -> Result<Self, String> {
        let name = server_name.unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("\"{name}\" is not a valid server name: {e}"))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let builder = if insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        } else {
            let roots = match ca_file {
                Some(ca) => roots(ca)?,
                None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            };
            builder.with_root_certificates(roots)
        };
        let (mut config, not_after) = match (cert_file, key_file) {
            (Some(cert), Some(key_path)) => {
                let chain = certs(cert)?;
                let not_after = check_leaf(cert, &chain[0])?;
                let config = builder
                    .with_client_auth_cert(chain, key(key_path)?)
                    .map_err(|e| {
                        format!(
                            "{} does not go with {}: {e}",
                            key_path.display(),
                            cert.display()
                        )
                    })?;
                (config, Some(not_after))
            }
            (None, None) => (builder.with_no_client_auth(), None),
            _ => return Err("cert_file and key_file go together".to_string()),
        };
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
            not_after,
        })
    }

    /// When the client certificate expires (Unix seconds), if one is configured.
    pub(crate) fn expires_unix(&self) -> Option<u64> {
        self.not_after
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    /// The name verified and sent as SNI.
    pub(crate) fn name(&self) -> String {
        self.server_name.to_str().into_owned()
    }
}

/// As for `ServerTls`: a reload reads the files again and builds anew, so equal means the same
/// build (a reload therefore lists every https backend as updated, and its new client is used).
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}
impl Eq for ClientTls {}
impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.name())
            .finish()
    }
}

/// `insecure_skip_verify: true`: accepts any server certificate (signatures are still checked,
/// so the session is encrypted, just not authenticated). Logged loudly at startup.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate's notAfter, read from its DER: Certificate → tbsCertificate → validity. Only
/// what this needs of X.509: the outer SEQUENCEs, the optional [0] version, then skipping
/// serial, signature and issuer.
fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (tag, cert, _) = der(cert.as_ref())?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        let (_, _, after) = der(rest)?;
        rest = after;
    }
    let (tag, validity, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after) = der(validity)?;
    let (tag, time, _) = der(after)?;
    parse_time(tag, time)
}

/// One DER element: (tag, contents, the rest after it).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((tag, b.get(start..end)?, b.get(end..)?))
}

/// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ).
fn parse_time(tag: u8, t: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(t).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    let days = days_from_civil(year, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn not_after_is_read_from_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let t = not_after(cert.der()).unwrap();
        let days = t.duration_since(UNIX_EPOCH).unwrap().as_secs() / 86_400;
        assert_eq!(days as i64, days_from_civil(2031, 5, 17));
    }
}
