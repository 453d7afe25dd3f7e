//! A load generator for the Detector service, measuring latency per frame
//! (ghz counts a whole bidi stream as one sample, so it cannot).
//!
//! Closed loop keeps a fixed number of frames in flight per stream. Open loop
//! sends at a target rate on a fixed schedule and measures each frame's
//! latency from its *intended* send time, so a stalled server shows up in the
//! tail instead of silently slowing the generator (coordinated omission).

pub mod report;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::wire::odin_v1::{detector_client::DetectorClient, Frame, Verdict};
pub use report::{Report, Stats};

/// Where the sidecar listens.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `host:port` over TCP.
    Tcp(String),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

/// How frames are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bidirectional `Detect` streams.
    Stream,
    /// `DetectOne` calls.
    Unary,
}

/// When frames are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Each stream (or unary worker) keeps this many frames in flight.
    Closed {
        /// Frames in flight per stream or worker.
        in_flight: usize,
    },
    /// Frames per second over all streams, on a fixed schedule, with at
    /// most [`OPEN_IN_FLIGHT`] frames outstanding per stream or worker.
    Open {
        /// Target frames per second.
        rate: f64,
    },
}

/// Frames one open-loop sender keeps outstanding at most. A real client
/// has such a bound too; without it, offering several times what the server
/// takes piles unsent frames up in the load generator's own memory (5× on
/// 720p frames reached 23 GB). A sender at the bound falls behind its
/// schedule, and since latency counts from the scheduled time, that wait is
/// in the figures.
pub const OPEN_IN_FLIGHT: usize = 32;

/// A load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where to connect.
    pub target: Target,
    /// Streams or unary calls.
    pub mode: Mode,
    /// Connections (HTTP/2 channels).
    pub connections: usize,
    /// Streams (or unary workers) per connection.
    pub streams: usize,
    /// Closed or open loop.
    pub pacing: Pacing,
    /// Stop sending after this long (warm-up included).
    pub duration: Option<Duration>,
    /// Stop after this many frames in total.
    pub frames: Option<u64>,
    /// Frames answered in this first stretch are not measured.
    pub warmup: Duration,
    /// The frames to send, cycled.
    pub pool: Arc<Vec<Frame>>,
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Connecting failed.
    #[error("cannot connect to {target}: {detail}")]
    Connect {
        /// The target.
        target: String,
        /// Why.
        detail: String,
    },
    /// The configuration cannot run.
    #[error("{0}")]
    Config(String),
}

/// Opens one HTTP/2 connection to `target`.
pub async fn connect(target: &Target) -> Result<Channel, LoadError> {
    let fail = |detail: String| LoadError::Connect {
        target: format!("{target:?}"),
        detail,
    };
    match target {
        Target::Tcp(addr) => {
            let url = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            Endpoint::from_shared(url)
                .map_err(|e| fail(e.to_string()))?
                .connect()
                .await
                .map_err(|e| fail(e.to_string()))
        }
        Target::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| fail(e.to_string()))
        }
    }
}

/// Shared state of one run.
struct Run {
    config: LoadConfig,
    started: Instant,
    measure_from: Instant,
    stop_at: Option<Instant>,
    sent: AtomicU64,
    done: AtomicU64,
    stats: Mutex<Stats>,
}

impl Run {
    /// Claims the next frame to send, or `None` when the run is over.
    fn claim(&self) -> Option<u64> {
        if self.stop_at.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        if self.config.frames.is_some_and(|limit| n >= limit) {
            self.sent.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(n)
    }

    fn frame(&self, n: u64) -> Frame {
        let pool = &self.config.pool;
        let mut frame = pool[(n as usize) % pool.len()].clone();
        frame.frame_id = n.to_string();
        frame
    }

    /// Records one answer that was meant to be sent at `intended`.
    fn record(&self, intended: Instant, answer: Result<&Verdict, &tonic::Status>) {
        let now = Instant::now();
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut stats) = self.stats.lock() {
            stats.record(
                intended >= self.measure_from,
                now - intended,
                now - self.started,
                answer,
            );
        }
    }

    /// The open-loop send time of the `k`-th frame of a sender with `rate` frames/s.
    fn scheduled(&self, k: u64, rate: f64) -> Instant {
        self.started + Duration::from_secs_f64(k as f64 / rate)
    }
}

