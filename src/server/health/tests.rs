//! The readiness switch as both reporters show it: gRPC health (served by
//! tonic on loopback) and `/readyz` (served by `server::http` on loopback).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus as Wire, HealthCheckRequest};

use super::*;
use crate::server::http;
use crate::telemetry::{Gauges, Metrics};

struct Served {
    health: Health,
    grpc: HealthClient<tonic::transport::Channel>,
    http: std::net::SocketAddr,
}

/// Health on a gRPC port and `/readyz` on an HTTP port, both on loopback.
async fn served() -> Served {
    let (health, service) = Health::new();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let endpoints = http::Endpoints {
        metrics: Arc::new(Metrics::default()),
        gauges: Arc::new(Gauges::default),
        health: health.clone(),
    };
    tokio::spawn(http::serve(listener, endpoints, std::future::pending()));
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Served {
        health,
        grpc: HealthClient::new(channel),
        http: http_addr,
    }
}

/// `GET /readyz`: the status code.
async fn readyz(addr: std::net::SocketAddr) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap()
}

/// The gRPC status of each reported service.
async fn grpc(
    client: &mut HealthClient<tonic::transport::Channel>,
) -> Vec<Result<i32, tonic::Code>> {
    let mut out = Vec::new();
    for service in SERVICES {
        let answer = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await;
        out.push(answer.map(|r| r.into_inner().status).map_err(|s| s.code()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_readyz_follow_the_one_switch() {
    let mut s = served().await;
    // Before the model is loaded: not ready, and the detector is not known.
    assert!(!s.health.is_ready());
    assert_eq!(readyz(s.http).await, 503);
    assert_eq!(grpc(&mut s.grpc).await[1], Err(tonic::Code::NotFound));

    s.health.serving().await;
    assert!(s.health.is_ready());
    assert_eq!(readyz(s.http).await, 200);
    let serving = Ok(Wire::Serving as i32);
    assert_eq!(grpc(&mut s.grpc).await, [serving; 3]);

    s.health.not_serving().await;
    assert!(!s.health.is_ready());
    assert_eq!(readyz(s.http).await, 503);
    let not_serving = Ok(Wire::NotServing as i32);
    assert_eq!(grpc(&mut s.grpc).await, [not_serving; 3]);

    s.health.serving().await;
    assert_eq!(readyz(s.http).await, 200);
    assert_eq!(grpc(&mut s.grpc).await, [serving; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_the_detector_stop_serving() {
    let mut s = served().await;
    s.health.serving().await;
    let mut watch = s
        .grpc
        .watch(HealthCheckRequest {
            service: "odin.v1.Detector".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, Wire::Serving as i32);
    s.health.not_serving().await;
    let second = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.status, Wire::NotServing as i32);
}

#[tokio::test]
async fn clones_share_the_switch() {
    let (health, _service) = Health::new();
    let other = health.clone();
    other.serving().await;
    assert!(health.is_ready());
    health.not_serving().await;
    assert!(!other.is_ready());
}
