//! TLS for the client API and the node socket (rustls): a server's certificate and key from
//! PEM files, a client's trust from a CA (or pinned certificate) file, and a self-signed pair
//! for local testnets (a CA of its own, and a server certificate it signs for `localhost`,
//! `127.0.0.1` and the names given).

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
}

/// A server's certificate chain and private key, PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn certificates(path: &Path) -> Result<Vec<rustls::Certificate>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .map_err(|e| invalid(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no PEM certificate"));
    }
    Ok(certs.into_iter().map(rustls::Certificate).collect())
}

fn private_key(path: &Path) -> Result<rustls::PrivateKey, TlsError> {
    let pem = read(path)?;
    let mut reader = pem.as_slice();
    loop {
        match rustls_pemfile::read_one(&mut reader)
            .map_err(|e| invalid(path, format!("not a PEM private key: {e}")))?
        {
            Some(rustls_pemfile::Item::PKCS8Key(k))
            | Some(rustls_pemfile::Item::RSAKey(k))
            | Some(rustls_pemfile::Item::ECKey(k)) => return Ok(rustls::PrivateKey(k)),
            Some(_) => continue,
            None => return Err(invalid(path, "holds no PEM private key")),
        }
    }
}

/// Checks that `key` is the private half of `cert`: it signs a message the certificate's
/// public key verifies.
fn key_matches(cert: &rustls::Certificate, key: &rustls::PrivateKey) -> bool {
    use rustls::SignatureScheme as S;
    let pairs: [(S, &webpki::SignatureAlgorithm); 5] = [
        (S::ECDSA_NISTP256_SHA256, &webpki::ECDSA_P256_SHA256),
        (S::ECDSA_NISTP384_SHA384, &webpki::ECDSA_P384_SHA384),
        (S::ED25519, &webpki::ED25519),
        (
            S::RSA_PSS_SHA256,
            &webpki::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        ),
        (S::RSA_PKCS1_SHA256, &webpki::RSA_PKCS1_2048_8192_SHA256),
    ];
    let (Ok(signing), Ok(cert)) = (
        rustls::sign::any_supported_type(key),
        webpki::EndEntityCert::try_from(cert.0.as_slice()),
    ) else {
        return false;
    };
    let message = b"cortensor: does this key belong to this certificate?";
    pairs.iter().any(|(scheme, alg)| {
        signing
            .choose_scheme(&[*scheme])
            .and_then(|s| s.sign(message).ok())
            .is_some_and(|sig| cert.verify_signature(alg, message, &sig).is_ok())
    })
}

/// A server configuration from a certificate chain and its key.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    if !key_matches(&chain[0], &key) {
        return Err(invalid(
            &files.key,
            format!("is not the key of {}", files.cert.display()),
        ));
    }
    rustls::ServerConfig::builder()
        .with_safe_defaults()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&files.key, format!("does not match the certificate: {e}")))
}

/// A client configuration that trusts the certificates in `ca` (a CA, or the server's own
/// certificate pinned) and nothing else.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(&cert)
            .map_err(|e| invalid(ca, format!("not a usable certificate: {e}")))?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_safe_defaults()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Where a self-signed pair lives in a directory: the CA clients trust, the server's chain
/// and its key.
pub struct SelfSigned {
    pub ca: PathBuf,
    pub files: TlsFiles,
}

/// Makes (once: kept files are reused) a CA and a server certificate it signs, valid for
/// `localhost`, `127.0.0.1` and `names`, in `dir`. The keys are written readable by the owner
/// only.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<SelfSigned, TlsError> {
    let paths = SelfSigned {
        ca: dir.join("ca.pem"),
        files: TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
    };
    if paths.ca.exists() && paths.files.cert.exists() && paths.files.key.exists() {
        return Ok(paths);
    }
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new());
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cortensor testnet CA");
    let ca = rcgen::Certificate::from_params(ca_params).map_err(generate)?;
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(names.iter().cloned());
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new());
    params.subject_alt_names = sans
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.clone()),
        })
        .collect();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cortensor testnet");
    let server = rcgen::Certificate::from_params(params).map_err(generate)?;
    let ca_pem = ca.serialize_pem().map_err(generate)?;
    let cert_pem = server.serialize_pem_with_signer(&ca).map_err(generate)?;
    let write = |path: &Path, text: &str, private: bool| -> Result<(), TlsError> {
        let failed = |e: std::io::Error| TlsError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        use std::io::Write;
        options
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(failed)
    };
    write(&paths.ca, &ca_pem, false)?;
    write(&paths.files.cert, &format!("{cert_pem}{ca_pem}"), false)?;
    write(&paths.files.key, &server.serialize_private_key_pem(), true)?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_loads_and_is_reused() {
        let dir = std::env::temp_dir().join(format!("cortensor-tls-{}", std::process::id()));
        let made = self_signed(&dir, &["node.example".into()]).unwrap();
        server_config(&made.files).unwrap();
        client_config(&made.ca).unwrap();
        let before = std::fs::read(&made.files.cert).unwrap();
        let again = self_signed(&dir, &[]).unwrap();
        assert_eq!(std::fs::read(&again.files.cert).unwrap(), before);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&made.files.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A key that is not the certificate's is refused with the file named.
        let other = self_signed(&dir.join("other"), &[]).unwrap();
        let mixed = TlsFiles {
            cert: made.files.cert.clone(),
            key: other.files.key,
        };
        assert!(server_config(&mixed)
            .unwrap_err()
            .to_string()
            .contains("key.pem"));
        assert!(client_config(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string()
            .contains("missing.pem"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
