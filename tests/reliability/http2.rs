//! Connections and HTTP/2: the advertised stream limit, the connection
//! limit, idle and handshake timeouts, the server-reset cap ("rapid reset"
//! class) and accept backoff when out of file descriptors. Raw sockets and
//! the `h2` crate see what a generated client hides.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::GetModelInfoRequest;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::harness::*;

/// An HTTP/2 connection made with the `h2` crate: its request handle and
/// the task driving it, which ends when the server closes the connection.
pub struct H2 {
    pub send: h2::client::SendRequest<Bytes>,
    pub conn: JoinHandle<Result<(), h2::Error>>,
    pub addr: SocketAddr,
}

pub async fn h2_connect(addr: SocketAddr) -> H2 {
    let tcp = TcpStream::connect(addr).await.expect("connects");
    let (send, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    H2 {
        send,
        conn: tokio::spawn(conn),
        addr,
    }
}

/// One gRPC message: the 5-byte prefix, then the bytes.
pub fn grpc_message(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

impl H2 {
    /// Starts a gRPC call to `path` with extra `headers`; sends `message`
    /// (ending the request when `end`).
    pub async fn call(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        message: &[u8],
        end: bool,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let (response, mut body) = self.open(path, headers).await;
        body.send_data(grpc_message(message), end)
            .expect("send data");
        (response, body)
    }

    /// Starts a gRPC call to `path` with extra `headers`, sending nothing yet.
    pub async fn open(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(()).expect("request");
        let mut send = self.send.clone().ready().await.expect("ready");
        send.send_request(request, false).expect("send")
    }
}

/// Reads a whole gRPC response: its data and its `grpc-status` (from the
/// trailers, or the headers of a trailers-only response).
pub async fn h2_finish(response: h2::client::ResponseFuture) -> (Vec<u8>, Option<String>) {
    let response = response.await.expect("response headers");
    let status_header = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().expect("ascii").to_string());
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    let status = trailers
        .and_then(|t| {
            t.get("grpc-status")
                .map(|v| v.to_str().expect("ascii").to_string())
        })
        .or(status_header);
    (data, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_advertises_its_max_concurrent_streams() {
    let mut config = config();
    config.network.max_concurrent_streams = 7;
    let server = Server::start(config).await;
    let mut h2 = h2_connect(server.addr).await;
    // The server's SETTINGS arrive with the connection's first frames; make
    // a call so they have certainly been read.
    let (response, _) = h2
        .call("/odin.v1.Detector/GetModelInfo", &[], &[], true)
        .await;
    let (_, status) = h2_finish(response).await;
    assert_eq!(status.as_deref(), Some("0"));
    let advertised = h2.send.current_max_send_streams();
    println!("advertised MAX_CONCURRENT_STREAMS = {advertised}");
    assert_eq!(advertised, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_limit_is_closed_at_once_and_the_others_work() {
    let mut config = config();
    config.network.max_connections = 2;
    let server = Server::start(config).await;
    let mut first = server.client().await;
    let mut second = server.client().await;
    first
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("1st works");
    second
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("2nd works");

    let mut third = TcpStream::connect(server.addr).await.expect("TCP connects");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the 3rd connection is closed within 10 s");
    let closed_after = started.elapsed();
    println!("3rd connection: {read:?} after {closed_after:?}");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the 3rd connection is closed (EOF or reset) without a byte: {read:?}"
    );
    assert!(
        closed_after < Duration::from_secs(2),
        "closed at once: {closed_after:?}"
    );

    first
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("1st still works");
    second
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("2nd still works");
    let text = server.scrape().await;
    assert_eq!(metric(&text, "odin_connections_refused_total"), 1.0);
    assert_eq!(metric(&text, "odin_connections_open"), 2.0);

    // A freed slot is reusable.
    drop(first);
    assert_eq!(
        settle(server.metrics, "odin_connections_open", 1.0).await,
        1.0
    );
    let mut fourth = server.client().await;
    fourth
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("a new connection once a slot is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_one_with_an_open_stream_is_not() {
    let _serial = serial().await;
    let mut config = config();
    config.network.idle_timeout = Duration::from_secs(1);
    let server = Server::start(config).await;

    // One call, then nothing: closed about 1 s after the call ended.
    let mut idle = h2_connect(server.addr).await;
    let (response, _) = idle
        .call("/odin.v1.Detector/GetModelInfo", &[], &[], true)
        .await;
    let (_, status) = h2_finish(response).await;
    assert_eq!(status.as_deref(), Some("0"));
    let call_ended = Instant::now();

    // A Detect stream left open with no frame in flight: kept.
    let mut busy = h2_connect(server.addr).await;
    let (response, mut frames) = busy
        .call(
            "/odin.v1.Detector/Detect",
            &[],
            &tiny("keep-0").encode_to_vec(),
            false,
        )
        .await;

    let result = tokio::time::timeout(Duration::from_secs(10), &mut idle.conn)
        .await
        .expect("the idle connection is closed within 10 s");
    let idle_for = call_ended.elapsed();
    println!("idle connection closed after {idle_for:?} ({result:?})");
    assert!(
        idle_for >= Duration::from_millis(800) && idle_for < Duration::from_secs(5),
        "closed after {idle_for:?}, want about 1 s"
    );

    // The stream's connection outlives several idle timeouts...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !busy.conn.is_finished(),
        "a connection with an open call was closed"
    );
    // ...and the stream still works.
    frames
        .send_data(grpc_message(&tiny("keep-1").encode_to_vec()), true)
        .expect("send on the open stream");
    let (data, status) = h2_finish(response).await;
    assert_eq!(status.as_deref(), Some("0"), "the stream ends OK");
    let verdicts = decode_verdicts(&data);
    let ids: Vec<&str> = verdicts.iter().map(|v| v.frame_id.as_str()).collect();
    assert_eq!(ids, ["keep-0", "keep-1"]);
}

/// The `Verdict`s in a gRPC response body.
pub fn decode_verdicts(mut data: &[u8]) -> Vec<odin_sidecar::wire::odin_v1::Verdict> {
    let mut out = Vec::new();
    while data.len() >= 5 {
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        out.push(
            odin_sidecar::wire::odin_v1::Verdict::decode(&data[5..5 + len]).expect("a Verdict"),
        );
        data = &data[5 + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_starts_a_call_is_closed_after_the_handshake_timeout() {
    let _serial = serial().await;
    let mut config = config();
    config.network.handshake_timeout = Duration::from_secs(1);
    let server = Server::start(config).await;

    // Plain TCP that sends nothing at all.
    let mut silent = TcpStream::connect(server.addr).await.expect("connects");
    // HTTP/2 that completes its handshake but never opens a stream.
    let quiet = h2_connect(server.addr).await;
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // the server's SETTINGS
            }
        }
    })
    .await;
    let silent_for = started.elapsed();
    assert!(closed.is_ok(), "a silent connection stays open past 10 s");
    let quiet_result = tokio::time::timeout(Duration::from_secs(10), quiet.conn)
        .await
        .expect("the quiet h2 connection is closed within 10 s");
    let quiet_for = started.elapsed();
    println!("silent TCP closed after {silent_for:?}; quiet h2 closed after {quiet_for:?} ({quiet_result:?})");
    for (name, after) in [("silent", silent_for), ("quiet", quiet_for)] {
        assert!(
            after >= Duration::from_millis(800) && after < Duration::from_secs(5),
            "{name} connection closed after {after:?}, want about 1 s"
        );
    }
}

/// HPACK for a request HEADERS block that h2 refuses with a stream error:
/// a valid gRPC request whose `content-length` is not a number.
fn malformed_headers(authority: &str) -> Vec<u8> {
    let path = b"/odin.v1.Detector/GetModelInfo";
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    block.push(0x04); // :path, literal without indexing, indexed name 4
    block.push(path.len() as u8);
    block.extend_from_slice(path);
    block.push(0x01); // :authority, literal without indexing, indexed name 1
    block.push(authority.len() as u8);
    block.extend_from_slice(authority.as_bytes());
    for (name, value) in [
        (&b"content-type"[..], &b"application/grpc"[..]),
        (b"content-length", b"not-a-number"),
    ] {
        block.push(0x00); // literal without indexing, new name
        block.push(name.len() as u8);
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    block
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Sends `n` malformed requests on one raw HTTP/2 connection and returns
/// the RST_STREAM count the server sent and its GOAWAY (error code, last
/// stream id), if any.
async fn provoke_resets(addr: SocketAddr, n: u32) -> (usize, Option<(u32, u32)>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connects");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    let headers = malformed_headers(&addr.to_string());
    for i in 0..n {
        // END_STREAM | END_HEADERS on streams 1, 3, 5, ...
        out.extend(frame(0x1, 0x5, 2 * i + 1, &headers));
    }
    tcp.write_all(&out).await.expect("writes");
    let mut received = Vec::new();
    let mut resets = 0;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // Parse every complete frame received so far.
            while received.len() >= 9 {
                let len = u32::from_be_bytes([0, received[0], received[1], received[2]]) as usize;
                if received.len() < 9 + len {
                    break;
                }
                let kind = received[3];
                let payload: Vec<u8> = received[9..9 + len].to_vec();
                received.drain(..9 + len);
                match kind {
                    RST_STREAM => {
                        resets += 1;
                        if resets == n as usize {
                            // Every stream reset, the connection still open.
                            return None;
                        }
                    }
                    GOAWAY => {
                        let last =
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        let code =
                            u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                        return Some((code, last & 0x7fff_ffff));
                    }
                    _ => {}
                }
            }
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(goaway) => (resets, goaway),
        // Neither GOAWAY nor close within 10 s: the connection lives on.
        Err(_) => (resets, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_provoking_resets_gets_goaway_after_the_cap() {
    let mut config = config();
    config.network.max_local_resets = 10;
    let capped = Server::start(config).await;
    let (resets, goaway) = provoke_resets(capped.addr, 30).await;
    println!("max_local_resets = 10: {resets} RST_STREAM, then GOAWAY {goaway:?}");
    let (code, last_stream) = goaway.expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM, "GOAWAY(ENHANCE_YOUR_CALM)");
    // Streams 1, 3, ..., 19 were reset (10); the 11th (stream 21) crossed
    // the cap. The RST_STREAM frames queued before the GOAWAY may be
    // dropped with the connection.
    assert_eq!(last_stream, 21, "GOAWAY came at the 11th reset");
    assert!(resets <= 10, "{resets}");

    // The default cap (1024) lets the same 30 through as plain resets, so
    // the GOAWAY above came from the configured value.
    let default = Server::start(crate::harness::config()).await;
    let (resets, goaway) = provoke_resets(default.addr, 30).await;
    println!("default cap: {resets} RST_STREAM, GOAWAY {goaway:?}");
    assert_eq!(resets, 30);
    assert_eq!(goaway, None);
    // And the server still serves.
    let mut client = DetectorClient::new(connect(capped.addr).await);
    client
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_backs_off_instead_of_spinning() {
    let _serial = serial().await;
    let mut command = tokio::process::Command::new("bash");
    command
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" serve --device cpu --addr 127.0.0.1:0"#)
        .arg(BIN);
    let mut proc = Proc::spawn(command);
    let addr = proc.addr().await;
    // Open connections until the server runs out of descriptors.
    let mut held = Vec::new();
    while !proc.log().contains("accept failed") {
        assert!(
            held.len() < 500,
            "no accept failure after 500 connections:\n{}",
            proc.log()
        );
        for _ in 0..8 {
            held.push(TcpStream::connect(addr).await.expect("the kernel accepts"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failure = proc.wait_log("accept failed", Duration::from_secs(1)).await;
    println!("after {} connections: {failure}", held.len());
    // Held 3 s: how much CPU does the server burn meanwhile?
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu0, t0) = (cpu_seconds(proc.pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu1, wall) = (cpu_seconds(proc.pid), t0.elapsed());
    let share = (cpu1 - cpu0) / wall.as_secs_f64();
    println!(
        "out of fds: {:.2} s CPU in {:.2} s wall = {:.0}% of a core",
        cpu1 - cpu0,
        wall.as_secs_f64(),
        share * 100.0
    );
    assert!(
        share < 0.5,
        "the server used {:.0}% of a core while out of fds",
        share * 100.0
    );

    // Released: the server serves again.
    drop(held);
    let verdict = tokio::time::timeout(Duration::from_secs(20), async {
        let mut client = DetectorClient::new(connect(addr).await);
        client.detect_one(tiny("after")).await
    })
    .await
    .expect("answers within 20 s once descriptors are free")
    .expect("DetectOne");
    assert_judged(verdict.get_ref());
    proc.signal("TERM");
    assert!(proc.exit(Duration::from_secs(20)).await.is_some());
}
