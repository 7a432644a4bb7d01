//! Mutual TLS on the gateway → coordinator link: a coordinator started with `--tls-cert`,
//! `--tls-key` and `--tls-ca` serves a gateway that presents a certificate the CA signed (a chat
//! request gets 200), and refuses callers that speak plain text, present no certificate or one
//! from another CA, even with the cluster secret. The certificates are made here with rcgen.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use r4b_proto::auth::{AttachSecret, Secret, SECRET_ENV};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const SECRET: &str = "tls-test-cluster-secret-0123456789";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA, and a certificate it signs for `names` (PEM cert, PEM key).
struct Ca {
    pem: String,
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, params, key }
    }

    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// ModelInfo over `tls` (None: plain text) with the secret; whether it succeeded.
async fn model_info(url: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let mut ep = Channel::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    if let Some(t) = tls {
        ep = ep.tls_config(t).map_err(|e| e.to_string())?;
    }
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let secret = Secret::new(SECRET).unwrap();
    let mut c = CoordinatorClient::with_interceptor(ch, AttachSecret::new(Some(&secret)));
    c.model_info(pb::ModelInfoRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{s}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_serves_the_gateway_and_refuses_other_callers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("r4b test CA");
    let (server_cert, server_key) = ca.sign(&["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = ca.sign(&["gateway"]);
    let rogue = Ca::new("another CA");
    let (rogue_cert, rogue_key) = rogue.sign(&["gateway"]);
    let ca_pem = write(d, "ca.pem", &ca.pem);
    let server = (
        write(d, "server.pem", &server_cert),
        write(d, "server.key", &server_key),
    );
    let client_files = (
        write(d, "client.pem", &client_cert),
        write(d, "client.key", &client_key),
    );

    let cache = tempfile::tempdir().unwrap();
    let (port, http_port) = (free_port(), free_port());
    let spawn = |args: &[&str]| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_r4b"))
                .args(args)
                .env("R4B_CACHE", cache.path())
                .env("RAYON_NUM_THREADS", "1")
                .env(SECRET_ENV, SECRET)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let _coordinator = spawn(&[
        "coordinator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--kv-cache-space",
        "0.25",
        "--tls-cert",
        &server.0,
        "--tls-key",
        &server.1,
        "--tls-ca",
        &ca_pem,
    ]);
    let url = format!("https://127.0.0.1:{port}");
    let good = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .identity(Identity::from_pem(&client_cert, &client_key));
    // The positive control, once the coordinator is up.
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Err(e) = model_info(&url, Some(good.clone())).await {
        assert!(Instant::now() < deadline, "no TLS answer from {url}: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Refused: plain text, no client certificate, a certificate from another CA.
    let plain = model_info(&format!("http://127.0.0.1:{port}"), None).await;
    assert!(plain.is_err(), "a plain-text call got through");
    let anonymous = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
    let r = model_info(&url, Some(anonymous)).await;
    assert!(
        r.is_err(),
        "a call without a client certificate got through"
    );
    let foreign = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .identity(Identity::from_pem(&rogue_cert, &rogue_key));
    let r = model_info(&url, Some(foreign)).await;
    assert!(r.is_err(), "a certificate from another CA got through");
    // And a client that does not trust the server's CA refuses the server.
    let distrust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&rogue.pem))
        .identity(Identity::from_pem(&client_cert, &client_key));
    let r = model_info(&url, Some(distrust)).await;
    assert!(r.is_err(), "a client accepted a server its CA did not sign");

    // The gateway over mutual TLS.
    let mut gateway = spawn(&[
        "gateway",
        "--coordinator",
        &url,
        "--host",
        "127.0.0.1",
        "--port",
        &http_port.to_string(),
        "--tls-ca",
        &ca_pem,
        "--tls-cert",
        &client_files.0,
        "--tls-key",
        &client_files.1,
    ]);
    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            panic!("the gateway exited: {status}");
        }
        if let Ok(r) = http.get(format!("{base}/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the gateway never got ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&greedy_body("Hi", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
