//! `odin.v1.Detector`: converts each call's messages into the core's types,
//! hands them to the pipeline, and converts the judgements back. Handlers
//! do no heavy work themselves; everything was loaded at start-up.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::call;
use super::receive::Receipts;
use crate::domain::FrameRequest;
use crate::pipeline::{order, Pipeline};
use crate::telemetry::{Rpc, Telemetry};
use crate::wire::odin_v1::{
    detector_server::Detector, Frame, GetModelInfoRequest, ModelInfo, Verdict,
};

/// The Detector service.
#[derive(Debug, Clone)]
pub struct DetectorService {
    pipeline: Arc<Pipeline>,
    window: usize,
    draining: watch::Receiver<bool>,
    request_timeout: Option<std::time::Duration>,
}

impl DetectorService {
    /// A service judging frames with `pipeline`, allowing `window` frames
    /// in flight per stream. Open streams wind down when `draining` turns
    /// true. A unary call may take at most `request_timeout`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        window: usize,
        draining: watch::Receiver<bool>,
        request_timeout: Option<std::time::Duration>,
    ) -> DetectorService {
        DetectorService {
            pipeline,
            window,
            draining,
            request_timeout,
        }
    }
}

/// Counts a stream (`Detect`, or KServe's `ModelStreamInfer`) as open
/// until dropped.
pub(super) struct StreamOpen(Arc<Telemetry>);

impl StreamOpen {
    pub(super) fn enter(telemetry: Arc<Telemetry>) -> StreamOpen {
        telemetry
            .metrics()
            .streams_open
            .fetch_add(1, Ordering::Relaxed);
        StreamOpen(telemetry)
    }
}

impl Drop for StreamOpen {
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
        // Each message's receive charge goes once its frame holds its own.
        let receipts = Receipts::of(&request);
        let options = order::StreamOptions {
            window: self.window,
            caller: call::caller(&request, Rpc::Detect, &telemetry),
            draining: self.draining.clone(),
            admitted: order::AdmitHook::new(move || receipts.settle()),
        };
        // Every frame of the stream shares the call's deadline.
        let deadline = call::deadline(request.metadata(), call::arrived(&request));
        let frames = request.into_inner().map(move |frame| {
            frame.map(|frame| FrameRequest {
                deadline,
                ..FrameRequest::from(frame)
            })
        });
        let (verdicts, out) = mpsc::channel(self.window.max(1));
        let drive = order::drive(
            Arc::clone(&self.pipeline),
            frames,
            verdicts,
            Verdict::from,
            options,
        );
        tokio::spawn(async move {
            // A guard, so a task dropped mid-stream (runtime shutdown) still
            // closes its count.
            let _open = StreamOpen::enter(telemetry);
            drive.await;
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn detect_one(&self, request: Request<Frame>) -> Result<Response<Verdict>, Status> {
        let caller = call::caller(&request, Rpc::DetectOne, self.pipeline.telemetry());
        let deadline = call::unary_deadline(
            request.metadata(),
            call::arrived(&request),
            self.request_timeout,
        );
        let receipts = Receipts::of(&request);
        let frame = FrameRequest {
            deadline,
            ..FrameRequest::from(request.into_inner())
        };
        // A unary call that does not fit in the memory budget is refused
        // now: it has no stream to hold back.
        let admitted = self.pipeline.try_admit(frame);
        receipts.settle();
        let admitted = admitted.map_err(|e| {
            self.pipeline
                .telemetry()
                .metrics()
                .calls_refused
                .fetch_add(1, Ordering::Relaxed);
            Status::from(e)
        })?;
        let answer = call::within(
            deadline,
            Arc::clone(&self.pipeline).judge(admitted, &caller),
        )
        .await?;
        // tonic encodes and sends after we return, so the unary respond stage
        // ends here; its sending is outside the frame span.
        Ok(Response::new(answer.judgement.into()))
    }

    async fn get_model_info(
        &self,
        _request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        // What is served now: a reload may have changed it.
        Ok(Response::new(ModelInfo::from(
            &self.pipeline.current().info,
        )))
    }
}
