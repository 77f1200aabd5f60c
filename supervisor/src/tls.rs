//! TCP with mutual TLS, for remote plugins and the registry: rustls with
//! the ring provider, certificates and keys read from PEM files, and
//! refusals that say which check failed (unknown CA, expired, wrong
//! identity, a peer that refused our certificate, plaintext).
//!
//! The supervisor is a TLS client of remote plugins (it presents its client
//! certificate and checks the plugin's against the manifest's CA and
//! identity) and a TLS server for the registry (it requires a client
//! certificate signed by the registry's CA).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";
/// The first byte of every TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A certificate or key that could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
}

/// The three files of one side of mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain this side presents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
}

/// Why a TLS connection was refused, as precisely as the handshake says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the peer's certificate is not signed by the trusted CA (unknown issuer)")]
    UnknownCa,
    #[error("the peer's certificate has expired{}", at(.not_after, "not after"))]
    Expired { not_after: Option<String> },
    #[error("the peer's certificate is not valid yet{}", at(.not_before, "not before"))]
    NotYetValid { not_before: Option<String> },
    #[error("the peer's certificate is for {presented}, not the expected identity `{expected}`")]
    WrongIdentity { expected: String, presented: String },
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer refused our certificate: {0}")]
    RefusedByPeer(String),
    #[error("the peer does not speak TLS: {0}")]
    Plaintext(String),
    #[error("the TLS handshake failed: {0}")]
    Other(String),
}

impl Rejection {
    /// A short label for events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::UnknownCa => "unknown_ca",
            Rejection::Expired { .. } => "expired",
            Rejection::NotYetValid { .. } => "not_yet_valid",
            Rejection::WrongIdentity { .. } => "wrong_identity",
            Rejection::NoCertificate => "no_certificate",
            Rejection::RefusedByPeer(_) => "refused_by_peer",
            Rejection::Plaintext(_) => "plaintext",
            Rejection::Other(_) => "tls",
        }
    }
}

