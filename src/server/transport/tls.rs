//! TLS on the gRPC port: the certificate and key (and, for mTLS, the CA that signs client
//! certificates) read from PEM files, and read again when they change.
//!
//! Why reloaded in place: cert-manager and similar tools rotate a certificate by rewriting
//! the files a Secret mounts (a symlink swap). Connections already open keep the session they
//! negotiated; every new handshake uses the files as they are now. A rewrite that does not
//! parse (a half-written file, a key that does not match) is refused with its reason in the
//! log and the previous configuration stays, so a bad rotation never takes the port down.
//! The files are polled (modification time and size, once a second), as the policy file is:
//! that works the same on every filesystem, symlink swaps included.
//!
//! Why rustls with the ring provider: rustls is the TLS stack tonic builds on, memory-safe,
//! with safe defaults (TLS 1.2 and 1.3 only, no renegotiation); ring needs no C toolchain
//! beyond `cc`. ALPN offers `h2` only: gRPC is HTTP/2.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for a change.
pub const TLS_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the port's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With mTLS: the CA certificates (PEM) that must sign every client's certificate.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{flag} {path}: {reason}")]
    File {
        /// The flag that names it.
        flag: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The files parsed but do not make a configuration (a key that is not the
    /// certificate's, a CA file with no usable certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The port's TLS configuration in force, and what it was read from.
pub struct TlsConfig {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' (modified, size) when last read.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Read the files once (at start: an error here stops the server).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamps = stamps(&files);
        let config = build(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        TlsAcceptor::from(config)
    }

    /// If any file changed since it was last read, read them all again: `None` when nothing
    /// changed, else whether the new configuration is in force (an error keeps the old one).
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        {
            let mut seen = self
                .stamps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *seen == now {
                return None;
            }
            // Marked as seen even if it fails: a broken file is reported once, not every
            // second, and read again when it changes again.
            *seen = now;
        }
        Some(build(&self.files).map(|config| {
            *self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        }))
    }
}

/// Poll `tls`'s files and put a changed set in force, logging each outcome.
pub fn spawn_reloader(tls: Arc<TlsConfig>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TLS_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let tls = tls.clone();
            let outcome = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
            match outcome {
                Ok(Some(Ok(()))) => {
                    tracing::info!("TLS: certificate files changed; new handshakes use them")
                }
                Ok(Some(Err(e))) => {
                    tracing::error!(error = %e, "TLS: the changed files are refused; the previous certificate stays in force")
                }
                Ok(None) | Err(_) => {}
            }
        }
    })
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    let stamp = |p: &Path| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let mut all = vec![stamp(&files.cert), stamp(&files.key)];
    if let Some(ca) = &files.client_ca {
        all.push(stamp(ca));
    }
    all
}

fn file_error(flag: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        flag,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// A server configuration from `files`.
fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = certificates("--tls-cert", &files.cert)?;
    // The key's bytes are never put in an error: only the file's name and what is wrong.
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        file_error(
            "--tls-key",
            &files.key,
            format!("no usable PEM private key ({e})"),
        )
    })?;
    // Deprecated in rustls for lacking post-quantum key exchange; the provider that has it
    // (aws-lc-rs) needs cmake and a C toolchain to build, which `cargo build` here must not.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("--client-ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("--client-ca", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("--client-ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("--tls-cert and --tls-key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Who the peer of a TLS connection proved to be: the subject alternative names of its
/// client certificate (DNS names and URIs, e.g. a SPIFFE id), as verified against
/// `--client-ca`. Put in every request's extensions, where a caller's rights are looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// DNS and URI SANs, as written in the certificate.
    pub sans: Vec<String>,
}

impl PeerIdentity {
    /// The SANs of the first certificate of `chain` (none if it has none, or none is given).
    pub fn of(chain: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        let leaf = chain?.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(n)
                    | x509_parser::extensions::GeneralName::URI(n) => sans.push((*n).to_string()),
                    _ => {}
                }
            }
        }
        Some(Self { sans })
    }
}
