//! Batch formation (`gather`, on jobs made here), and the workers on the
//! built-in model in a real ONNX Runtime session.

use std::time::Duration;

use super::*;
use crate::pipeline::tests::{alone, engine, input};

const P1: Perturbation = Perturbation {
    temperature: 1000.0,
    epsilon: 0.0014,
};
const P2: Perturbation = Perturbation {
    temperature: 10.0,
    epsilon: 0.0014,
};

/// A job whose input is its name, and the receiver of its answer.
fn job(
    name: u8,
    perturbation: Option<Perturbation>,
) -> (Job, oneshot::Receiver<Result<Inference, FrameError>>) {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        input: vec![f32::from(name)],
        perturbation,
        enqueued: Instant::now(),
        trace: None,
        reply,
    };
    (job, answer)
}

fn options(max_batch: usize, max_queue_delay: Duration, queue_capacity: usize) -> BatchOptions {
    BatchOptions {
        max_batch,
        max_queue_delay,
        queue_capacity,
    }
}

/// Queues `jobs` (name, perturbation) before the batcher starts, runs it,
/// and returns the batches it forms, as names, until it has formed `n`.
async fn batches_of(
    jobs: &[(u8, Option<Perturbation>)],
    options: BatchOptions,
    n: usize,
) -> Vec<Vec<u8>> {
    let (queue, queued) = mpsc::channel(jobs.len().max(1));
    let mut answers = Vec::new();
    for (name, perturbation) in jobs {
        let (job, answer) = job(*name, *perturbation);
        queue.send(job).await.unwrap();
        answers.push(answer);
    }
    let (batches, mut formed) = mpsc::channel(64);
    let batcher = tokio::spawn(gather(queued, batches, options));
    let mut out = Vec::new();
    for _ in 0..n {
        let batch = tokio::time::timeout(Duration::from_secs(10), formed.recv())
            .await
            .expect("a batch within 10 s")
            .expect("the batcher runs");
        let keys: Vec<_> = batch
            .iter()
            .map(|j| j.perturbation.map(|p| p.key()))
            .collect();
        assert!(
            keys.windows(2).all(|w| w[0] == w[1]),
            "a batch mixes perturbations: {keys:?}"
        );
        out.push(batch.iter().map(|j| j.input[0] as u8).collect());
    }
    drop(queue);
    batcher.await.unwrap();
    // Nothing else was formed.
    assert!(formed.recv().await.is_none());
    out
}

#[tokio::test]
async fn a_batch_holds_at_most_max_batch_frames_in_arrival_order() {
    let jobs: Vec<_> = (0..10).map(|i| (i, Some(P1))).collect();
    let batches = batches_of(&jobs, options(4, Duration::ZERO, 64), 3).await;
    assert_eq!(batches, [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
}

#[tokio::test]
async fn only_frames_asking_for_the_same_perturbation_share_a_batch() {
    let jobs = [
        (0, Some(P1)),
        (1, Some(P2)),
        (2, Some(P1)),
        (3, None),
        (4, Some(P2)),
        (5, None),
    ];
    let batches = batches_of(&jobs, options(8, Duration::ZERO, 64), 3).await;
    assert_eq!(batches, [vec![0, 2], vec![1, 4], vec![3, 5]]);
}

#[tokio::test]
async fn frames_held_back_go_first_into_the_next_batch() {
    // 1 and 2 do not fit 0's batch; they are older than 4, so they lead
    // the next one, which 4 joins.
    let jobs = [
        (0, Some(P1)),
        (1, Some(P2)),
        (2, Some(P2)),
        (3, Some(P1)),
        (4, Some(P2)),
    ];
    let batches = batches_of(&jobs, options(3, Duration::ZERO, 64), 2).await;
    assert_eq!(batches, [vec![0, 3], vec![1, 2, 4]]);
    // Held frames lead even when newer ones of their kind fill the batch.
    let jobs = [
        (0, Some(P1)),
        (1, Some(P2)),
        (2, Some(P1)),
        (3, Some(P1)),
        (4, Some(P2)),
        (5, Some(P2)),
    ];
    let batches = batches_of(&jobs, options(2, Duration::ZERO, 64), 4).await;
    assert_eq!(batches, [vec![0, 2], vec![1, 4], vec![3], vec![5]]);
}

#[tokio::test]
async fn held_frames_count_against_the_queue_capacity() {
    // With room for 2 held frames, forming 0's batch stops once 1 and 2
    // are held, though 3 would have fitted.
    let jobs = [(0, Some(P1)), (1, Some(P2)), (2, Some(P2)), (3, Some(P1))];
    let batches = batches_of(&jobs, options(8, Duration::ZERO, 2), 3).await;
    assert_eq!(batches, [vec![0], vec![1, 2], vec![3]]);
}

#[tokio::test]
async fn with_a_queue_delay_a_lone_frame_waits_for_company_and_no_longer() {
    let (queue, queued) = mpsc::channel(8);
    let (batches, mut formed) = mpsc::channel(8);
    let delay = Duration::from_millis(300);
    tokio::spawn(gather(queued, batches, options(8, delay, 8)));
    let started = Instant::now();
    queue.send(job(0, None).0).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), formed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert!(
        started.elapsed() >= delay,
        "left after {:?}",
        started.elapsed()
    );

    // A frame that comes within the delay joins the waiting one.
    let (queue, queued) = mpsc::channel(8);
    let (batches, mut formed) = mpsc::channel(8);
    tokio::spawn(gather(
        queued,
        batches,
        options(8, Duration::from_secs(5), 8),
    ));
    queue.send(job(1, None).0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    queue.send(job(2, None).0).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), formed.recv())
        .await
        .unwrap()
        .unwrap();
    let names: Vec<u8> = batch.iter().map(|j| j.input[0] as u8).collect();
    assert_eq!(names, [1, 2]);
    drop(queue);
}

