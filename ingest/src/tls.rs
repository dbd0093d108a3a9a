//! rustls server configuration and station identity from client
//! certificates.
//!
//! OCPP security profile 2 is TLS with Basic auth; profile 3 adds client
//! certificates (mTLS) whose subject Common Name is the station identity.
//! With a client CA configured but client certificates not required, both
//! kinds of station can share one listener.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// TLS settings (the `[tls]` table of the configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). Unset: plain TCP.
    pub cert_path: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Unset: read from `cert_path`.
    pub key_path: Option<PathBuf>,
    /// PEM CA certificates that sign station certificates. Set: client
    /// certificates are verified against it (security profile 3).
    pub client_ca_path: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca_path`).
    pub require_client_cert: bool,
}

/// Why the TLS configuration could not be built; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or is not PEM.
    #[error("TLS {what} {}: {source}", path.display())]
    Read {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file holds no item of the expected kind.
    #[error("TLS {what} {}: no {expected} found in the PEM file", path.display())]
    Missing {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
    },
    /// A client CA certificate is not usable as a trust anchor.
    #[error("TLS client CA {}: certificate not usable as a trust anchor: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: rustls::Error,
    },
    /// Certificate and key do not belong together or are unsupported.
    #[error("TLS certificate {} with key {}: {source}", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The underlying error.
        source: rustls::Error,
    },
    /// `key_path` or `client_ca_path` without `cert_path`.
    #[error("TLS {0} is set but cert_path is not")]
    NoCert(&'static str),
    /// `require_client_cert` without `client_ca_path`.
    #[error(
        "TLS require_client_cert needs client_ca_path (the CA that signs station certificates)"
    )]
    ClientCertWithoutCa,
    /// The client-certificate verifier could not be built.
    #[error("TLS client CA {}: {source}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// The underlying error.
        source: rustls::server::VerifierBuilderError,
    },
    /// The crypto provider does not support the default protocol versions.
    #[error("TLS protocol setup: {0}")]
    Protocol(rustls::Error),
}

/// Install the aws-lc-rs crypto provider as the process default, ignoring
/// "already installed" (both rustls providers are compiled in, so rustls
/// cannot pick one by itself).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

fn open(what: &'static str, path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    rustls_pemfile::private_key(&mut open(WHAT, path)?)
        .map_err(|source| TlsError::Read {
            what: WHAT,
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing {
            what: WHAT,
            path: path.to_path_buf(),
            expected: "private key",
        })
}

/// Build the server configuration; `None` when no certificate is
/// configured (plain WebSockets, security profile 1). ALPN offers
/// `http/1.1` only, since OCPP-J runs over HTTP/1.1 upgrades.
pub fn server_config(cfg: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let Some(cert_path) = &cfg.cert_path else {
        if cfg.key_path.is_some() {
            return Err(TlsError::NoCert("key_path"));
        }
        if cfg.client_ca_path.is_some() {
            return Err(TlsError::NoCert("client_ca_path"));
        }
        return Ok(None);
    };
    let key_path = cfg.key_path.as_ref().unwrap_or(cert_path);
    let chain = load_certs("certificate", cert_path)?;
    let key = load_key(key_path)?;
    let provider = provider();

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?;
    let builder = match &cfg.client_ca_path {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in load_certs("client CA", ca_path)? {
                roots.add(ca).map_err(|source| TlsError::BadCa {
                    path: ca_path.clone(),
                    source,
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !cfg.require_client_cert {
                // Profile-2 stations (Basic auth, no certificate) may still
                // connect; a presented certificate is still verified.
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|source| TlsError::Verifier {
                path: ca_path.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None if cfg.require_client_cert => return Err(TlsError::ClientCertWithoutCa),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::CertKey {
            cert: cert_path.clone(),
            key: key_path.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The station identity a (verified) client certificate names: its subject
/// Common Name, which OCPP 2.0.1 security profile 3 reserves for the
/// charging station's identity. `None` when unparsable or without a CN.
pub fn station_from_client_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let cn = cn.trim();
    (!cn.is_empty()).then(|| cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn new_ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate DER, certificate PEM, key PKCS#8 DER, key PEM)
    fn leaf(
        ca: &Ca,
        cn: &str,
        sans: Vec<String>,
        eku: ExtendedKeyUsagePurpose,
    ) -> (CertificateDer<'static>, String, Vec<u8>, String) {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (
            cert.der().clone(),
            cert.pem(),
            key.serialize_der(),
            key.serialize_pem(),
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
        cfg: TlsConfig,
        ca: Ca,
    }

    fn fixture(require_client_cert: bool) -> Fixture {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("Test Station CA");
        let (_, cert_pem, _, key_pem) = leaf(
            &ca,
            "localhost",
            vec!["localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let cert_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&cert_path, cert_pem).unwrap();
        std::fs::write(&key_path, key_pem).unwrap();
        std::fs::write(&ca_path, &ca.pem).unwrap();
        Fixture {
            dir,
            cfg: TlsConfig {
                cert_path: Some(cert_path),
                key_path: Some(key_path),
                client_ca_path: Some(ca_path),
                require_client_cert,
            },
            ca,
        }
    }

    fn client_config(
        server_ca_pem: &str,
        client: Option<(CertificateDer<'static>, Vec<u8>)>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut server_ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// Handshake plus one byte each way. Returns the server side's result:
    /// the station named by the peer certificate (if any) and the ALPN.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Result<(Option<String>, Option<Vec<u8>>), io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let server_side = async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let (_, conn) = tls.get_ref();
            let station = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| station_from_client_cert(c));
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            tls.write_all(&b).await?;
            tls.flush().await?;
            Ok::<_, io::Error>((station, alpn))
        };
        let client_side = async move {
            let tcp = TcpStream::connect(addr).await?;
            let connector = tokio_rustls::TlsConnector::from(client);
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(b"x").await?;
            tls.flush().await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            Ok::<_, io::Error>(())
        };
        let (server_result, client_result) =
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                tokio::join!(server_side, client_side)
            })
            .await
            .expect("handshake timed out");
        if server_result.is_ok() {
            client_result?;
        }
        server_result
    }

    #[tokio::test]
    async fn mtls_names_the_station_from_the_client_cert() {
        let f = fixture(true);
        let server = server_config(&f.cfg).unwrap().unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let (cert, _, key, _) = leaf(&f.ca, "CP-42", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        assert_eq!(station_from_client_cert(&cert).as_deref(), Some("CP-42"));
        let (station, alpn) = handshake(server, client_config(&f.ca.pem, Some((cert, key))))
            .await
            .unwrap();
        assert_eq!(station.as_deref(), Some("CP-42"));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_is_refused() {
        let f = fixture(true);
        let server = server_config(&f.cfg).unwrap().unwrap();
        let rogue = new_ca("Rogue CA");
        let (cert, _, key, _) = leaf(&rogue, "CP-42", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let r = handshake(server, client_config(&f.ca.pem, Some((cert, key)))).await;
        assert!(r.is_err(), "rogue certificate accepted: {r:?}");
    }

    #[tokio::test]
    async fn missing_client_cert_refused_only_when_required() {
        let required = fixture(true);
        let server = server_config(&required.cfg).unwrap().unwrap();
        let r = handshake(server, client_config(&required.ca.pem, None)).await;
        assert!(r.is_err(), "anonymous client accepted: {r:?}");

        let optional = fixture(false);
        let server = server_config(&optional.cfg).unwrap().unwrap();
        let (station, _) = handshake(server.clone(), client_config(&optional.ca.pem, None))
            .await
            .unwrap();
        assert_eq!(station, None);
        // A presented certificate is still verified.
        let rogue = new_ca("Rogue CA");
        let (cert, _, key, _) = leaf(&rogue, "CP-1", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let r = handshake(server, client_config(&optional.ca.pem, Some((cert, key)))).await;
        assert!(r.is_err(), "rogue certificate accepted: {r:?}");
    }

    #[test]
    fn no_cert_means_plain_tcp() {
        assert!(server_config(&TlsConfig::default()).unwrap().is_none());
        let cfg = TlsConfig {
            key_path: Some("k.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(
            server_config(&cfg),
            Err(TlsError::NoCert("key_path"))
        ));
    }

    #[test]
    fn errors_name_the_file() {
        let f = fixture(true);
        let missing = TlsConfig {
            cert_path: Some("/nonexistent/server.pem".into()),
            ..f.cfg.clone()
        };
        let e = server_config(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/server.pem"), "{e}");

        // The CA file holds no key: using it as the key file must say so.
        let no_key = TlsConfig {
            key_path: f.cfg.client_ca_path.clone(),
            ..f.cfg.clone()
        };
        let e = server_config(&no_key).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("private key"), "{e}");

        let garbage = f.dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").unwrap();
        let bad_ca = TlsConfig {
            client_ca_path: Some(garbage),
            ..f.cfg.clone()
        };
        let e = server_config(&bad_ca).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("CERTIFICATE"),
            "{e}"
        );

        let no_ca = TlsConfig {
            client_ca_path: None,
            ..f.cfg.clone()
        };
        assert!(matches!(
            server_config(&no_ca),
            Err(TlsError::ClientCertWithoutCa)
        ));
    }

    #[test]
    fn cert_and_key_in_one_file() {
        let f = fixture(false);
        let combined = f.dir.path().join("combined.pem");
        let mut text = std::fs::read_to_string(f.cfg.cert_path.as_ref().unwrap()).unwrap();
        text.push_str(&std::fs::read_to_string(f.cfg.key_path.as_ref().unwrap()).unwrap());
        std::fs::write(&combined, text).unwrap();
        let cfg = TlsConfig {
            cert_path: Some(combined),
            key_path: None,
            client_ca_path: None,
            require_client_cert: false,
        };
        assert!(server_config(&cfg).unwrap().is_some());
    }

    #[test]
    fn station_from_garbage_is_none() {
        assert_eq!(station_from_client_cert(b"not a certificate"), None);
    }
}
