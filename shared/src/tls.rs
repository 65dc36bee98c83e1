//! TLS: the coordinator's certificate authority (rcgen), certificates for the server,
//! workers (from their CSR) and users, and the rustls/quinn configurations for mutual
//! TLS. A peer's name and role live in its certificate's subject (CN and OU), so the
//! coordinator learns who is calling from the handshake alone.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::wire::{Role, ALPN};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("{what} is not valid PEM")]
    Pem { what: String },
    #[error("{what} holds no certificate")]
    NoCertificate { what: String },
    #[error("{what} holds no private key")]
    NoKey { what: String },
    #[error("TLS configuration failed")]
    Rustls(#[source] rustls::Error),
    #[error("client certificate verifier failed")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("QUIC TLS configuration failed: {0}")]
    Quic(String),
    #[error("invalid certificate signing request")]
    Csr(#[source] rcgen::Error),
    #[error("invalid name `{0}`: use letters, digits, '.', '_' and '-'")]
    Name(String),
}

/// A certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The coordinator's certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

/// Names of peers go into certificates and logs: keep them plain.
pub fn validate_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::Name(name.to_string()))
    }
}

fn subject(name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::OrganizationName, "berth");
    dn
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = rcgen::date_time_ymd(2000, 1, 1)
        + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().saturating_sub(Duration::from_secs(946_684_800)));
    // Back-date an hour so small clock differences between hosts do not matter.
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(days as u64 * 86_400);
}

impl Ca {
    /// Makes a new CA (ECDSA P-256, ten years).
    pub fn generate(name: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
        params.distinguished_name = subject(&format!("berth CA {name}"), None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 3650);
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        let cert_pem = cert.pem();
        Ok(Ca { cert, key, cert_pem })
    }

    /// Loads a CA from its certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| TlsError::NoKey { what: "the CA key".into() })?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(|_| TlsError::Pem { what: "the CA certificate".into() })?;
        // Re-signing the parsed parameters yields an issuer with the same name and key,
        // which is all that signing needs; the original PEM stays the one we hand out.
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(Ca { cert, key, cert_pem: cert_pem.to_string() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The coordinator's server certificate: SANs for every name, localhost and 127.0.0.1.
    pub fn issue_server(&self, names: &[String]) -> Result<CertKey, TlsError> {
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for n in names {
            if !sans.contains(n) {
                sans.push(n.clone());
            }
        }
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::new(sans).map_err(TlsError::Generate)?;
        params.distinguished_name = subject("berth-coordinator", None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 3650);
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(TlsError::Generate)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A client certificate (key made here): for users, and for `berth dev`'s worker.
    pub fn issue_client(&self, name: &str, role: Role) -> Result<CertKey, TlsError> {
        validate_name(name)?;
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let params = client_params(name, role)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(TlsError::Generate)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a worker's CSR. Only its public key is taken from it: the name and role
    /// are the coordinator's decision.
    pub fn sign_csr(&self, csr_pem: &str, name: &str, role: Role) -> Result<String, TlsError> {
        validate_name(name)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::Csr)?;
        csr.params = client_params(name, role)?;
        let cert = csr.signed_by(&self.cert, &self.key).map_err(TlsError::Generate)?;
        Ok(cert.pem())
    }
}

fn client_params(name: &str, role: Role) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    params.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(|_| TlsError::Name(name.into()))?)];
    params.distinguished_name = subject(name, Some(role));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 825);
    Ok(params)
}

/// A new key and a CSR for `name` (the worker side of enrolment).
pub fn make_csr(name: &str) -> Result<(String, String), TlsError> {
    validate_name(name)?;
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(TlsError::Generate)?;
    params.distinguished_name = subject(name, Some(Role::Worker));
    let csr = params.serialize_request(&key).map_err(TlsError::Generate)?;
    let pem = csr.pem().map_err(TlsError::Generate)?;
    Ok((pem, key.serialize_pem()))
}

pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|_| TlsError::Pem { what: what.into() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes()).map_err(|_| TlsError::Pem { what: what.into() })?.ok_or_else(|| TlsError::NoKey { what: what.into() })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_pem, "the CA certificate")? {
        roots.add(c).map_err(TlsError::Rustls)?;
    }
    Ok(roots)
}

/// Streams a peer may have open at once on a connection to the coordinator: a client's
/// requests (one bi stream each; more wait for one to end), and a worker's output
/// streams until it registers (then `worker_uni_streams`). quinn sets up the state of
/// every stream a peer may open as the connection starts, so these limits are memory
/// that every connection, and every half-open handshake, costs: with 4,096 of each it
/// was about 0.5 MiB a connection.
pub const PEER_BI_STREAMS: u32 = 32;
pub const PEER_UNI_STREAMS: u32 = 16;
/// Requests an authenticated client may have open at once (raised from
/// `PEER_BI_STREAMS` once its certificate is checked): a harness's hundred trajectories
/// on one connection each hold an exec's stream, and a long exec must not make the
/// others wait.
pub const CLIENT_BI_STREAMS: u32 = 512;

