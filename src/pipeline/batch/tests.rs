//! Batch formation (`next_batch`, on jobs queued here by client), and the
//! workers on the built-in model in a real ONNX Runtime session.

use std::time::Duration;

use super::*;
use crate::pipeline::tests::{alone, engine, input};
use crate::score::Method;

const P1: Perturbation = Perturbation {
    temperature: 1000.0,
    epsilon: 0.0014,
};
const P2: Perturbation = Perturbation {
    temperature: 10.0,
    epsilon: 0.0014,
};

/// ODIN at `perturbation`, or MSP without one, with no feature statistics.
fn score_with(perturbation: Option<Perturbation>) -> ScoreWith {
    let scoring = match perturbation {
        Some(p) => Scoring {
            method: Method::Odin,
            temperature: p.temperature,
            epsilon: p.epsilon,
        },
        None => Scoring {
            method: Method::Msp,
            temperature: 1.0,
            epsilon: 0.0,
        },
    };
    ScoreWith {
        scoring,
        scorers: Arc::new(Scorers::new(Vec::new(), None, None)),
    }
}

/// A job whose input is its name, and the receiver of its answer.
fn job(
    name: u8,
    perturbation: Option<Perturbation>,
) -> (Job, oneshot::Receiver<Result<Inference, FrameError>>) {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        input: vec![f32::from(name)],
        perturbation,
        score: score_with(perturbation),
        deadline: None,
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

fn shared(options: BatchOptions) -> Shared {
    Shared {
        queues: Mutex::new(Queues::default()),
        work: Condvar::new(),
        options,
    }
}

/// Queues a job for `client`, as `Batcher::infer` does.
fn push(shared: &Shared, client: u64, job: Job) {
    let mut queues = lock(&shared.queues);
    let client = ClientId(client);
    let queue = queues.clients.entry(client).or_default();
    let first = queue.jobs.is_empty();
    queue.jobs.push_back(job);
    if first {
        queues.turns.push_back(client);
    }
    queues.queued += 1;
    drop(queues);
    shared.work.notify_one();
}

/// Queues `jobs` (client, name, perturbation), then forms batches until the
/// queues are empty; returns them as names.
fn batches_of(jobs: &[(u64, u8, Option<Perturbation>)], options: BatchOptions) -> Vec<Vec<u8>> {
    let shared = shared(options);
    let mut answers = Vec::new();
    for (client, name, perturbation) in jobs {
        let (job, answer) = job(*name, *perturbation);
        push(&shared, *client, job);
        answers.push(answer);
    }
    let mut out = Vec::new();
    while lock(&shared.queues).queued > 0 {
        let batch = next_batch(&shared).expect("a batch");
        out.push(batch.iter().map(|j| j.input[0] as u8).collect());
    }
    out
}

#[test]
fn a_batch_holds_at_most_max_batch_frames_in_arrival_order() {
    let jobs: Vec<_> = (0..7).map(|n| (1, n, None)).collect();
    let batches = batches_of(&jobs, options(3, Duration::ZERO, 64));
    assert_eq!(batches, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
}

#[test]
fn only_frames_asking_for_the_same_perturbation_share_a_batch() {
    let jobs = [
        (1, 0, Some(P1)),
        (2, 1, Some(P2)),
        (3, 2, Some(P1)),
        (4, 3, None),
        (5, 4, Some(P1)),
    ];
    let batches = batches_of(&jobs, options(8, Duration::ZERO, 64));
    assert_eq!(batches, vec![vec![0, 2, 4], vec![1], vec![3]]);
}

#[test]
fn clients_are_taken_in_turn_and_each_keeps_its_order() {
    // Client 1 queued six frames before clients 2 and 3 queued one each.
    let mut jobs: Vec<_> = (0..6).map(|n| (1, n, None)).collect();
    jobs.extend([(2, 10, None), (3, 20, None)]);
    let batches = batches_of(&jobs, options(4, Duration::ZERO, 64));
    // The late clients ride in the first batch, not behind client 1's backlog.
    assert_eq!(batches, vec![vec![0, 10, 20, 1], vec![2, 3, 4, 5]]);
}

#[test]
fn a_client_whose_next_frame_differs_waits_its_turn_in_order() {
    // Client 1: P1 then None; client 2: None. Frame 1 does not jump ahead
    // of frame 0 into a batch of None; client 2, whose turn came after
    // client 1's first, leads the next batch.
    let jobs = [(1, 0, Some(P1)), (1, 1, None), (2, 2, None)];
    let batches = batches_of(&jobs, options(8, Duration::ZERO, 64));
    assert_eq!(batches, vec![vec![0], vec![2, 1]]);
}

#[test]
fn with_a_queue_delay_a_lone_frame_waits_for_company_and_no_longer() {
    let shared = Arc::new(shared(options(8, Duration::from_millis(300), 64)));
    let (first, _a) = job(0, None);
    push(&shared, 1, first);
    let late = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let (second, answer) = job(1, None);
            push(&shared, 2, second);
            answer
        })
    };
    let started = Instant::now();
    let batch = next_batch(&shared).expect("a batch");
    let waited = started.elapsed();
    let _answer = late.join().unwrap();
    let names: Vec<u8> = batch.iter().map(|j| j.input[0] as u8).collect();
    assert_eq!(names, [0, 1], "the frame that came within the delay joined");
    assert!(waited >= Duration::from_millis(290), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn without_a_delay_a_lone_frame_does_not_wait() {
    let shared = shared(options(8, Duration::ZERO, 64));
    let (only, _a) = job(0, None);
    push(&shared, 1, only);
    let started = Instant::now();
    let batch = next_batch(&shared).expect("a batch");
    assert_eq!(batch.len(), 1);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test]
async fn a_client_past_its_queue_capacity_waits_and_others_do_not() {
    let telemetry = Arc::new(Telemetry::metrics_only());
    // No engines: nothing is taken from the queues.
    let batcher = Batcher::start(Vec::new(), options(8, Duration::ZERO, 2), telemetry);
    let submit = |client: u64| {
        let batcher = batcher.clone();
        tokio::spawn(async move {
            batcher
                .infer(ClientId(client), vec![0.0], score_with(None), None, None)
                .await
        })
    };
    let _a = submit(1);
    let _b = submit(1);
    let blocked = submit(1);
    let other = submit(2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Client 1 holds its two places; its third frame waits outside the
    // queue, while client 2's frame is queued.
    assert_eq!(batcher.queued(), 3);
    assert!(!blocked.is_finished() && !other.is_finished());
    blocked.abort();
    other.abort();
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
fn a_worker_does_not_compute_frames_whose_caller_left_or_whose_deadline_passed() {
    let telemetry = Arc::new(Telemetry::metrics_only());
    let shared = Arc::new(shared(options(8, Duration::ZERO, 64)));
    // Three frames, the middle one's caller gone; then one whose deadline
    // has passed.
    let (a, a_answer) = real_job(1, None);
    let (b, b_answer) = real_job(2, None);
    let (c, c_answer) = real_job(3, None);
    drop(b_answer);
    let (mut d, d_answer) = real_job(4, None);
    d.deadline = Some(Instant::now());
    for job in [a, b, c, d] {
        push(&shared, 1, job);
    }
    let worker = {
        let (shared, telemetry) = (Arc::clone(&shared), Arc::clone(&telemetry));
        let engine = engine(false);
        std::thread::spawn(move || work(engine, &shared, &telemetry))
    };
    let late = d_answer.blocking_recv().unwrap();
    assert_eq!(late.err(), Some(FrameError::DeadlineExceeded));
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
    assert_eq!(
        recorded(&telemetry),
        (1, 2.0),
        "one run of the two live frames"
    );
    lock(&shared.queues).closed = true;
    shared.work.notify_all();
    worker.join().unwrap();
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
                batcher
                    .infer(
                        ClientId(seed as u64 % 3),
                        input(seed),
                        score_with(perturbation),
                        None,
                        None,
                    )
                    .await,
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
        // Scored with its own scoring, whatever its batch mates asked for.
        let (logits, t) = match perturbation {
            Some(p) => (
                inference.perturbed_logits.as_deref().unwrap(),
                p.temperature,
            ),
            None => (&inference.logits[..], 1.0),
        };
        let top = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f32 = logits.iter().map(|&v| ((v - top) / t).exp()).sum();
        assert!(
            (inference.score - 1.0 / sum).abs() < 1e-5,
            "seed {seed}: score {} vs {}",
            inference.score,
            1.0 / sum
        );
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