/// Runs the load and returns its report. `progress` prints a live line.
pub async fn run(config: LoadConfig, progress: bool) -> Result<Report, LoadError> {
    if config.pool.is_empty() || config.connections == 0 || config.streams == 0 {
        return Err(LoadError::Config(
            "need frames, connections ≥ 1 and streams ≥ 1".into(),
        ));
    }
    if config.duration.is_none() && config.frames.is_none() {
        return Err(LoadError::Config("set a duration or a frame count".into()));
    }
    let mut channels = Vec::new();
    for _ in 0..config.connections {
        channels.push(connect(&config.target).await?);
    }
    let started = Instant::now();
    let run = Arc::new(Run {
        measure_from: started + config.warmup,
        stop_at: config.duration.map(|d| started + d),
        started,
        sent: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stats: Mutex::new(Stats::default()),
        config,
    });
    let senders = run.config.connections * run.config.streams;
    let ticker = progress.then(|| tokio::spawn(progress_line(Arc::clone(&run))));
    let mut tasks = Vec::new();
    for channel in &channels {
        for _ in 0..run.config.streams {
            let client = DetectorClient::new(channel.clone()).max_decoding_message_size(64 << 20);
            let run = Arc::clone(&run);
            tasks.push(match run.config.mode {
                Mode::Stream => tokio::spawn(stream_worker(run, client, senders)),
                Mode::Unary => tokio::spawn(unary_worker(run, client, senders)),
            });
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    let elapsed = run.started.elapsed();
    let stats = run.stats.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Report::new(
        &run.config,
        stats,
        run.sent.load(Ordering::Relaxed),
        elapsed,
    ))
}

/// One bidirectional stream: a sender paced by the loop, a receiver that
/// matches verdicts (which arrive in order) to send times.
async fn stream_worker(run: Arc<Run>, mut client: DetectorClient<Channel>, senders: usize) {
    let (tx, rx) = mpsc::channel::<Frame>(256);
    let intended: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let in_flight = match run.config.pacing {
        Pacing::Closed { in_flight } => in_flight.max(1),
        Pacing::Open { .. } => OPEN_IN_FLIGHT,
    };
    let permits = Arc::new(Semaphore::new(in_flight));
    let sender = {
        let (run, intended, permits) = (Arc::clone(&run), Arc::clone(&intended), permits.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while let Some(n) = run.claim() {
                let at = match run.config.pacing {
                    Pacing::Open { rate } => {
                        let at = run.scheduled(k, rate / senders as f64);
                        tokio::time::sleep_until(at).await;
                        at
                    }
                    Pacing::Closed { .. } => Instant::now(),
                };
                match Arc::clone(&permits).acquire_owned().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let at = match run.config.pacing {
                    Pacing::Open { .. } => at,
                    Pacing::Closed { .. } => Instant::now(),
                };
                k += 1;
                if let Ok(mut q) = intended.lock() {
                    q.push_back(at);
                }
                if tx.send(run.frame(n)).await.is_err() {
                    break;
                }
            }
            // Dropping `tx` half-closes the stream: the server answers what is pending.
        })
    };
    let mut failure = tonic::Status::unavailable("stream ended before this frame was answered");
    match client.detect(ReceiverStream::new(rx)).await {
        Ok(response) => {
            let mut verdicts = response.into_inner();
            while let Some(answer) = verdicts.next().await {
                match answer {
                    Ok(verdict) => {
                        let at = intended
                            .lock()
                            .ok()
                            .and_then(|mut q| q.pop_front())
                            .unwrap_or_else(Instant::now);
                        run.record(at, Ok(&verdict));
                        permits.add_permits(1);
                    }
                    Err(status) => {
                        failure = status;
                        break;
                    }
                }
            }
        }
        Err(status) => failure = status,
    }
    permits.close();
    let _ = sender.await;
    // Frames sent but never answered (the stream failed) count as failures.
    let lost: Vec<Instant> = intended
        .lock()
        .map(|mut q| q.drain(..).collect())
        .unwrap_or_default();
    let status = failure;
    for at in lost {
        run.record(at, Err(&status));
    }
}

/// Unary `DetectOne` calls: closed loop keeps `in_flight` calls outstanding,
/// open loop starts calls on schedule.
async fn unary_worker(run: Arc<Run>, client: DetectorClient<Channel>, senders: usize) {
    let in_flight = match run.config.pacing {
        Pacing::Closed { in_flight } => in_flight.max(1),
        Pacing::Open { .. } => OPEN_IN_FLIGHT,
    };
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut calls = tokio::task::JoinSet::new();
    let mut k = 0u64;
    while let Some(n) = run.claim() {
        let at = match run.config.pacing {
            Pacing::Open { rate } => {
                let at = run.scheduled(k, rate / senders as f64);
                tokio::time::sleep_until(at).await;
                at
            }
            Pacing::Closed { .. } => Instant::now(),
        };
        k += 1;
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let (run, mut client, frame) = (Arc::clone(&run), client.clone(), run.frame(n));
        calls.spawn(async move {
            let answer = client
                .detect_one(frame)
                .await
                .map(tonic::Response::into_inner);
            run.record(at, answer.as_ref());
            drop(permit);
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

async fn progress_line(run: Arc<Run>) {
    use std::io::Write;
    let mut last = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done = run.done.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (done - last.0) as f64 / (now - last.1).as_secs_f64();
        last = (done, now);
        let (p99, errors) = run
            .stats
            .lock()
            .map(|s| (s.latency.value_at_quantile(0.99), s.error_count()))
            .unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{:>5.1} s] {done} frames, {rate:.0} frames/s, p99 {:.2} ms, {errors} errors   ",
            run.started.elapsed().as_secs_f64(),
            p99 as f64 / 1000.0
        );
        let _ = err.flush();
    }
}