/// Copies into and out of sessions a worker serves at once (streams the coordinator
/// opens to it).
pub const COPY_STREAMS: u32 = 8;

/// The output streams a registered worker with `slots` slots may have open at once:
/// one per running attempt, and as many again for streams still being read to their
/// end as the slot's next attempt starts, or sent again.
pub fn worker_uni_streams(slots: u32) -> u32 {
    slots.saturating_mul(2).saturating_add(8).clamp(PEER_UNI_STREAMS, 4096)
}

/// The transport settings; `bi` and `uni` are the streams the other side may open.
fn transport(idle: Duration, bi: u32, uni: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_concurrent_bidi_streams(bi.into());
    t.max_concurrent_uni_streams(uni.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

/// The coordinator's QUIC server config: TLS 1.3, ALPN `berth/1`, client certificates
/// from our CA verified when presented (a peer without one may only enrol).
pub fn server_config(ca_pem: &str, server: &CertKey) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone()).allow_unauthenticated().build().map_err(TlsError::Verifier)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(&server.cert_pem, "the server certificate")?, parse_key(&server.key_pem, "the server key")?)
        .map_err(TlsError::Rustls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport(Duration::from_secs(15), PEER_BI_STREAMS, PEER_UNI_STREAMS));
    Ok(sc)
}

/// A client or worker QUIC config trusting `ca_pem`, presenting `identity` if given.
pub fn client_config(ca_pem: &str, identity: Option<&CertKey>) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(parse_certs(&id.cert_pem, "the client certificate")?, parse_key(&id.key_pem, "the client key")?)
            .map_err(TlsError::Rustls)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    // The coordinator opens bi streams towards a worker only, one per copy into or
    // out of a session it holds (more wait for one to end).
    cc.transport_config(transport(Duration::from_secs(15), COPY_STREAMS, 0));
    Ok(cc)
}

/// The name and role in a peer's verified certificate; `None` without one.
pub fn peer_identity(conn: &quinn::Connection) -> Option<(String, Role)> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    identity_of(certs.first()?)
}

/// The name (CN) and role (OU) of a certificate this CA issued.
pub fn identity_of(der: &CertificateDer<'_>) -> Option<(String, Role)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let ou = subject.iter_organizational_unit().next()?.as_str().ok()?;
    Some((cn, Role::parse(ou)?))
}

/// A certificate's fingerprint: SHA-256 of its DER, in hex. The coordinator records
/// the one it issued for each worker name, so a certificate an enrolment replaced is
/// told apart from the current one though both carry the same name.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// The fingerprint of the first certificate in a PEM.
pub fn fingerprint_pem(pem: &str) -> Option<String> {
    parse_certs(pem, "certificate").ok()?.first().map(fingerprint)
}

/// The fingerprint of a peer's verified certificate; `None` without one.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(fingerprint)
}

/// Reads a certificate PEM's identity (for tools that hold the PEM, not a connection).
pub fn identity_of_pem(pem: &str) -> Option<(String, Role)> {
    let certs = parse_certs(pem, "certificate").ok()?;
    identity_of(certs.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_and_reloads() {
        let ca = Ca::generate("test").expect("ca");
        let user = ca.issue_client("alice", Role::Submitter).expect("user");
        assert_eq!(identity_of_pem(&user.cert_pem), Some(("alice".into(), Role::Submitter)));
        let again = Ca::load(ca.cert_pem(), &ca.key_pem()).expect("reload");
        let (csr, _key) = make_csr("gpu-01").expect("csr");
        let cert = again.sign_csr(&csr, "gpu-01", Role::Worker).expect("signed");
        assert_eq!(identity_of_pem(&cert), Some(("gpu-01".into(), Role::Worker)));
        assert!(server_config(ca.cert_pem(), &ca.issue_server(&["head".into()]).expect("server")).is_ok());
        assert!(client_config(ca.cert_pem(), Some(&user)).is_ok());
        let (csr2, _) = make_csr("gpu-01").expect("csr");
        let cert2 = again.sign_csr(&csr2, "gpu-01", Role::Worker).expect("signed");
        let (fp, fp2) = (fingerprint_pem(&cert).expect("fp"), fingerprint_pem(&cert2).expect("fp"));
        assert_eq!(fp.len(), 64);
        assert_ne!(fp, fp2, "two enrolments of one name have different fingerprints");
        assert_eq!(fingerprint_pem(&cert), Some(fp), "stable");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Ca::load("junk", "junk").is_err());
        let ca = Ca::generate("t").expect("ca");
        assert!(ca.sign_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "w", Role::Worker).is_err());
        assert!(ca.issue_client("bad name!", Role::Admin).is_err());
        assert!(client_config("not pem", None).is_err());
    }
}
