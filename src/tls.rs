//! TLS material for `warden auth init --tls`: a private CA, and a certificate for nats-server
//! signed by it. Clients and nodes trust the CA (`ca.pem`, found next to their seed file), so
//! every connection to NATS is encrypted and the server is authenticated; identities stay
//! nkeys.

use std::path::Path;

use anyhow::Context;

/// The CA certificate, next to the seeds.
pub const CA_FILE: &str = "ca.pem";
/// nats-server's certificate and key.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Names the server certificate is valid for: this machine, and the compose service `nats`.
const SERVER_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "::1", "nats"];

/// Writes `ca.pem`, `server-cert.pem` and `server-key.pem` (0600) into `dir`. The CA's own
/// key is not kept: a new server certificate comes with a new CA.
pub fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Warden CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).context("sign the CA")?;

    let key = KeyPair::generate().context("generate the server key")?;
    let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "nats-server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("sign the server certificate")?;

    write(dir, CA_FILE, ca.pem(), 0o644)?;
    write(dir, SERVER_CERT_FILE, cert.pem(), 0o644)?;
    write(dir, SERVER_KEY_FILE, key.serialize_pem(), 0o600)?;
    Ok(())
}

fn write(dir: &Path, name: &str, text: String, mode: u32) -> anyhow::Result<()> {
    crate::auth::write_atomic(&dir.join(name), text.as_bytes(), mode)
}
