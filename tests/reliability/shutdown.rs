//! Shutdown of the real binary on SIGTERM: stop taking work, answer every
//! frame already accepted, end open streams with UNAVAILABLE, exit 0 within
//! the grace period whatever clients do; a second signal exits at once.

use std::time::{Duration, Instant};

use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::{Frame, Verdict};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::*;

/// A Detect stream fed from a channel the test holds (so it never
/// half-closes unless the test drops the sender).
struct OpenStream {
    frames: mpsc::Sender<Frame>,
    verdicts: tonic::Streaming<Verdict>,
}

impl OpenStream {
    async fn open(client: &mut DetectorClient<tonic::transport::Channel>) -> OpenStream {
        let (frames, rx) = mpsc::channel(64);
        let verdicts = client
            .detect(ReceiverStream::new(rx))
            .await
            .expect("Detect")
            .into_inner();
        OpenStream { frames, verdicts }
    }

    async fn send(&self, frame: Frame) {
        // After the drain the server no longer reads; the send itself
        // still goes into the client's buffer.
        let _ = self.frames.send(frame).await;
    }

    /// Every verdict until the stream ends, and how it ended.
    async fn rest(&mut self) -> (Vec<Verdict>, Status) {
        let mut verdicts = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.verdicts.message()).await {
                Err(_) => panic!("the stream did not end within 30 s"),
                Ok(Ok(Some(v))) => verdicts.push(v),
                Ok(Ok(None)) => return (verdicts, Status::ok("")),
                Ok(Err(status)) => return (verdicts, status),
            }
        }
    }
}

