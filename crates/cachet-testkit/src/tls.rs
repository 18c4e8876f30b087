//! Throwaway certificates for TLS tests: a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate, all made at run time.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, as PEM and as files.
#[derive(Debug)]
pub struct CertFiles {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate's file.
    pub cert_file: PathBuf,
    /// The private key's file.
    pub key_file: PathBuf,
}

/// A private CA with a server and a client certificate it signed, written to a
/// temporary directory removed on drop. Each call to [`generate`](Self::generate)
/// makes a new CA, so two of them never trust each other's certificates.
#[derive(Debug)]
pub struct TestPki {
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    /// The CA's certificate file.
    pub ca_file: PathBuf,
    /// The server's certificate (SAN `127.0.0.1`, `localhost`) and key.
    pub server: CertFiles,
    /// A client certificate for mutual TLS (CN `cachet-test-client`) and key.
    pub client: CertFiles,
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes a CA, a server and a client certificate, and writes them out.
    ///
    /// # Panics
    /// If key generation, signing or writing the files fails.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cachet-pki-")
            .tempdir()
            .expect("create a temporary directory for certificates");

        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own, so that another test's CA is a stranger, not a
        // namesake with another key.
        let name = format!("cachet test CA {:016x}", rand::random::<u64>());
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(ca, ca_key).expect("self-sign the CA");

        let leaf =
            |sans: Vec<String>, cn: &str, usages: Vec<ExtendedKeyUsagePurpose>, name: &str| {
                let mut params = CertificateParams::new(sans).expect("certificate parameters");
                params.distinguished_name.push(DnType::CommonName, cn);
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = usages;
                let key = KeyPair::generate().expect("leaf key");
                let cert = params.signed_by(&key, &ca).expect("sign a certificate");
                let files = CertFiles {
                    cert_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                    cert_file: dir.path().join(format!("{name}.crt")),
                    key_file: dir.path().join(format!("{name}.key")),
                };
                write(&files.cert_file, &files.cert_pem);
                write(&files.key_file, &files.key_pem);
                files
            };
        let server = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "cachet test server",
            // Cluster nodes also present it to each other as clients.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            "server",
        );
        let client = leaf(
            Vec::new(),
            "cachet-test-client",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            "client",
        );
        let ca_pem = ca.pem();
        let ca_file = dir.path().join("ca.crt");
        write(&ca_file, &ca_pem);
        Self {
            ca_pem,
            ca_file,
            server,
            client,
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
