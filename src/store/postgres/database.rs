//! Where the database is and how to reach it: the URL's settings, and TLS when it asks for it.
//!
//! TLS: `sslmode=require` with `sslrootcert=FILE` in the URL, as libpq spells them. tollgate always verifies the server's certificate against that CA
//! and its name against the URL's host: an encrypted connection to a server that cannot show
//! it is the database would protect nothing. So `sslmode=require` without `sslrootcert` is
//! refused, rather than connecting unverified; `sslmode=prefer` (tokio-postgres's default) and
//! `disable` connect in plaintext. tokio-postgres does not read `sslrootcert` itself, so it is
//! taken out of the URL here before the rest is parsed.

use std::sync::Arc;

use postgres::Client;
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How long a connection attempt may take when the URL does not say
/// (`connect_timeout=SECONDS`).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A database to connect to.
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn refused(reason: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("--store: {reason}").into())
}

impl Database {
    /// From `url` (`postgres://user@host:port/db?sslmode=require&sslrootcert=/etc/ca.pem`).
    /// Errors name the setting, never the URL (it may hold a password).
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let (url, root) = take_param(url, "sslrootcert");
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| refused(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate");
        }
        let wants_tls = config.get_ssl_mode() == postgres::config::SslMode::Require;
        let tls = match (wants_tls, root) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(refused(
                    "sslrootcert is given but sslmode is not require: add sslmode=require (tollgate then verifies the server)",
                ))
            }
            (true, None) => {
                return Err(refused(
                    "sslmode=require needs sslrootcert=FILE (the CA that signs the database's certificate): tollgate verifies the server it talks to",
                ))
            }
            (true, Some(path)) => Some(connector(&path)?),
        };
        Ok(Self { config, tls })
    }

    /// The parsed settings (host, port, database, user).
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// Whether connections are encrypted.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection, giving up after `timeout` if given (else the URL's or the default).
    pub fn connect(&self, timeout: Option<std::time::Duration>) -> Result<Client, postgres::Error> {
        let mut config = self.config.clone();
        if let Some(t) = timeout {
            config.connect_timeout(t);
        }
        match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(postgres::NoTls),
        }
    }
}

/// A TLS connector trusting the CA certificates in `path`.
fn connector(path: &str) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| refused(format!("sslrootcert {path}: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| refused(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(refused(format!("sslrootcert {path}: no PEM certificate")));
    }
    // See `server::transport::tls`: ring, not the post-quantum aws-lc-rs, to need no cmake.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(refused)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `url` without its query parameter `name`, and that parameter's value (percent-decoding
/// is not needed for a file path without special characters; one with them is refused by
/// the file read).
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        let (url, root) = take_param(
            "postgres://u@h/db?sslmode=require&sslrootcert=/etc/ca.pem&connect_timeout=3",
            "sslrootcert",
        );
        assert_eq!(url, "postgres://u@h/db?sslmode=require&connect_timeout=3");
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(take_param("postgres://u@h/db", "x").1, None);
    }

    #[test]
    fn tls_without_a_ca_is_refused_without_echoing_the_url() {
        let e = Database::from_url("postgres://u:secret@h/db?sslmode=require").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("needs sslrootcert"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
