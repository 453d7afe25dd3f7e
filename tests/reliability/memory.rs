//! The memory budget: one bound on the bytes of frames held, over every
//! stream and call. Unary calls past it are refused at once; streams past
//! it wait (are not read) and lose nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use odin_sidecar::wire::odin_v1::Frame;
use tonic::Code;

use crate::harness::*;

const MIB: usize = 1 << 20;
/// The smallest budget the server accepts: one frame of the largest size.
const BUDGET: usize = 16 * MIB;
/// A raw frame of about 6 MiB: two fit in the budget, three do not.
const SIDE: u32 = 1448;

fn big(id: &str, seed: u64) -> Frame {
    raw_frame(id, SIDE, SIDE, noise((SIDE * SIDE * 3) as usize, seed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_past_the_budget_are_refused_and_the_budget_is_returned() {
    let _serial = serial().await;
    let mut config = config();
    config.memory_budget = BUDGET;
    // One decoder: admitted frames stay held while they wait for it.
    config.decode_threads = 1;
    let server = Server::start(config).await;
    let before = metric(&server.scrape().await, "odin_calls_refused_total");
    let channels = [
        server.channel().await,
        server.channel().await,
        server.channel().await,
    ];
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let mut client = odin_sidecar::wire::odin_v1::detector_client::DetectorClient::new(
                channels[i % 3].clone(),
            );
            let frame = big(&format!("big-{i}"), i as u64);
            tokio::spawn(async move { client.detect_one(frame).await })
        })
        .collect();
    let (mut judged, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(verdict) => {
                assert_judged(verdict.get_ref());
                judged += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("16 MiB") && status.message().contains("budget"),
                    "the refusal names the budget: {}",
                    status.message()
                );
                refused += 1;
            }
        }
    }
    println!(
        "12 concurrent 6 MiB DetectOne calls, 16 MiB budget: {judged} judged, {refused} refused"
    );
    assert!(judged >= 1, "some calls must get real verdicts");
    assert!(refused >= 1, "some calls must be refused");
    assert_eq!(
        settle(server.metrics, "odin_frames_held_bytes", 0.0).await,
        0.0,
        "every charge is returned"
    );
    let after = metric(&server.scrape().await, "odin_calls_refused_total");
    assert_eq!(
        after - before,
        f64::from(refused),
        "each refusal is counted"
    );
    // And the budget is whole again: a big frame gets in.
    let verdict = server
        .client()
        .await
        .detect_one(big("again", 99))
        .await
        .expect("admitted once the others are done");
    assert_judged(verdict.get_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_budget_wait_and_lose_nothing() {
    let _serial = serial().await;
    let mut config = config();
    config.memory_budget = BUDGET;
    let server = Server::start(config).await;

    // Sample the held bytes as often as possible while the streams run.
    let running = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (running, peak, pipeline) = (
            Arc::clone(&running),
            Arc::clone(&peak),
            Arc::clone(&server.pipeline),
        );
        tokio::spawn(async move {
            let mut samples = 0usize;
            while running.load(Ordering::Relaxed) {
                peak.fetch_max(pipeline.held_bytes(), Ordering::Relaxed);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples
        })
    };
    // And through /metrics, as an operator sees it.
    let scraper = {
        let (running, metrics) = (Arc::clone(&running), server.metrics);
        tokio::spawn(async move {
            let mut peak = 0.0f64;
            while running.load(Ordering::Relaxed) {
                peak = peak.max(metric(&scrape(metrics).await, "odin_frames_held_bytes"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };

    let mut handles = Vec::new();
    for s in 0..3 {
        let frames: Vec<Frame> = (0..5)
            .map(|i| big(&format!("s{s}-{i}"), (s * 10 + i) as u64))
            .collect();
        let client = server.client().await;
        handles.push(tokio::spawn(detect_all(client, frames)));
    }
    for (s, handle) in handles.into_iter().enumerate() {
        let verdicts = handle.await.expect("stream task");
        let ids: Vec<String> = verdicts.iter().map(|v| v.frame_id.clone()).collect();
        let want: Vec<String> = (0..5).map(|i| format!("s{s}-{i}")).collect();
        assert_eq!(ids, want, "every frame answered, in order");
        verdicts.iter().for_each(assert_judged);
    }
    running.store(false, Ordering::Relaxed);
    let samples = sampler.await.expect("sampler");
    let scraped = scraper.await.expect("scraper");
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "3 streams x 5 frames of 6 MiB, 16 MiB budget: peak held {peak} bytes \
         ({samples} samples), peak on /metrics {scraped}"
    );
    assert!(peak > 0, "the sampler saw frames held");
    assert!(peak <= BUDGET, "held {peak} > budget {BUDGET}");
    assert!(scraped <= BUDGET as f64, "/metrics showed {scraped}");
    assert_eq!(
        settle(server.metrics, "odin_frames_held_bytes", 0.0).await,
        0.0
    );
}

/// A message counts against the receive budget from its length prefix:
/// calls that announce large messages and then stall hold it, so the next
/// large unary call is refused at once rather than buffered whole beside
/// them (256 such calls held 0.7 GB before); small calls still fit, and the
/// budget comes back when the stalled calls go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_their_way_in_count_against_the_receive_budget() {
    let _serial = serial().await;
    let mut config = config();
    config.network.receive_budget = BUDGET;
    let server = Server::start(config).await;
    let mut h2 = crate::http2::h2_connect(server.addr).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (response, mut body) = h2.open("/odin.v1.Detector/DetectOne", &[]).await;
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(7 * MIB as u32).to_be_bytes());
        body.send_data(bytes::Bytes::from(prefix), false)
            .expect("send the prefix");
        stalled.push((response, body));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = server.client().await;
    let status = client
        .detect_one(big("big", 1))
        .await
        .expect_err("14 MiB of 16 are announced: a 6 MiB frame does not fit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("receive budget (16 MiB)"),
        "{}",
        status.message()
    );
    assert_judged(
        client
            .detect_one(tiny("small"))
            .await
            .expect("fits")
            .get_ref(),
    );

    for (_, mut body) in stalled {
        body.send_reset(h2::Reason::CANCEL);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let verdict = client
        .detect_one(big("big-again", 2))
        .await
        .expect("the stalled calls' share came back");
    assert_judged(verdict.get_ref());
}
