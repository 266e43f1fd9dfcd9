//! Mutual TLS for migrations (rustls, aws-lc-rs, with a post-quantum key exchange preferred): each side presents a certificate signed by the
//! CA the other trusts (`--tls-cert`, `--tls-key`, `--tls-ca`). The receiver requires a
//! client certificate and completes the handshake before it reads a byte of the protocol,
//! so a peer without a valid certificate is dropped before any payload is read; the source
//! checks that the receiver's certificate names the host it dialled (a DNS name or an IP
//! address in its subjectAltName).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::StreamOwned;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A connection the protocol runs over: plain TCP or TLS.
pub trait Conn: Read + Write + Send {}

impl<T: Read + Write + Send> Conn for T {}

/// A connection read through a buffer (writes go straight through).
pub struct ReadBuffered<C: Read + Write>(std::io::BufReader<C>);

impl<C: Read + Write> ReadBuffered<C> {
    pub fn new(conn: C) -> Self {
        ReadBuffered(std::io::BufReader::with_capacity(256 << 10, conn))
    }
}

impl<C: Read + Write> Read for ReadBuffered<C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<C: Read + Write> Write for ReadBuffered<C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// The three files of one side.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates the peer's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// Why TLS could not be set up or the peer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake with {peer} failed: {what}")]
    Handshake { peer: String, what: String },
}

fn file_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in it"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// The source's configuration: its certificate, and the CA the receiver's must chain to.
pub fn client_config(f: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&f.ca)?)
        .with_client_auth_cert(certs(&f.cert)?, key(&f.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The receiver's configuration: its certificate, and a client certificate required,
/// chaining to its CA.
pub fn server_config(f: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&f.ca)?), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&f.cert)?, key(&f.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Completes the handshake of `conn` over `tcp` before anything else is read or written.
fn handshake<C, S>(conn: &mut C, tcp: &mut TcpStream, peer: &str) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(tcp).map_err(|e| TlsError::Handshake {
            peer: peer.to_string(),
            what: e.to_string(),
        })?;
    }
    Ok(())
}

/// The source's side: TLS over `tcp` to `host` (the name its certificate must carry).
pub fn connect(
    mut tcp: TcpStream,
    host: &str,
    cfg: Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Config(format!("{host}: {e}")))?;
    let mut conn = ClientConnection::new(cfg, name).map_err(|e| TlsError::Config(e.to_string()))?;
    handshake(&mut conn, &mut tcp, host)?;
    Ok(StreamOwned::new(conn, tcp))
}

/// The receiver's side: TLS over `tcp`, the client's certificate verified.
pub fn accept(
    mut tcp: TcpStream,
    peer: &str,
    cfg: Arc<ServerConfig>,
) -> Result<StreamOwned<ServerConnection, TcpStream>, TlsError> {
    let mut conn = ServerConnection::new(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    handshake(&mut conn, &mut tcp, peer)?;
    Ok(StreamOwned::new(conn, tcp))
}
