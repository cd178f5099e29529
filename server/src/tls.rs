//! TLS on every listener (rustls): HTTP, gRPC (ingest and Flight SQL) and PostgreSQL
//! (after its `SSLRequest`).
//!
//! One certificate and key (PEM files, `--tls-cert`, `--tls-key`) serve all three. The
//! files are watched: when either changes (cert-manager renewing a Kubernetes Secret), the
//! pair is read again and new connections get the new certificate, while open ones keep
//! theirs; a pair that does not load is logged and the previous one kept. With
//! `--tls-client-ca`, clients must present a certificate signed by one of its CAs (mTLS).
//!
//! ```text
//!  TcpListener ─▶ accept ─▶ handshake task (10 s at most) ─▶ channel ─▶ axum / tonic
//!                                  ▲ Tls::acceptor(ALPN)
//!                                  └ ReloadingCert ◀── files polled every 2 s
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate and key files are looked at.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Where the certificate, key and (optionally) client CAs are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Why TLS cannot be set up; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("the key in {path} cannot sign: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client CA bundle {path} is not usable: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto Kiln's TLS uses everywhere (servers and clients).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// TLS for a gRPC client (a querier calling ingesters, trace export, the CLI): trusting
/// only the CAs of the PEM file `ca` (given as `flag`) if there is one, else the public
/// roots built in.
pub fn grpc_client(
    ca: Option<&Path>,
    flag: &str,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    let tls = tonic::transport::ClientTlsConfig::new();
    Ok(match ca {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read {flag} {}: {e}", ca.display()))?;
            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => tls.with_enabled_roots(),
    })
}

/// Reads every certificate of a PEM file.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The certificate chain and key of `files`, ready to serve.
fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, Error> {
    let certs = certificates(&files.cert)?;
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| Error::NoKey {
        path: files.key.clone(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| Error::Key {
            path: files.key.clone(),
            source,
        })?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

/// When a file last changed (and its size), to notice replacements.
type Stamp = Option<(SystemTime, u64)>;

/// The stamps of the certificate and key files.
type Stamps = [Stamp; 2];

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The current certificate, swapped when its files change.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<(Arc<CertifiedKey>, Stamps)>,
}

impl ReloadingCert {
    fn stamps(&self) -> Stamps {
        [stamp(&self.files.cert), stamp(&self.files.key)]
    }

    /// Loads the files again if they changed since the last look.
    fn reload_if_changed(&self) {
        let stamps = self.stamps();
        if self.current.read().1 == stamps {
            return;
        }
        match certified_key(&self.files) {
            Ok(key) => {
                *self.current.write() = (key, stamps);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Keep serving the previous pair; look again next time.
                tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the previous ones");
                self.current.write().1 = stamps;
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().0))
    }
}

/// TLS for the server's listeners (see the module docs).
#[derive(Debug, Clone)]
pub struct Tls {
    cert: Arc<ReloadingCert>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl Tls {
    /// Loads `files`; every problem is an error naming the file.
    pub fn load(files: TlsFiles) -> Result<Self, Error> {
        let key = certified_key(&files)?;
        let client_verifier = match &files.client_ca {
            None => None,
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(path)? {
                    roots.add(cert).map_err(|e| Error::ClientCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| Error::ClientCa {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                Some(verifier)
            }
        };
        let cert = Arc::new(ReloadingCert {
            current: RwLock::new((key, [None, None])),
            files,
        });
        let stamps = cert.stamps();
        cert.current.write().1 = stamps;
        Ok(Self {
            cert,
            client_verifier,
        })
    }

    /// Looks at the certificate files every [`RELOAD_INTERVAL`] until `stop`.
    pub fn watch(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let cert = Arc::clone(&self.cert);
        tokio::spawn(async move {
            let stopped = crate::serve::stopped(stop);
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(RELOAD_INTERVAL) => {
                        let cert = Arc::clone(&cert);
                        let _ = tokio::task::spawn_blocking(move || cert.reload_if_changed()).await;
                    }
                }
            }
        });
    }

    /// An acceptor offering `alpn` (`h2`, `http/1.1`; none for PostgreSQL).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_verifier {
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&self.cert) as _);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Accepts TCP connections on `listener` and hands out those whose TLS handshake
/// succeeded; a slow or failed handshake holds up no other connection.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// [`incoming`] as an axum listener.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            connections: incoming(listener, acceptor),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
