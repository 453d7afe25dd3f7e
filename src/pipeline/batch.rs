//! Batch and infer stages: frames from every stream and unary call wait in
//! one queue per client; each engine worker, whenever it is free, forms its
//! next batch from what is waiting at that moment (up to `max_batch`, taking
//! the clients in turn, and waiting at most `max_queue_delay` for company)
//! and runs it on its own ONNX Runtime session. Forming batches when a
//! worker can take them — not as frames arrive — is what lets batches grow
//! with load by themselves, as Triton's dynamic batcher does with a zero
//! delay, while a lone frame on an idle server runs at once.
//!
//! Only frames asking for the same perturbation (T, ε) share a batch,
//! because G takes them as scalars. Each client's frames run in arrival
//! order; taking clients in turn means one client's backlog delays another
//! client by at most a batch. A client's queue is bounded: past it, its
//! submitters wait, stream readers stop reading, and HTTP/2 flow control
//! pushes back on that producer only.
//!
//! Workers are std threads, outside any span context, so each job carries
//! its frame's trace; the worker records the batch span (linked to those
//! frames) and each frame's queue and batch stages once the run is over.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::fair::ClientId;
use crate::engine::{BatchOutput, Engine};
use crate::error::FrameError;
use crate::score::{BatchView, Perturbation, Scorers, Scoring};
use crate::telemetry::{BatchTrace, FrameTrace, Telemetry};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most frames in one engine run.
    pub max_batch: usize,
    /// Longest a frame waits for others to join its batch. Zero batches only
    /// what is already queued, so a lone frame on an idle server never waits.
    pub max_queue_delay: Duration,
    /// Frames one client may have waiting before its submitters are held back.
    pub queue_capacity: usize,
}

/// How a frame is to be scored once its batch has run: its scoring and the
/// statistics and detectors of the generation that judges it.
#[derive(Debug, Clone)]
pub struct ScoreWith {
    /// Method, temperature and ε.
    pub scoring: Scoring,
    /// The generation's scorers.
    pub scorers: Arc<Scorers>,
}

/// Frames with equal keys are scored together: the same scorers and scoring.
type GroupKey = (usize, String, u32, u32);

impl ScoreWith {
    fn key(&self) -> GroupKey {
        (
            Arc::as_ptr(&self.scorers) as *const () as usize,
            self.scoring.method.to_string(),
            self.scoring.temperature.to_bits(),
            self.scoring.epsilon.to_bits(),
        )
    }
}

/// One frame's input on its way to the engine.
#[derive(Debug)]
struct Job {
    input: Vec<f32>,
    perturbation: Option<Perturbation>,
    score: ScoreWith,
    // Past this instant the answer is useless: the frame is refused, not computed.
    deadline: Option<Instant>,
    enqueued: Instant,
    // The frame's span, when it is traced.
    trace: Option<FrameTrace>,
    reply: oneshot::Sender<Result<Inference, FrameError>>,
}

/// What the engine computed for one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    /// The frame's logits.
    pub logits: Vec<f32>,
    /// The logits of the perturbed frame, when a perturbation was asked for.
    pub perturbed_logits: Option<Vec<f32>>,
    /// The frame's penultimate features, when the model is tapped.
    pub features: Option<Vec<f32>>,
    /// The perturbed frame's features, when perturbed and tapped.
    pub perturbed_features: Option<Vec<f32>>,
    /// The frame's score under its scoring (higher = more in-distribution),
    /// computed with the rest of its batch.
    pub score: f32,
    /// Time from submission until its batch started running.
    pub queued: Duration,
    /// Wall time of the engine run of its batch.
    pub compute: Duration,
    /// How many frames shared that run.
    pub batch_size: usize,
}

/// Handle for submitting frames to the engine workers. Cheap to clone; the
/// workers stop once every handle is gone.
#[derive(Debug, Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    _open: Arc<Open>,
}

/// The queues and what the workers wait on.
#[derive(Debug)]
struct Shared {
    queues: Mutex<Queues>,
    // Workers wait here for frames (and, with a delay, for company).
    work: Condvar,
    options: BatchOptions,
}

#[derive(Debug, Default)]
struct Queues {
    clients: HashMap<ClientId, ClientQueue>,
    // Clients with frames waiting, in turn order.
    turns: VecDeque<ClientId>,
    queued: usize,
    closed: bool,
}

#[derive(Debug, Default)]
struct ClientQueue {
    jobs: VecDeque<Job>,
    // Submitters of this client waiting for room.
    room: Arc<Notify>,
}

/// Closes the queues (so the workers return) when the last handle drops.
#[derive(Debug)]
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        lock(&self.0.queues).closed = true;
        self.0.work.notify_all();
    }
}

