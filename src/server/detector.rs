//! `odin.v1.Detector`: receives frames and hands them to the pipeline.
//! Handlers do no heavy work themselves; everything was loaded at start-up.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pipeline::{order, Pipeline};
use crate::wire::{detector_server::Detector, Frame, GetModelInfoRequest, ModelInfo, Verdict};

/// The Detector service.
#[derive(Debug, Clone)]
pub struct DetectorService {
    pipeline: Arc<Pipeline>,
    info: Arc<ModelInfo>,
    window: usize,
}

impl DetectorService {
    /// A service judging frames with `pipeline`, describing itself with
    /// `info`, allowing `window` frames in flight per stream.
    pub fn new(pipeline: Arc<Pipeline>, info: ModelInfo, window: usize) -> DetectorService {
        DetectorService {
            pipeline,
            info: Arc::new(info),
            window,
        }
    }
}

#[tonic::async_trait]
impl Detector for DetectorService {
    type DetectStream = ReceiverStream<Result<Verdict, Status>>;

    async fn detect(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::DetectStream>, Status> {
        let frames = request.into_inner();
        let (verdicts, out) = mpsc::channel(self.window.max(1));
        tokio::spawn(order::drive(
            Arc::clone(&self.pipeline),
            frames,
            verdicts,
            self.window,
        ));
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn detect_one(&self, request: Request<Frame>) -> Result<Response<Verdict>, Status> {
        let verdict = Arc::clone(&self.pipeline).judge(request.into_inner()).await;
        Ok(Response::new(verdict))
    }

    async fn get_model_info(
        &self,
        _request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo::clone(&self.info)))
    }
}