#[tokio::test]
async fn without_a_delay_a_lone_frame_does_not_wait() {
    let (queue, queued) = mpsc::channel(8);
    let (batches, mut formed) = mpsc::channel(8);
    // No other frame comes: were it to wait for company, none would come.
    tokio::spawn(gather(queued, batches, options(8, Duration::ZERO, 8)));
    queue.send(job(0, None).0).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), formed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 1);
    // The queue is still open: a later frame forms a batch of its own.
    queue.send(job(1, None).0).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), formed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].input[0], 1.0);
}

/// (runs, frames) the batch-size histogram has recorded.
fn recorded(telemetry: &Telemetry) -> (u64, f64) {
    let families = telemetry
        .metrics()
        .families(crate::telemetry::Gauges::default());
    let family = families
        .iter()
        .find(|f| f.name == "odin.batch.size")
        .unwrap();
    match &family.points[0].value {
        crate::telemetry::metrics::Value::Histogram(h) => (h.count, h.sum),
        other => panic!("{other:?}"),
    }
}

/// A job carrying a real input for the built-in model.
fn real_job(
    seed: usize,
    perturbation: Option<Perturbation>,
) -> (Job, oneshot::Receiver<Result<Inference, FrameError>>) {
    let (mut job, answer) = job(0, perturbation);
    job.input = input(seed);
    (job, answer)
}

#[test]
fn a_worker_does_not_compute_frames_whose_caller_left() {
    let telemetry = Arc::new(Telemetry::metrics_only());
    let (batches, formed) = mpsc::channel::<Vec<Job>>(4);
    let formed = Arc::new(Mutex::new(formed));
    let worker = {
        let (formed, telemetry) = (Arc::clone(&formed), Arc::clone(&telemetry));
        let engine = engine(false);
        std::thread::spawn(move || work(engine, &formed, &telemetry))
    };
    // Three frames, the middle one's caller gone; then a batch whose only
    // caller is gone.
    let (a, a_answer) = real_job(1, None);
    let (b, b_answer) = real_job(2, None);
    let (c, c_answer) = real_job(3, None);
    drop(b_answer);
    let (d, d_answer) = real_job(4, None);
    drop(d_answer);
    batches.blocking_send(vec![a, b, c]).unwrap();
    batches.blocking_send(vec![d]).unwrap();
    drop(batches);
    worker.join().unwrap();

    assert_eq!(
        recorded(&telemetry),
        (1, 2.0),
        "one run of the two live frames"
    );
    for (seed, answer) in [(1, a_answer), (3, c_answer)] {
        let inference = answer.blocking_recv().unwrap().unwrap();
        assert_eq!(inference.batch_size, 2);
        let want = alone(&input(seed));
        assert_eq!(inference.logits.len(), want.len());
        for (got, want) in inference.logits.iter().zip(&want) {
            assert!((got - want).abs() < 1e-5, "seed {seed}: {got} vs {want}");
        }
        assert!(inference.perturbed_logits.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_gets_its_own_logits_whatever_it_was_batched_with() {
    let telemetry = Arc::new(Telemetry::metrics_only());
    let batcher = Batcher::start(
        vec![engine(true), engine(true)],
        options(4, Duration::from_millis(5), 16),
        Arc::clone(&telemetry),
    );
    let perturbations = [None, Some(P1), Some(P2)];
    let mut calls = Vec::new();
    for seed in 0..24 {
        let batcher = batcher.clone();
        let perturbation = perturbations[seed % 3];
        calls.push(tokio::spawn(async move {
            (
                seed,
                perturbation,
                batcher.infer(input(seed), perturbation, None).await,
            )
        }));
    }
    let mut frames = 0;
    for call in calls {
        let (seed, perturbation, inference) = call.await.unwrap();
        let inference = inference.unwrap();
        let want = alone(&input(seed));
        for (got, want) in inference.logits.iter().zip(&want) {
            assert!((got - want).abs() < 1e-5, "seed {seed}: {got} vs {want}");
        }
        assert_eq!(
            inference.perturbed_logits.is_some(),
            perturbation.is_some(),
            "seed {seed}"
        );
        if let Some(perturbed) = &inference.perturbed_logits {
            assert_eq!(perturbed.len(), want.len());
            assert_ne!(perturbed, &inference.logits, "ε moved the logits");
        }
        assert!((1..=4).contains(&inference.batch_size));
        assert!(!inference.compute.is_zero());
        frames += 1;
    }
    assert_eq!(frames, 24);
    let (runs, computed) = recorded(&telemetry);
    assert_eq!(computed, 24.0, "every frame computed once");
    assert!(runs >= 24 / 4, "{runs} runs");
    assert_eq!(batcher.queued(), 0);
}