impl Batcher {
    /// Starts one worker thread per engine.
    pub fn start(
        engines: Vec<Engine>,
        options: BatchOptions,
        telemetry: Arc<Telemetry>,
    ) -> Batcher {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            options: BatchOptions {
                max_batch: options.max_batch.max(1),
                queue_capacity: options.queue_capacity.max(1),
                ..options
            },
        });
        for (i, engine) in engines.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let telemetry = Arc::clone(&telemetry);
            let spawned = std::thread::Builder::new()
                .name(format!("odin-engine-{i}"))
                .spawn(move || work(engine, &shared, &telemetry));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot spawn engine worker thread");
            }
        }
        Batcher {
            _open: Arc::new(Open(Arc::clone(&shared))),
            shared,
        }
    }

    /// Queues one frame's input on behalf of `client` and waits for its
    /// logits (and those of the perturbed frame, with `perturbation`).
    /// Waits for room in the client's queue first, which is what pushes back
    /// on fast producers. Past `deadline` the frame is refused, not
    /// computed. With `trace`, the frame's queue and batch stages are
    /// recorded under it.
    pub async fn infer(
        &self,
        client: ClientId,
        input: Vec<f32>,
        score: ScoreWith,
        deadline: Option<Instant>,
        trace: Option<FrameTrace>,
    ) -> Result<Inference, FrameError> {
        let (reply, answer) = oneshot::channel();
        let mut job = Some(Job {
            input,
            perturbation: score.scoring.perturbation(),
            score,
            deadline,
            enqueued: Instant::now(),
            trace,
            reply,
        });
        loop {
            let room = {
                let mut queues = lock(&self.shared.queues);
                if queues.closed {
                    return Err(FrameError::Unavailable);
                }
                let capacity = self.shared.options.queue_capacity;
                let queue = queues.clients.entry(client).or_default();
                if queue.jobs.len() < capacity {
                    let first = queue.jobs.is_empty();
                    if let Some(mut job) = job.take() {
                        job.enqueued = Instant::now();
                        queue.jobs.push_back(job);
                    }
                    if first {
                        queues.turns.push_back(client);
                    }
                    queues.queued += 1;
                    None
                } else {
                    Some(Arc::clone(&queue.room))
                }
            };
            match room {
                None => break,
                // `notify_one` keeps a permit when nobody waits yet, so room
                // made between the unlock and this await is not missed.
                Some(room) => room.notified().await,
            }
        }
        self.shared.work.notify_one();
        answer.await.map_err(|_| FrameError::Unavailable)?
    }

    /// Frames waiting for a worker now, over all clients.
    pub fn queued(&self) -> usize {
        lock(&self.shared.queues).queued
    }
}

fn lock(queues: &Mutex<Queues>) -> MutexGuard<'_, Queues> {
    // Every update keeps the queues consistent between statements, so a
    // panic elsewhere while holding the lock leaves them usable.
    queues
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Queues {
    /// Takes the head job of the next client in turn whose head job fits
    /// `key` (any key when `None`), rotating that client to the back.
    fn take(&mut self, key: Option<Option<(u32, u32)>>) -> Option<Job> {
        for _ in 0..self.turns.len() {
            let client = self.turns.pop_front()?;
            let Some(queue) = self.clients.get_mut(&client) else {
                continue;
            };
            let fits = queue
                .jobs
                .front()
                .is_some_and(|j| key.is_none_or(|k| j.perturbation.map(|p| p.key()) == k));
            if !fits {
                self.turns.push_back(client);
                continue;
            }
            let job = queue.jobs.pop_front();
            queue.room.notify_one();
            if queue.jobs.is_empty() {
                self.clients.remove(&client);
            } else {
                self.turns.push_back(client);
            }
            self.queued -= 1;
            return job;
        }
        None
    }
}

