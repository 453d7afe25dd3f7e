//! Batch and infer stages: frames from every stream and unary call meet in
//! one bounded queue; a batcher task groups them (up to `max_batch`, waiting
//! at most `max_queue_delay` for company) and hands each batch to a pool of
//! engine worker threads, each owning one ONNX Runtime session. Only frames
//! asking for the same perturbation (T, ε) share a batch, because G takes
//! them as scalars; a frame that does not fit waits for the next batch.
//!
//! The queue is bounded, so when the engine falls behind, submitters wait,
//! stream readers stop reading, and HTTP/2 flow control pushes back on
//! producers instead of memory growing without limit.
//!
//! Workers are std threads, outside any span context, so each job carries
//! its frame's trace; the worker records the batch span (linked to those
//! frames) and each frame's queue and batch stages once the run is over.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::engine::Engine;
use crate::error::FrameError;
use crate::score::Perturbation;
use crate::telemetry::{BatchTrace, FrameTrace, Telemetry};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most frames in one engine run.
    pub max_batch: usize,
    /// Longest a frame waits for others to join its batch. Zero batches only
    /// what is already queued, so a lone frame on an idle server never waits.
    pub max_queue_delay: Duration,
    /// Frames that may wait in the queue before submitters are held back.
    pub queue_capacity: usize,
}

/// One frame's input on its way to the engine.
struct Job {
    input: Vec<f32>,
    perturbation: Option<Perturbation>,
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
    /// Time from submission until its batch started running.
    pub queued: Duration,
    /// Wall time of the engine run of its batch.
    pub compute: Duration,
    /// How many frames shared that run.
    pub batch_size: usize,
}

/// Handle for submitting frames to the engine workers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the batcher task and one worker thread per engine. Must be
    /// called inside a tokio runtime.
    pub fn start(
        engines: Vec<Engine>,
        options: BatchOptions,
        telemetry: Arc<Telemetry>,
    ) -> Batcher {
        let (jobs_tx, jobs_rx) = mpsc::channel(options.queue_capacity.max(1));
        // One batch may wait while the workers are busy; the next forms
        // meanwhile, so batches grow with load.
        let (batches_tx, batches_rx) = mpsc::channel::<Vec<Job>>(1);
        let batches_rx = Arc::new(Mutex::new(batches_rx));
        for (i, engine) in engines.into_iter().enumerate() {
            let batches = Arc::clone(&batches_rx);
            let telemetry = Arc::clone(&telemetry);
            let spawned = std::thread::Builder::new()
                .name(format!("odin-engine-{i}"))
                .spawn(move || work(engine, &batches, &telemetry));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot spawn engine worker thread");
            }
        }
        tokio::spawn(gather(jobs_rx, batches_tx, options));
        Batcher { jobs: jobs_tx }
    }

    /// Queues one frame's input and waits for its logits (and those of the
    /// perturbed frame, with `perturbation`). Waits for room in the queue
    /// first, which is what pushes back on fast producers. With `trace`, the
    /// frame's queue and batch stages are recorded under it.
    pub async fn infer(
        &self,
        input: Vec<f32>,
        perturbation: Option<Perturbation>,
        trace: Option<FrameTrace>,
    ) -> Result<Inference, FrameError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input,
            perturbation,
            enqueued: Instant::now(),
            trace,
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| FrameError::Unavailable)?;
        answer.await.map_err(|_| FrameError::Unavailable)?
    }

    /// Frames waiting in the queue now (not counting batches being formed or run).
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

/// Groups queued jobs into batches and passes them to the workers.
async fn gather(
    mut jobs: mpsc::Receiver<Job>,
    batches: mpsc::Sender<Vec<Job>>,
    options: BatchOptions,
) {
    // Jobs taken from the queue that did not fit the batch being formed.
    let mut held: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let key = first.perturbation.map(|p| p.key());
        let fits = |job: &Job| job.perturbation.map(|p| p.key()) == key;
        let mut batch = vec![first];
        // Held jobs are older: they go first.
        let mut i = 0;
        while i < held.len() && batch.len() < options.max_batch {
            if fits(&held[i]) {
                batch.extend(held.remove(i));
            } else {
                i += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + options.max_queue_delay;
        // Held jobs count against the queue's capacity, so memory stays bounded
        // however the perturbations of queued frames are mixed.
        while batch.len() < options.max_batch && held.len() < options.queue_capacity {
            let next = match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if options.max_queue_delay.is_zero() => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, jobs.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            match next {
                Some(job) if fits(&job) => batch.push(job),
                Some(job) => held.push_back(job),
                None => break,
            }
        }
        if batches.send(batch).await.is_err() {
            return;
        }
    }
}

/// A worker thread: takes batches until the batcher is gone.
fn work(mut engine: Engine, batches: &Mutex<mpsc::Receiver<Vec<Job>>>, telemetry: &Telemetry) {
    loop {
        let next = match batches.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        let Some(mut batch) = next else { return };
        // A frame whose stream was cancelled needs no compute.
        batch.retain(|job| !job.reply.is_closed());
        if !batch.is_empty() {
            run_batch(&mut engine, batch, telemetry);
        }
    }
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
            let classes = output.logits.len() / n;
            for (i, job) in batch.into_iter().enumerate() {
                let rows = i * classes..(i + 1) * classes;
                let inference = Inference {
                    logits: output.logits[rows.clone()].to_vec(),
                    perturbed_logits: output.perturbed_logits.as_ref().map(|p| p[rows].to_vec()),
                    queued: started.saturating_duration_since(job.enqueued),
                    compute,
                    batch_size: n,
                };
                // The receiver may have left; nothing to do then.
                let _ = job.reply.send(Ok(inference));
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
