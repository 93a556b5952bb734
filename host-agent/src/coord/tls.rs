//! TLS for the agent-to-agent service: rustls with the ring provider, certificates from
//! PEM files, and `hvmctl tls init`, which makes a small CA, a certificate per agent and
//! the shared token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(file: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| file_err(file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(file, e))?;
    if certs.is_empty() {
        return Err(file_err(file, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The server side: this agent's certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The server side with client certificates required: only clients whose certificate
/// chains to a CA in `ca` complete the handshake (NBD over TLS, as qemu-nbd and nbdkit
/// with `--tls-verify-peer`).
pub fn mutual_server_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| file_err(ca, e))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The client side: trust the CA certificate(s) in `ca`, and present the certificate
/// chain and key of `identity` (`(cert, key)`) to a server that asks for one (the
/// coordination service and NBD over TLS require it).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// The name the server's certificate must carry for `host` (a DNS name or an IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// The shared token in `file`: at least 16 characters once trimmed.
pub fn read_token(file: &Path) -> Result<String, TlsError> {
    let t = std::fs::read_to_string(file).map_err(|e| file_err(file, e))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(file_err(file, "the token is shorter than 16 characters"));
    }
    Ok(t)
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| file_err(path, e))
}

/// `hvmctl tls init DIR --host NAME...`: `ca.pem` (and `ca-key.pem`), for each host
/// `<host>.pem` and `<host>-key.pem` (a certificate for that name, signed by the CA, for
/// server and client use), the same as `console.pem` and `console-key.pem` for
/// `hvmctl backup`, and `token` (32 random bytes in hex). Returns the files written.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut written = Vec::new();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "hvm agents CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let p = dir.join("ca.pem");
    std::fs::write(&p, ca_cert.pem()).map_err(|e| file_err(&p, e))?;
    written.push(p);
    let p = dir.join("ca-key.pem");
    write_private(&p, &ca_key.serialize_pem())?;
    written.push(p);
    // `console`: the client certificate `hvmctl backup` presents to the agents.
    let console = "console".to_string();
    for host in hosts.iter().chain(std::iter::once(&console)) {
        let mut params = CertificateParams::new(vec![host.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.as_str());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let p = dir.join(format!("{host}.pem"));
        std::fs::write(&p, cert.pem()).map_err(|e| file_err(&p, e))?;
        written.push(p);
        let p = dir.join(format!("{host}-key.pem"));
        write_private(&p, &key.serialize_pem())?;
        written.push(p);
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| file_err(Path::new("getrandom(2)"), e))?;
    let token = hex::encode(raw);
    let p = dir.join("token");
    write_private(&p, &format!("{token}\n"))?;
    written.push(p);
    Ok(written)
}

pub use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// A blocking TLS stream over `tcp` (tests and tools speaking the protocol by hand).
pub fn stream(
    conn: ClientConnection,
    tcp: std::net::TcpStream,
) -> StreamOwned<ClientConnection, std::net::TcpStream> {
    StreamOwned::new(conn, tcp)
}