/// Sends SIGTERM, waits for the exit; returns its status and how long the
/// drain took.
async fn terminate(proc: &mut Proc, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    proc.signal("TERM");
    let status = proc
        .exit(limit)
        .await
        .unwrap_or_else(|| panic!("still running {limit:?} after SIGTERM:\n{}", proc.log()));
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_ends_unavailable_and_the_process_exits_0_within_the_grace() {
    let _serial = serial().await;
    let mut proc = Proc::serve(&["--addr", "127.0.0.1:0", "--shutdown-grace-s", "2"]);
    let mut client = DetectorClient::new(connect(proc.addr().await).await);
    let mut stream = OpenStream::open(&mut client).await;
    stream.send(tiny("before")).await;
    let first = stream
        .verdicts
        .message()
        .await
        .expect("ok")
        .expect("a verdict");
    assert_judged(&first);

    let started = Instant::now();
    proc.signal("TERM");
    let (rest, end) = stream.rest().await;
    let ended_after = started.elapsed();
    let status = proc
        .exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", proc.log()));
    let exited_after = started.elapsed();
    println!(
        "idle stream: ended {:?} after {ended_after:?}; exit {status} after {exited_after:?}",
        end.code()
    );
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(status.success(), "{status}\n{}", proc.log());
    assert!(
        exited_after < Duration::from_secs(3),
        "exits within the 2 s grace (+1 s): {exited_after:?}"
    );
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_accepted_before_sigterm_are_answered_and_later_ones_are_not_read() {
    let _serial = serial().await;
    let mut proc = Proc::serve(&[
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--decode-threads",
        "1",
        "--shutdown-grace-s",
        "15",
    ]);
    let addr = proc.addr().await;
    let metrics = proc.metrics_addr().await;
    let slow = slow_png(2048);
    let mut streams = Vec::new();
    for s in 0..4 {
        let mut client = DetectorClient::new(connect(addr).await);
        let stream = OpenStream::open(&mut client).await;
        for i in 0..3 {
            stream
                .send(encoded_frame(&format!("s{s}-{i}"), slow.clone()))
                .await;
        }
        streams.push((client, stream));
    }
    // All 12 are read (in flight) before the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let in_flight = metric(&scrape(metrics).await, "odin_frames_in_flight");
        if in_flight >= 12.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {in_flight} frames in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    proc.signal("TERM");
    proc.wait_log("draining open streams", Duration::from_secs(10))
        .await;
    // Sent after the drain began: never read, never answered.
    for (s, (_, stream)) in streams.iter().enumerate() {
        for i in 3..5 {
            stream.send(tiny(&format!("s{s}-{i}"))).await;
        }
    }
    for (s, (_, stream)) in streams.iter_mut().enumerate() {
        let (verdicts, end) = stream.rest().await;
        let ids: Vec<&str> = verdicts.iter().map(|v| v.frame_id.as_str()).collect();
        let want: Vec<String> = (0..3).map(|i| format!("s{s}-{i}")).collect();
        assert_eq!(
            ids, want,
            "stream {s}: the accepted frames, in order, and no more"
        );
        verdicts.iter().for_each(assert_judged);
        assert_eq!(end.code(), Code::Unavailable, "stream {s}: {end:?}");
    }
    let answered_after = started.elapsed();
    let status = proc
        .exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("still running:\n{}", proc.log()));
    let exited_after = started.elapsed();
    println!(
        "4 streams x 3 slow frames in flight: all answered {answered_after:?} after SIGTERM, \
         exit {status} after {exited_after:?}"
    );
    assert!(status.success(), "{status}\n{}", proc.log());
    assert!(exited_after < Duration::from_secs(15), "within the grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_readyz_is_503_and_health_is_not_serving() {
    let _serial = serial().await;
    let mut proc = Proc::serve(&[
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--shutdown-grace-s",
        "3",
    ]);
    let addr = proc.addr().await;
    let metrics = proc.metrics_addr().await;
    assert_eq!(http_get(metrics, "/readyz").await.0, 200);
    // A health Watch opened before the signal: it reports each change and
    // never ends by itself, so it also keeps the drain going to the grace.
    let mut health = HealthClient::new(connect(addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.message().await.expect("ok").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    let started = Instant::now();
    proc.signal("TERM");
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status change within 5 s")
        .expect("ok")
        .expect("a status");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let (ready, body) = http_get(metrics, "/readyz").await;
    let (live, _) = http_get(metrics, "/healthz").await;
    let at = started.elapsed();
    println!("{at:?} into the drain: /readyz {ready} {body:?}, /healthz {live}");
    assert_eq!(ready, 503, "{body}");
    assert_eq!(live, 200, "the process is alive");
    assert!(
        proc.child.try_wait().expect("wait").is_none(),
        "still draining"
    );

    let status = proc
        .exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running:\n{}", proc.log()));
    let exited_after = started.elapsed();
    println!("health Watch never closed: exit {status} after {exited_after:?} (grace 3 s)");
    assert!(status.success(), "{status}");
    assert!(
        exited_after < Duration::from_secs(5),
        "the grace (3 s) bounds the drain: {exited_after:?}"
    );
    assert!(proc.log().contains("grace period over"), "{}", proc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_exits_at_once_with_130() {
    let _serial = serial().await;
    let mut proc = Proc::serve(&["--addr", "127.0.0.1:0", "--shutdown-grace-s", "20"]);
    let mut health = HealthClient::new(connect(proc.addr().await).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    let _ = watch.message().await.expect("ok");
    proc.signal("TERM");
    proc.wait_log("draining open streams", Duration::from_secs(10))
        .await;
    let started = Instant::now();
    proc.signal("TERM");
    let status = proc.exit(Duration::from_secs(5)).await.unwrap_or_else(|| {
        panic!(
            "still running 5 s after the second SIGTERM:\n{}",
            proc.log()
        )
    });
    println!(
        "second SIGTERM: exit {status} after {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_closes_or_reads_cannot_hold_the_process_past_the_grace() {
    let _serial = serial().await;
    let mut proc = Proc::serve(&["--addr", "127.0.0.1:0", "--shutdown-grace-s", "2"]);
    let addr = proc.addr().await;
    // Raw HTTP/2: open a Detect stream, send a frame, then never read,
    // never write again, never close.
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let h2 = h2_bytes_detect(&addr.to_string(), &tiny("stuck").encode_to_vec());
    tcp.write_all(&h2).await.expect("writes");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, took) = terminate(&mut proc, Duration::from_secs(10)).await;
    println!("a stuck client: exit {status} after {took:?} (grace 2 s)");
    assert!(status.success(), "{status}\n{}", proc.log());
    assert!(took < Duration::from_secs(4), "{took:?}");
    drop(tcp);
}

/// Raw HTTP/2 bytes: preface, SETTINGS, HEADERS of a Detect call (no
/// END_STREAM) and one DATA frame with `message`.
fn h2_bytes_detect(authority: &str, message: &[u8]) -> Vec<u8> {
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    };
    let path = b"/odin.v1.Detector/Detect";
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.push(0x01);
    block.push(authority.len() as u8);
    block.extend_from_slice(authority.as_bytes());
    for (name, value) in [
        (&b"content-type"[..], &b"application/grpc"[..]),
        (b"te", b"trailers"),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block)); // END_HEADERS only
    out.extend(frame(0x0, 0, 1, &crate::http2::grpc_message(message)));
    out
}