/// Forms the next batch once frames are waiting: the next client's first
/// frame, then, round-robin, every waiting frame with the same perturbation
/// up to `max_batch`, waiting up to `max_queue_delay` for more. `None` once
/// the batcher is closed and drained.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let options = shared.options;
    let mut queues = lock(&shared.queues);
    while queues.queued == 0 {
        if queues.closed {
            return None;
        }
        queues = shared
            .work
            .wait(queues)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    let first = queues.take(None)?;
    let key = first.perturbation.map(|p| p.key());
    let mut batch = vec![first];
    let deadline = Instant::now() + options.max_queue_delay;
    loop {
        while batch.len() < options.max_batch {
            match queues.take(Some(key)) {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        let now = Instant::now();
        if batch.len() >= options.max_batch || now >= deadline || queues.closed {
            break;
        }
        let (guard, _) = shared
            .work
            .wait_timeout(queues, deadline - now)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queues = guard;
    }
    // Other workers may take what this batch left behind.
    if queues.queued > 0 {
        shared.work.notify_one();
    }
    Some(batch)
}

/// A worker thread: forms and runs batches until the batcher is closed.
fn work(mut engine: Engine, shared: &Shared, telemetry: &Telemetry) {
    while let Some(batch) = next_batch(shared) {
        // A frame whose stream was cancelled needs no compute, nor one whose
        // deadline has passed (it is told so).
        let now = Instant::now();
        let (late, on_time): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .filter(|job| !job.reply.is_closed())
            .partition(|job| job.deadline.is_some_and(|d| now >= d));
        for job in late {
            let _ = job.reply.send(Err(FrameError::DeadlineExceeded));
        }
        if !on_time.is_empty() {
            run_batch(&mut engine, on_time, telemetry);
        }
    }
}

/// Scores a batch's frames, the frames with the same scoring together (one
/// detector call, one KNN search, per group).
fn score_groups(batch: &[Job], output: &BatchOutput) -> Vec<Result<f32, FrameError>> {
    let n = batch.len();
    let mut scores: Vec<Result<f32, FrameError>> = vec![Ok(f32::NAN); n];
    let mut groups: Vec<(GroupKey, Vec<usize>)> = Vec::new();
    for (i, job) in batch.iter().enumerate() {
        let key = job.score.key();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let classes = output.logits.len() / n.max(1);
    for (_, members) in groups {
        let with = &batch[members[0]].score;
        let whole = members.len() == n;
        let gather = |v: Option<&[f32]>| -> Option<Vec<f32>> {
            let v = v?;
            let w = v.len() / n;
            Some(
                members
                    .iter()
                    .flat_map(|&i| v[i * w..(i + 1) * w].iter().copied())
                    .collect(),
            )
        };
        let parts = if whole {
            None
        } else {
            Some((
                gather(Some(&output.logits)).unwrap_or_default(),
                gather(output.features.as_deref()),
                gather(output.perturbed_logits.as_deref()),
                gather(output.perturbed_features.as_deref()),
            ))
        };
        let view = match &parts {
            None => BatchView {
                n,
                logits: &output.logits,
                features: output.features.as_deref(),
                perturbed_logits: output.perturbed_logits.as_deref(),
                perturbed_features: output.perturbed_features.as_deref(),
            },
            Some((logits, features, perturbed_logits, perturbed_features)) => BatchView {
                n: members.len(),
                logits,
                features: features.as_deref(),
                perturbed_logits: perturbed_logits.as_deref(),
                perturbed_features: perturbed_features.as_deref(),
            },
        };
        debug_assert_eq!(view.logits.len(), view.n * classes);
        let mut out = vec![f32::NAN; view.n];
        let result = with.scorers.score_batch(&with.scoring, &view, &mut out);
        for (j, &i) in members.iter().enumerate() {
            scores[i] = match &result {
                Ok(()) => Ok(out[j]),
                Err(e) => Err(FrameError::DetectorUnavailable(e.to_string())),
            };
        }
    }
    scores
}

fn run_batch(engine: &mut Engine, batch: Vec<Job>, telemetry: &Telemetry) {
    let started = Instant::now();
    let n = batch.len();
    let mut input = Vec::with_capacity(n * batch[0].input.len());
    for job in &batch {
        input.extend_from_slice(&job.input);
    }
    let result = engine.run(&input, n, batch[0].perturbation);
    let ended = Instant::now();
    let compute = ended - started;
    telemetry.metrics().batch_size.record(n as f64);
    if let Some(tracer) = telemetry.tracer() {
        let (gradient, forward) = match &result {
            Ok(output) => (output.gradient_time, output.forward_time),
            Err(_) => (None, compute),
        };
        let traced = batch
            .iter()
            .filter_map(|job| job.trace.as_ref().map(|t| (t, job.enqueued)));
        BatchTrace {
            tracer,
            started,
            ended,
            gradient,
            forward,
            error: result.as_ref().err().map(|e| e.to_string()),
            provider: engine.provider().to_string(),
        }
        .record(traced, n);
    }
    match result {
        Ok(output) => {
            let scores = score_groups(&batch, &output);
            let classes = output.logits.len() / n;
            let dim = output.features.as_ref().map_or(0, |f| f.len() / n);
            let rows = |v: &Option<Vec<f32>>, i: usize, w: usize| {
                v.as_ref().map(|v| v[i * w..(i + 1) * w].to_vec())
            };
            for ((i, job), score) in batch.into_iter().enumerate().zip(scores) {
                let answer = score.map(|score| Inference {
                    logits: output.logits[i * classes..(i + 1) * classes].to_vec(),
                    perturbed_logits: rows(&output.perturbed_logits, i, classes),
                    features: rows(&output.features, i, dim),
                    perturbed_features: rows(&output.perturbed_features, i, dim),
                    score,
                    queued: started.saturating_duration_since(job.enqueued),
                    compute,
                    batch_size: n,
                });
                // The receiver may have left; nothing to do then.
                let _ = job.reply.send(answer);
            }
        }
        Err(e) => {
            // Logged inside one of its frames' trace, so the line can be found from it.
            let _log = batch
                .iter()
                .find_map(|job| job.trace.as_ref())
                .map(|t| t.log_span("engine.batch").entered());
            tracing::error!(error = %e, batch = n, "engine run failed");
            for job in batch {
                let _ = job.reply.send(Err(FrameError::Engine(e.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests;
