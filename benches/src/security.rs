//! Tokens and TLS for kiln-bench's clients, and what they cost: `kiln-bench latency`
//! measures a small query over a kept-alive connection and a new connection's first
//! request (the TLS handshake, when the URL is `https://`); `kiln-bench certs` makes a
//! throwaway CA and server certificate for the measurement (`benches/security.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How kiln-bench reaches a server that enforces tokens or speaks TLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Access {
    /// Token to send with every request (`Authorization: Bearer …`).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate that signed the server's certificate (`https://` URLs).
    #[arg(long, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl Access {
    /// An HTTP client sending the token and trusting the CA.
    pub fn http_client(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder();
        if let Some(token) = &self.token {
            let mut headers = reqwest::header::HeaderMap::new();
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the token is not a valid header value".to_owned())?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
        if let Some(ca) = &self.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())?;
            builder = builder.tls_certs_only(certs);
        }
        builder.build().map_err(|e| e.to_string())
    }

    /// A gRPC endpoint for `url`, over TLS (trusting the CA) for `https://`.
    pub fn grpc_endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, String> {
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        Ok(endpoint)
    }

    /// The `authorization` metadata value to send on gRPC calls.
    pub fn grpc_authorization(
        &self,
    ) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, String> {
        self.token
            .as_ref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token is not a valid header value".to_owned())
            })
            .transpose()
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Median latency of `query` on `db` over one kept-alive connection, and of a new
/// connection's first `/health` (the handshake included): `(query, connect)`.
pub async fn latency(
    access: &Access,
    url: &str,
    db: &str,
    query: &str,
    runs: usize,
) -> Result<(Duration, Duration), String> {
    let url = url.trim_end_matches('/');
    let client = access.http_client()?;
    let mut queries = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let t = Instant::now();
        let resp = client
            .get(format!("{url}/api/v3/query_sql"))
            .query(&[("db", db), ("q", query)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("query failed: {}", resp.status()));
        }
        resp.bytes().await.map_err(|e| e.to_string())?;
        // The first few warm the connection and the server's caches.
        if i >= 5 {
            queries.push(t.elapsed());
        }
    }
    let mut connects = Vec::with_capacity(runs);
    for _ in 0..runs {
        let fresh = access.http_client()?;
        let t = Instant::now();
        let resp = fresh
            .get(format!("{url}/health"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        resp.bytes().await.map_err(|e| e.to_string())?;
        connects.push(t.elapsed());
    }
    Ok((median(queries), median(connects)))
}

/// Writes a new CA (`ca.pem`) and a certificate for `names` signed by it (`tls.crt`,
/// `tls.key`) into `dir`: for benchmarks and trials, never for production.
pub fn certs(dir: &std::path::Path, names: &[String]) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let err = |e: rcgen::Error| e.to_string();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kiln-bench CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_pem = ca.self_signed(&ca_key).map_err(err)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(err)?;
    let cert = CertificateParams::new(names.to_vec())
        .map_err(err)?
        .signed_by(&key, &issuer)
        .map_err(err)?;
    for (name, text) in [
        ("ca.pem", ca_pem),
        ("tls.crt", cert.pem()),
        ("tls.key", key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).map_err(|e| e.to_string())?;
    }
    Ok(())
}
