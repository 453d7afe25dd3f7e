//! Fair decoding: a client streaming expensive frames waits behind its own
//! frames, not in front of everyone else's.

use std::time::{Duration, Instant};

use odin_sidecar::wire::odin_v1::Frame;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheap_call_on_another_connection_does_not_wait_for_a_streams_backlog() {
    let _serial = serial().await;
    let mut config = config();
    config.decode_threads = 1;
    let server = Server::start(config).await;
    // 2048² PNGs: a few KB each on the wire, ~100+ ms each to decode.
    let png = slow_png(2048);
    let frames: Vec<Frame> = (0..16)
        .map(|i| encoded_frame(&format!("a-{i}"), png.clone()))
        .collect();

    let mut a = server.client().await;
    let mut b = server.client().await; // another connection: another client
    let started = Instant::now();
    let (first, first_seen) = tokio::sync::oneshot::channel();
    let a_task = tokio::spawn(async move {
        let mut stream = a
            .detect(tokio_stream::iter(frames))
            .await
            .expect("Detect")
            .into_inner();
        let mut verdicts = Vec::new();
        let mut first = Some(first);
        while let Some(v) = stream.message().await.expect("no stream error") {
            verdicts.push((v, started.elapsed()));
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
        }
        verdicts
    });
    // A's first frame is answered: the other 15 are queued for the decoder.
    tokio::time::timeout(Duration::from_secs(30), first_seen)
        .await
        .expect("A's first verdict within 30 s")
        .expect("A's stream runs");
    let b_sent = started.elapsed();
    let b_verdict = b
        .detect_one(tiny("b"))
        .await
        .expect("DetectOne")
        .into_inner();
    let b_answered = started.elapsed();
    let a_verdicts = a_task.await.expect("A's stream");

    assert_eq!(a_verdicts.len(), 16);
    a_verdicts.iter().for_each(|(v, _)| assert_judged(v));
    assert_judged(&b_verdict);
    let a_done = a_verdicts.last().expect("16 verdicts").1;

    // A's decode_us counts its wait for the decoder too: frame k waits for
    // the k frames before it. The steps between consecutive frames are
    // single decodes.
    let a_decode: Vec<u64> = a_verdicts
        .iter()
        .map(|(v, _)| v.timings.as_ref().expect("timings").decode_us)
        .collect();
    let mut steps: Vec<u64> = a_decode
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    steps.sort_unstable();
    let single = steps[steps.len() / 2].max(1);
    let b_decode = b_verdict.timings.as_ref().expect("timings").decode_us;
    println!(
        "fairness: A's single-frame decode {:.1} ms (first frame {:.1} ms, last frame incl. wait {:.1} ms); \
         B sent at {:.0} ms, answered at {:.0} ms, B decode_us (incl. wait) {:.1} ms = {:.2}x A's single decode; \
         A's stream done at {:.0} ms",
        single as f64 / 1e3,
        a_decode[0] as f64 / 1e3,
        a_decode[15] as f64 / 1e3,
        b_sent.as_secs_f64() * 1e3,
        b_answered.as_secs_f64() * 1e3,
        b_decode as f64 / 1e3,
        b_decode as f64 / single as f64,
        a_done.as_secs_f64() * 1e3,
    );
    assert!(
        b_answered < a_done,
        "B ({b_answered:?}) must be answered before A's stream finishes ({a_done:?})"
    );
    // Round-robin: B waits for the decode in progress and at most one more
    // of A's, then its own (cheap) decode: about 2 of A's, never 15.
    assert!(
        b_decode <= 3 * single,
        "B waited {b_decode} us for the decoder, more than 3 of A's decodes ({single} us each)"
    );
}
