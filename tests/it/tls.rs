//! TLS on the HTTP and gRPC listeners (PostgreSQL's is driven by psql and psycopg in the
//! interop suite), certificate rotation while serving, and client certificates. The
//! certificates are made here, with rcgen, for each test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{LineProtocol, WriteRequest, write_request};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use reqwest::StatusCode;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::{TestServer, eventually};

/// A CA: its certificate (PEM) and what signs with it.
pub(crate) struct Ca {
    pub(crate) pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub(crate) fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `names` signed by `ca`: (certificate PEM, key PEM).
pub(crate) fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    crate::support::tls_provider();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn health(client: &reqwest::Client, server: &TestServer) -> Result<StatusCode, String> {
    client
        .get(server.url("/health"))
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn every_listener_speaks_tls_and_a_renewed_certificate_serves_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca("first CA");
    let (cert, key) = leaf(&first, &["localhost", "127.0.0.1"]);
    let cert_path = write(dir.path(), "tls.crt", &cert);
    let key_path = write(dir.path(), "tls.key", &key);
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    assert!(server.grpc.starts_with("https://"), "{}", server.grpc);

    // HTTPS, trusting the first CA; plain HTTP gets no answer.
    let trusting_first = https_client(&first.pem);
    assert_eq!(health(&trusting_first, &server).await, Ok(StatusCode::OK));
    let resp = trusting_first
        .post(server.url("/api/v3/write_lp"))
        .query(&[("db", "plant")])
        .body("m v=1 1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let plain = server.base.replace("https://", "http://");
    assert!(
        reqwest::get(format!("{plain}/health")).await.is_err(),
        "plain HTTP is not served"
    );

    // gRPC over TLS.
    let channel = Endpoint::from_shared(server.grpc.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&first.pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    WriteServiceClient::new(channel)
        .write(WriteRequest {
            batch_id: 1,
            database: "plant".into(),
            payload: Some(write_request::Payload::LineProtocol(LineProtocol {
                text: "m v=2 2".into(),
                precision: String::new(),
            })),
            accept_partial: false,
        })
        .await
        .unwrap();

    // Renewal: new files, signed by another CA. New connections get the new certificate;
    // the connection opened before keeps working.
    let second = ca("second CA");
    let (cert, key) = leaf(&second, &["localhost", "127.0.0.1"]);
    let staged_cert = write(dir.path(), "tls.crt.new", &cert);
    let staged_key = write(dir.path(), "tls.key.new", &key);
    std::fs::rename(&staged_key, &key_path).unwrap();
    std::fs::rename(&staged_cert, &cert_path).unwrap();
    let trusting_second = https_client(&second.pem);
    assert!(
        eventually(Duration::from_secs(15), || async {
            health(&trusting_second, &server).await == Ok(StatusCode::OK)
        })
        .await,
        "the renewed certificate is never served"
    );
    let fresh_first = https_client(&first.pem);
    let err = health(&fresh_first, &server).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(
        health(&trusting_first, &server).await,
        Ok(StatusCode::OK),
        "the connection opened before the renewal keeps serving"
    );

    // A renewal that does not load keeps the certificate that works.
    write(dir.path(), "tls.key", "not a key");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        health(&https_client(&second.pem), &server).await,
        Ok(StatusCode::OK)
    );
}

#[tokio::test]
async fn client_certificates_are_required_with_a_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let servers = ca("server CA");
    let clients = ca("client CA");
    let (cert, key) = leaf(&servers, &["localhost", "127.0.0.1"]);
    let cert_path = write(dir.path(), "tls.crt", &cert);
    let key_path = write(dir.path(), "tls.key", &key);
    let client_ca = write(dir.path(), "clients.pem", &clients.pem);
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
        ],
    );
    assert!(health(&https_client(&servers.pem), &server).await.is_err());

    let (client_cert, client_key) = leaf(&clients, &["gateway-7"]);
    let identity =
        reqwest::Identity::from_pem(format!("{client_cert}{client_key}").as_bytes()).unwrap();
    let with_certificate = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(servers.pem.as_bytes()).unwrap()])
        .identity(identity)
        .build()
        .unwrap();
    assert_eq!(health(&with_certificate, &server).await, Ok(StatusCode::OK));

    // gRPC too: refused without, served with the client certificate.
    let endpoint = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&servers.pem))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Endpoint::from_shared(server.grpc.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let request = || WriteRequest {
        batch_id: 1,
        database: "plant".into(),
        payload: Some(write_request::Payload::LineProtocol(LineProtocol {
            text: "m v=1 1".into(),
            precision: String::new(),
        })),
        accept_partial: false,
    };
    let refused = match endpoint(None).connect().await {
        Err(_) => true,
        Ok(channel) => WriteServiceClient::new(channel)
            .write(request())
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let channel = endpoint(Some(Identity::from_pem(&client_cert, &client_key)))
        .connect()
        .await
        .unwrap();
    WriteServiceClient::new(channel)
        .write(request())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_certificate_that_does_not_load_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "tls.crt", "no certificate here");
    let key = write(dir.path(), "tls.key", "no key here");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-bind", "127.0.0.1:0", "--grpc-bind", "127.0.0.1:0"])
        .args(["--pg-bind", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("holds no PEM certificate") && stderr.contains("tls.crt"),
        "{stderr}"
    );
}
