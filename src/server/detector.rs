//! `odin.v1.Detector`: receives frames and hands them to the pipeline.
//! Handlers do no heavy work themselves; everything was loaded at start-up.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pipeline::{order, Pipeline};
use crate::telemetry::{Method, Telemetry};
use crate::wire::{detector_server::Detector, Frame, GetModelInfoRequest, ModelInfo, Verdict};

/// The Detector service.
#[derive(Debug, Clone)]
pub struct DetectorService {
    pipeline: Arc<Pipeline>,
    info: Arc<ModelInfo>,
    window: usize,
    // Admission control for unary calls; `None` admits everything (callers
    // then wait for room in the engine queue, like streams do).
    unary_slots: Option<Arc<Semaphore>>,
}

impl DetectorService {
    /// A service judging frames with `pipeline`, describing itself with
    /// `info`, allowing `window` frames in flight per stream.
    pub fn new(
        pipeline: Arc<Pipeline>,
        info: ModelInfo,
        window: usize,
        max_unary_in_flight: usize,
    ) -> DetectorService {
        DetectorService {
            pipeline,
            info: Arc::new(info),
            window,
            unary_slots: (max_unary_in_flight > 0)
                .then(|| Arc::new(Semaphore::new(max_unary_in_flight))),
        }
    }
}

/// Counts a `Detect` stream as open until dropped.
struct StreamOpen<'a>(&'a Telemetry);

impl<'a> StreamOpen<'a> {
    fn enter(telemetry: &'a Telemetry) -> StreamOpen<'a> {
        telemetry
            .metrics()
            .streams_open
            .fetch_add(1, Ordering::Relaxed);
        StreamOpen(telemetry)
    }
}

impl Drop for StreamOpen<'_> {
    fn drop(&mut self) {
        self.0
            .metrics()
            .streams_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl Detector for DetectorService {
    type DetectStream = ReceiverStream<Result<Verdict, Status>>;

    async fn detect(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::DetectStream>, Status> {
        let telemetry = Arc::clone(self.pipeline.telemetry());
        // The call's trace context: parent of frames that carry none of their own.
        let parent = telemetry.extract_metadata(request.metadata());
        let frames = request.into_inner();
        let (verdicts, out) = mpsc::channel(self.window.max(1));
        let drive = order::drive(
            Arc::clone(&self.pipeline),
            frames,
            verdicts,
            self.window,
            parent,
        );
        tokio::spawn(async move {
            // A guard, so a task dropped mid-stream (runtime shutdown) still
            // closes its count.
            let _open = StreamOpen::enter(&telemetry);
            drive.await;
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn detect_one(&self, request: Request<Frame>) -> Result<Response<Verdict>, Status> {
        let _slot = match &self.unary_slots {
            Some(slots) => Some(Arc::clone(slots).try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(
                    "too many DetectOne calls in flight; retry with backoff or use Detect streams",
                )
            })?),
            None => None,
        };
        let parent = self
            .pipeline
            .telemetry()
            .extract_metadata(request.metadata());
        let answer = Arc::clone(&self.pipeline)
            .judge_traced(request.into_inner(), &parent, Method::DetectOne)
            .await;
        // tonic encodes and sends after we return, so the unary respond stage
        // ends here; its sending is outside the frame span.
        Ok(Response::new(answer.verdict))
    }

    async fn get_model_info(
        &self,
        _request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo::clone(&self.info)))
    }
}
