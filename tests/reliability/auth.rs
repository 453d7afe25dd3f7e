//! Bearer-token authentication: every call but health needs the token.

use odin_sidecar::wire::odin_v1::GetModelInfoRequest;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::*;

const TOKEN: &str = "s3cret-t0ken";

fn with_auth<T>(message: T, value: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = value {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(value).expect("ascii"),
        );
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_the_bearer_token_and_health_does_not() {
    let dir = TempDir::new("auth");
    let token_file = dir.join("token");
    // The first line, trimmed, is the token.
    std::fs::write(&token_file, format!("  {TOKEN}  \nignored second line\n")).expect("write");
    let mut config = config();
    config.network.auth_token_file = Some(token_file);
    let server = Server::start(config).await;
    let mut client = server.client().await;
    let right = format!("Bearer {TOKEN}");

    for (name, value) in [
        ("no authorization", None),
        ("a wrong token", Some("Bearer wrong")),
        ("a prefix of the token", Some("Bearer s3cret")),
        ("the token without the scheme", Some(TOKEN)),
        (
            "the token with a suffix",
            Some(&*format!("Bearer {TOKEN}x")),
        ),
    ] {
        let status = client
            .detect_one(with_auth(tiny("x"), value))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert!(
            !status.message().contains(TOKEN),
            "the refusal never echoes the token: {}",
            status.message()
        );
        let status = client
            .get_model_info(with_auth(GetModelInfoRequest {}, value))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        let status = client
            .detect(with_auth(tokio_stream::iter(vec![tiny("s")]), value))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
    }

    let verdict = client
        .detect_one(with_auth(tiny("authorized"), Some(&right)))
        .await
        .expect("the right token")
        .into_inner();
    assert_judged(&verdict);
    client
        .get_model_info(with_auth(GetModelInfoRequest {}, Some(&right)))
        .await
        .expect("the right token");
    let mut stream = client
        .detect(with_auth(
            tokio_stream::iter(vec![tiny("s0"), tiny("s1")]),
            Some(&right),
        ))
        .await
        .expect("Detect with the token")
        .into_inner();
    let mut n = 0;
    while let Some(v) = stream.message().await.expect("no stream error") {
        assert_judged(&v);
        n += 1;
    }
    assert_eq!(n, 2);

    // Health needs no token (probes carry none).
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "odin.v1.Detector"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health without a token")
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }

    let refused = metric(&server.scrape().await, "odin_calls_refused_total");
    assert_eq!(refused, 15.0, "each refused call is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_token_file_is_a_configuration_error() {
    let dir = TempDir::new("auth-empty");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "\n").expect("write");
    let mut config = config();
    config.network.auth_token_file = Some(token_file);
    let error = odin_sidecar::app::App::build(&config)
        .await
        .expect_err("an empty token is refused at start-up");
    assert!(error.to_string().contains("holds no token"), "{error}");
    // The binary exits 64 (a usage error) for it.
    let path = dir.join("token").display().to_string();
    let output = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--device",
            "cpu",
            "--addr",
            "127.0.0.1:0",
            "--auth-token-file",
            &path,
        ])
        .output()
        .await
        .expect("runs");
    assert_eq!(
        output.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