fn at(time: &Option<String>, what: &str) -> String {
    time.as_ref()
        .map(|t| format!(" ({what} {t})"))
        .unwrap_or_default()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM `CERTIFICATE` block in it".into()));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::File {
            what: "CA certificate",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A certificate and key that rustls will not present together.
fn mismatched(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::Config(format!(
        "certificate {} and key {} do not go together: {e}",
        files.cert.display(),
        files.key.display()
    ))
}

/// The client side: trusts `files.ca` only and presents `files.cert`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(&files.ca)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Config(format!("CA {}: {e}", files.ca.display())))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(
            load_certs(&files.cert, "certificate")?,
            load_key(&files.key)?,
        )
        .map_err(|e| mismatched(files, e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The server side: requires a client certificate signed by `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&files.ca)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Config(format!("CA {}: {e}", files.ca.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&files.cert, "certificate")?,
            load_key(&files.key)?,
        )
        .map_err(|e| mismatched(files, e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The identity a peer's certificate must carry: a DNS name or an IP
/// address, as a SAN.
pub fn server_name(identity: &str) -> Result<ServerName<'static>, String> {
    if let Ok(ip) = identity.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(identity.to_string())
        .map_err(|_| format!("`{identity}` is neither a DNS name nor an IP address"))
}

/// Why a connection to a remote peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Nothing accepted the TCP connection (refused, unreachable, timeout).
    #[error("cannot connect to {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// The TLS handshake refused the peer, or the peer refused us.
    #[error("TLS with {address} refused: {rejection}")]
    Tls {
        address: String,
        rejection: Rejection,
    },
}

/// Connects to `address` and does the TLS handshake, checking the peer's
/// certificate against the CA and `identity`. Each step has `timeout`.
pub async fn connect(
    address: &str,
    identity: &ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let unreachable = |reason: String| ConnectError::Unreachable {
        address: address.to_string(),
        reason,
    };
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {}ms",
                timeout.as_millis()
            )));
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls_err = |rejection| ConnectError::Tls {
        address: address.to_string(),
        rejection,
    };
    match tokio::time::timeout(timeout, connector.connect(identity.clone(), tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(tls_err(classify_io(&e))),
        Err(_) => Err(tls_err(Rejection::Other(format!(
            "no TLS handshake within {}ms (is the peer a TLS server?)",
            timeout.as_millis()
        )))),
    }
}

/// Why an incoming connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("refused a connection from {peer}: {rejection}")]
pub struct AcceptError {
    pub peer: String,
    pub rejection: Rejection,
}

/// Accepts one TLS connection, refusing plaintext before the handshake
/// (with the first bytes quoted) and giving the whole handshake `timeout`
/// (a client that connects and says nothing is dropped).
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, AcceptError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "an unknown peer".into());
    let refuse = |rejection| AcceptError {
        peer: peer.clone(),
        rejection,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let mut first = [0u8; 16];
        let n = tcp
            .peek(&mut first)
            .await
            .map_err(|e| Rejection::Other(format!("cannot read: {e}")))?;
        if n == 0 {
            return Err(Rejection::Other("closed before the TLS handshake".into()));
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Err(Rejection::Plaintext(format!(
                "a plaintext client on a TLS port (its first bytes: {:?})",
                String::from_utf8_lossy(&first[..n])
            )));
        }
        acceptor.accept(tcp).await.map_err(|e| classify_io(&e))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(rejection)) => Err(refuse(rejection)),
        Err(_) => Err(refuse(Rejection::Other(format!(
            "no TLS handshake within {}ms",
            timeout.as_millis()
        )))),
    }
}

/// The rejection a TLS I/O error carries.
pub fn classify_io(e: &std::io::Error) -> Rejection {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return classify(tls);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            Rejection::Other(format!(
                "the peer closed the connection during the handshake ({e}); is it a TLS port?"
            ))
        }
        _ => Rejection::Other(e.to_string()),
    }
}

/// The rejection somewhere in an error's chain of sources (a failed call's
/// status, hyper's error, the I/O error, rustls's), if any.
pub fn find_rejection(e: &(dyn std::error::Error + 'static)) -> Option<Rejection> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(classify(tls));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(classify(tls));
        }
        // h2 shows an I/O error's text but, as its source, skips to the
        // source of the error inside (rustls's has none): read the alert
        // from the text.
        if let Some(alert) = err.to_string().split("received fatal alert: ").nth(1) {
            let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next();
            return Some(Rejection::RefusedByPeer(alert_named(name.unwrap_or(alert))));
        }
        next = err.source();
    }
    None
}

fn alert_named(name: &str) -> String {
    use rustls::AlertDescription as A;
    let known = [
        A::UnknownCA,
        A::CertificateExpired,
        A::CertificateRequired,
        A::BadCertificate,
        A::CertificateUnknown,
        A::DecryptError,
        A::HandshakeFailure,
    ];
    match known.into_iter().find(|a| format!("{a:?}") == name) {
        Some(alert) => alert_text(alert),
        None => format!("alert {name}"),
    }
}

/// The rejection a rustls error means.
pub fn classify(e: &rustls::Error) -> Rejection {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => Rejection::UnknownCa,
            C::Expired => Rejection::Expired { not_after: None },
            C::ExpiredContext { not_after, .. } => Rejection::Expired {
                not_after: Some(utc(*not_after)),
            },
            C::NotValidYet => Rejection::NotYetValid { not_before: None },
            C::NotValidYetContext { not_before, .. } => Rejection::NotYetValid {
                not_before: Some(utc(*not_before)),
            },
            C::NotValidForNameContext {
                expected,
                presented,
            } => Rejection::WrongIdentity {
                expected: name_text(expected),
                presented: presented_text(presented),
            },
            C::NotValidForName => Rejection::WrongIdentity {
                expected: "(the expected name)".into(),
                presented: "other names".into(),
            },
            other => Rejection::Other(format!("invalid certificate: {other:?}")),
        },
        rustls::Error::NoCertificatesPresented => Rejection::NoCertificate,
        rustls::Error::AlertReceived(alert) => Rejection::RefusedByPeer(alert_text(*alert)),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Rejection::Plaintext(format!(
                "it answered with something that is not TLS ({e}); is it a plaintext server?"
            ))
        }
        other => Rejection::Other(other.to_string()),
    }
}

fn alert_text(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match alert {
        A::UnknownCA => "it does not trust the CA that signed it (unknown_ca)".into(),
        A::CertificateExpired => "it has expired (certificate_expired)".into(),
        A::CertificateRequired => "none was presented (certificate_required)".into(),
        A::BadCertificate => "bad_certificate".into(),
        A::CertificateUnknown => "certificate_unknown".into(),
        other => format!("alert {other:?}"),
    }
}

pub(crate) fn name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn presented_text(presented: &[String]) -> String {
    if presented.is_empty() {
        "no DNS or IP SAN".into()
    } else {
        presented
            .iter()
            .map(|p| format!("`{}`", bare_name(p)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// webpki lists names as `DnsName("x")` or `IpAddress(..)`: the bare name.
fn bare_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|s| s.strip_suffix("\")"))
        .unwrap_or(presented)
}

/// Checks that a verified peer certificate carries `name` as a DNS SAN
/// (exactly: no wildcard stands in for a plugin name).
pub fn certificate_allows(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot read the peer's certificate: {e}"))?;
    let wanted = ServerName::try_from(name.to_string())
        .map_err(|_| format!("`{name}` cannot be a DNS SAN"))?;
    match parsed.verify_is_valid_for_subject_name(&wanted) {
        Ok(()) => {
            if only_through_wildcard(&parsed, name) {
                Err(format!(
                    "the certificate allows `{name}` only through a wildcard SAN; a plugin name must be an exact DNS SAN"
                ))
            } else {
                Ok(())
            }
        }
        Err(webpki::Error::CertNotValidForName(ctx)) => Err(format!(
            "the peer's certificate does not allow the name `{name}`: it carries {}, and the name must be one of its DNS SANs",
            presented_text(&ctx.presented)
        )),
        Err(e) => Err(format!(
            "the peer's certificate cannot be checked for `{name}`: {e}"
        )),
    }
}

/// Whether `name` matched only through a wildcard: checked by asking for a
/// name no certificate would list exactly but a wildcard would cover.
fn only_through_wildcard(cert: &webpki::EndEntityCert<'_>, name: &str) -> bool {
    let Some((_, parent)) = name.split_once('.') else {
        return false;
    };
    let probe = format!("plugvisor-wildcard-probe.{parent}");
    ServerName::try_from(probe)
        .ok()
        .is_some_and(|p| cert.verify_is_valid_for_subject_name(&p).is_ok())
}

/// The DNS SANs of a certificate, as its error lists them (for showing who
/// registered a plugin).
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    // An IP no certificate is issued for: the error lists every SAN.
    let probe = ServerName::IpAddress(IpAddr::from([0, 0, 0, 0]).into());
    match parsed.verify_is_valid_for_subject_name(&probe) {
        Err(webpki::Error::CertNotValidForName(ctx)) => ctx
            .presented
            .iter()
            .map(|p| bare_name(p).to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// A UNIX time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(time: UnixTime) -> String {
    let secs = time.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_times_as_utc() {
        assert_eq!(
            utc(UnixTime::since_unix_epoch(Duration::ZERO)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            utc(UnixTime::since_unix_epoch(Duration::from_secs(
                1_709_210_096
            ))),
            "2024-02-29T12:34:56Z"
        );
    }

    fn cert_for(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_allows_exactly_its_dns_sans() {
        let cert = cert_for(&["echo", "kv_store"]);
        assert_eq!(certificate_allows(&cert, "echo"), Ok(()));
        assert_eq!(certificate_allows(&cert, "kv_store"), Ok(()));
        let e = certificate_allows(&cert, "other").unwrap_err();
        assert!(
            e.contains("`echo`, `kv_store`") && e.contains("`other`"),
            "{e}"
        );
        assert_eq!(dns_names(&cert), ["echo", "kv_store"]);
    }

    #[test]
    fn a_wildcard_san_does_not_stand_in_for_a_plugin_name() {
        let cert = cert_for(&["*.plugins.example"]);
        let e = certificate_allows(&cert, "echo.plugins.example").unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
    }

    #[test]
    fn a_peer_alert_in_an_error_text_is_read() {
        let e = std::io::Error::other("connection error: received fatal alert: UnknownCA");
        assert_eq!(
            find_rejection(&e),
            Some(Rejection::RefusedByPeer(
                "it does not trust the CA that signed it (unknown_ca)".into()
            ))
        );
    }

    #[test]
    fn identities_are_dns_names_or_ips() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("echo.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("not a name").is_err());
    }
}
