//! Per-stream ordering and the read-ahead window, driving a real pipeline
//! (the built-in model on CPU) with frame streams made here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_stream::StreamExt;

use super::*;
use crate::domain::ImageInput;
use crate::error::FrameError;
use crate::pipeline::tests::{batching, frame, pipeline, scoring};

fn options(window: usize) -> StreamOptions {
    // A sender dropped at once: the stream is never drained.
    let (_, draining) = watch::channel(false);
    StreamOptions {
        window,
        caller: Caller::in_process(),
        draining,
        admitted: AdmitHook::default(),
    }
}

/// A noisy `side × side` PNG: decoding and resizing it takes a while.
fn large_png(side: u32, seed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        let v = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed;
        image::Rgb([(v >> 3) as u8, (v >> 11) as u8, (v >> 19) as u8])
    });
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// `n` frames with ids "0", "1", ...
fn frames(n: usize) -> Vec<Result<FrameRequest, tonic::Status>> {
    (0..n).map(|i| Ok(frame(&i.to_string(), i))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_keep_frame_order_though_later_frames_finish_first() {
    let p = pipeline(scoring(false), batching());
    // Slow frames (a large PNG to decode and resize) each followed by one
    // refused on arrival, which is ready at once.
    let mut inbound = Vec::new();
    for i in 0..4u32 {
        let mut slow = frame(&format!("slow-{i}"), 0);
        slow.image = Some(ImageInput::Encoded(large_png(1024, i)));
        let mut quick = frame(&format!("quick-{i}"), 0);
        quick.scoring = Some(crate::domain::ScoringRequest {
            method: Some("bogus".into()),
            ..Default::default()
        });
        inbound.push(Ok::<_, tonic::Status>(slow));
        inbound.push(Ok(quick));
    }
    let (answers, mut received) = mpsc::channel(16);
    let driver = tokio::spawn(drive(
        Arc::clone(&p),
        tokio_stream::iter(inbound),
        answers,
        |judgement| judgement,
        options(64),
    ));
    let mut got = Vec::new();
    while let Some(answer) = received.recv().await {
        got.push(answer.unwrap());
    }
    driver.await.unwrap();
    let ids: Vec<&str> = got.iter().map(|j| j.frame_id.as_str()).collect();
    assert_eq!(
        ids,
        ["slow-0", "quick-0", "slow-1", "quick-1", "slow-2", "quick-2", "slow-3", "quick-3"]
    );
    for pair in got.chunks_exact(2) {
        let (slow, quick) = (&pair[0], &pair[1]);
        assert!(slow.outcome.is_ok(), "{:?}", slow.outcome);
        assert!(matches!(quick.outcome, Err(FrameError::UnknownMethod(_))));
        // The quick frame was ready long before the slow one it waited for.
        assert!(
            quick.timings.total < slow.timings.total,
            "{:?} vs {:?}",
            quick.timings,
            slow.timings
        );
    }
    assert_eq!(p.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_read_at_most_window_frames_ahead() {
    const WINDOW: usize = 4;
    let p = pipeline(scoring(false), batching());
    let pulled = Arc::new(AtomicUsize::new(0));
    let inbound = {
        let pulled = Arc::clone(&pulled);
        tokio_stream::iter(frames(100)).map(move |f| {
            pulled.fetch_add(1, Ordering::SeqCst);
            f
        })
    };
    // Room for one answer, which nobody reads for now.
    let (answers, mut received) = mpsc::channel(1);
    let driver = tokio::spawn(drive(
        Arc::clone(&p),
        inbound,
        answers,
        |judgement| judgement,
        options(WINDOW),
    ));
    // It reads WINDOW frames at once; then, with answers ready, at most one
    // more: WINDOW in flight and one answer in the channel, or WINDOW - 1
    // in flight, one in the channel and one waiting to go in.
    for _ in 0..1000 {
        if pulled.load(Ordering::SeqCst) >= WINDOW {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = pulled.load(Ordering::SeqCst);
    assert!(
        (WINDOW..=WINDOW + 1).contains(&read),
        "{read} frames read with a window of {WINDOW}"
    );
    assert!(p.in_flight() <= WINDOW + 1);

    let mut ids = Vec::new();
    while let Some(answer) = received.recv().await {
        ids.push(answer.unwrap().frame_id);
    }
    driver.await.unwrap();
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(ids, want);
    assert_eq!(pulled.load(Ordering::SeqCst), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_inbound_stream_is_read_no_further_but_its_frames_are_answered() {
    let p = pipeline(scoring(false), batching());
    let mut inbound = frames(5);
    inbound.push(Err(tonic::Status::invalid_argument("malformed message")));
    inbound.extend(frames(3).into_iter().map(|f| {
        f.map(|mut f| {
            f.id = format!("after-{}", f.id);
            f
        })
    }));
    let (answers, mut received) = mpsc::channel(16);
    let driver = tokio::spawn(drive(
        Arc::clone(&p),
        tokio_stream::iter(inbound),
        answers,
        |judgement| judgement,
        options(64),
    ));
    let (mut ids, mut ending) = (Vec::new(), None);
    while let Some(answer) = received.recv().await {
        match answer {
            Ok(judgement) => {
                assert!(ending.is_none(), "no answer after the stream's error");
                assert!(judgement.outcome.is_ok());
                ids.push(judgement.frame_id);
            }
            Err(status) => ending = Some(status),
        }
    }
    driver.await.unwrap();
    assert_eq!(ids, ["0", "1", "2", "3", "4"]);
    // The stream ends with the inbound error, after the answers due.
    let ending = ending.expect("the stream's error");
    assert_eq!(ending.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_receiver_leaves_pending_frames_are_dropped_uncomputed() {
    const SENT: usize = 256;
    // ODIN, one frame per run: slow enough that most frames are pending.
    let mut odin = scoring(true);
    odin.scoring = crate::score::Scoring {
        method: crate::score::Method::Odin,
        temperature: 1000.0,
        epsilon: 0.0014,
    };
    let mut batch = batching();
    batch.max_batch = 1;
    batch.queue_capacity = SENT;
    let p = pipeline(odin, batch);
    // The first frame takes long to decode: the frames behind it are
    // computed meanwhile, and none of them can be answered before it.
    let mut inbound = frames(SENT);
    if let Ok(first) = &mut inbound[0] {
        first.image = Some(ImageInput::Encoded(large_png(2048, 0)));
    }
    // Room for one answer, which nobody reads.
    let (answers, received) = mpsc::channel(1);
    let driver = tokio::spawn(drive(
        Arc::clone(&p),
        tokio_stream::iter(inbound),
        answers,
        |judgement| judgement,
        options(SENT),
    ));
    for _ in 0..3000 {
        if p.in_flight() >= SENT * 3 / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let computed = || p.telemetry().metrics().batch_size.count() as usize;
    let before = computed();
    assert!(
        p.in_flight() >= SENT * 3 / 4 && before <= SENT / 2,
        "{} frames pending, {before} computed",
        p.in_flight()
    );
    drop(received);
    tokio::time::timeout(Duration::from_secs(30), driver)
        .await
        .expect("drive returns once the receiver is gone")
        .unwrap();
    for _ in 0..1000 {
        if p.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.in_flight(), 0, "every pending frame was dropped");
    // Let runs already handed to the worker finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = computed() - before;
    assert!(
        after <= 8,
        "{after} frames computed after the receiver left ({before} before)"
    );
}
