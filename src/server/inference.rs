//! `inference.GRPCInferenceService`: KServe v2 / the Open Inference
//! Protocol, with Triton's bidirectional `ModelStreamInfer`, beside
//! `odin.v1.Detector` on the same port. Requests are checked and split
//! into frames by `crate::wire::kserve_v2`; each frame goes through the
//! same pipeline as an odin.v1 frame, so both edges judge the same pixels
//! the same way.
//!
//! A `ModelInfer` call charges every element to the memory budget before
//! any is judged (RESOURCE_EXHAUSTED when they do not fit), judges them
//! concurrently (they batch in the engine) and fails as a whole on the
//! first element, in order, that gets an error. A `ModelStreamInfer` stream
//! answers each request with one response, in order; a request that fails
//! gets `error_message` and the stream goes on (Triton's convention). It is
//! read only while it has fewer than `window` frames in flight and fewer
//! than `window` requests unanswered, and ends like a `Detect` stream:
//! `OK` after a half-close, its own error after a malformed message,
//! UNAVAILABLE after a drain, each once the requests already read are
//! answered.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::detector::StreamOpen;
use super::receive::Receipts;
use super::{call, Health};
use crate::domain::{FrameRequest, Judgement};
use crate::error::CallError;
use crate::pipeline::{Admitted, Answer, Caller, Pipeline};
use crate::telemetry::Rpc;
use crate::wire::kserve_v2::{
    self, grpc_inference_service_server::GrpcInferenceService, InferReply, ModelInferRequest,
    ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest,
    ModelReadyResponse, ModelSpec, ModelStreamInferResponse, RequestId, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};

/// The KServe v2 inference service.
#[derive(Debug, Clone)]
pub struct InferenceService {
    pipeline: Arc<Pipeline>,
    window: usize,
    draining: watch::Receiver<bool>,
    health: Health,
    request_timeout: Option<std::time::Duration>,
}

impl InferenceService {
    /// A service judging frames with `pipeline`, serving the model in force
    /// (a live reload may change it), allowing `window` frames in flight
    /// per stream, reporting readiness from `health`. Open streams wind
    /// down when `draining` turns true. A `ModelInfer` call may take at
    /// most `request_timeout`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        window: usize,
        draining: watch::Receiver<bool>,
        health: Health,
        request_timeout: Option<std::time::Duration>,
    ) -> InferenceService {
        InferenceService {
            pipeline,
            window: window.max(1),
            draining,
            health,
            request_timeout,
        }
    }

    /// What the model in force takes and gives.
    fn spec(&self) -> ModelSpec {
        ModelSpec::new(&self.pipeline.current().info)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        // Answering at all is being live.
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.health.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        self.spec().check(&request.name, &request.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.health.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: kserve_v2::SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: kserve_v2::EXTENSIONS.map(String::from).to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let spec = self.spec();
        spec.check(&request.name, &request.version)?;
        Ok(Response::new(spec.metadata()))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let caller = call::caller(&request, Rpc::ModelInfer, self.pipeline.telemetry());
        let deadline = call::unary_deadline(
            request.metadata(),
            call::arrived(&request),
            self.request_timeout,
        );
        let receipts = Receipts::of(&request);
        let (reply, frames) =
            kserve_v2::parse_request(request.into_inner(), &self.spec(), deadline)?;
        // Every element is charged before any is judged: a call that does
        // not fit in the memory budget is refused now, as a whole.
        let mut admitted = Vec::with_capacity(frames.len());
        for frame in frames {
            match self.pipeline.try_admit(frame) {
                Ok(a) => admitted.push(a),
                Err(e) => {
                    self.pipeline
                        .telemetry()
                        .metrics()
                        .calls_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        }
        // Its frames hold their own charges now (a refusal above returns,
        // and dropping `receipts` releases it then).
        receipts.settle();
        let mut judging: FuturesOrdered<_> = admitted
            .into_iter()
            .map(|a| judge(&self.pipeline, a, &caller))
            .collect();
        let all = async {
            let mut judgements = Vec::with_capacity(judging.len());
            let mut finishes = Vec::with_capacity(judging.len());
            while let Some(Answer { judgement, finish }) = judging.next().await {
                if let Err(error) = &judgement.outcome {
                    // Returning drops the elements still being judged.
                    return Err(kserve_v2::frame_status(judgements.len(), error));
                }
                judgements.push(judgement);
                finishes.push(finish);
            }
            Ok((judgements, finishes))
        };
        let (judgements, finishes) = call::within(deadline, all).await??;
        let response = reply.respond(&judgements)?;
        // tonic encodes and sends after we return: the frames' respond
        // stage ends here, as for DetectOne.
        drop(finishes);
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = ReceiverStream<Result<ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let telemetry = Arc::clone(self.pipeline.telemetry());
        let stream = StreamState {
            pipeline: Arc::clone(&self.pipeline),
            window: self.window,
            caller: call::caller(&request, Rpc::ModelStreamInfer, &telemetry),
            // Every request of the stream shares the call's deadline.
            deadline: call::deadline(request.metadata(), call::arrived(&request)),
            receipts: Receipts::of(&request),
        };
        let (responses, out) = mpsc::channel(self.window);
        let drive = stream.drive(request.into_inner(), responses, self.draining.clone());
        tokio::spawn(async move {
            let _open = StreamOpen::enter(telemetry);
            drive.await;
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

fn judge(
    pipeline: &Arc<Pipeline>,
    admitted: Admitted,
    caller: &Caller,
) -> impl Future<Output = Answer> + use<> {
    let pipeline = Arc::clone(pipeline);
    let caller = caller.clone();
    async move { pipeline.judge(admitted, &caller).await }
}

/// What one `ModelStreamInfer` stream judges with.
struct StreamState {
    pipeline: Arc<Pipeline>,
    window: usize,
    caller: Caller,
    deadline: Option<Instant>,
    /// Each request's receive charge, released once its frames hold theirs.
    receipts: Receipts,
}

/// A request read off a stream and not yet answered.
struct Pending {
    request: RequestId,
    /// How to answer it, or why it was refused before any frame was judged.
    reply: Result<InferReply, Status>,
    /// Its frames.
    frames: usize,
    /// The judgements of its frames so far, in order.
    judgements: Vec<Judgement>,
}

impl Pending {
    fn complete(&self) -> bool {
        self.judgements.len() == self.frames
    }

    fn response(self) -> ModelStreamInferResponse {
        let result = self.reply.and_then(|reply| reply.respond(&self.judgements));
        kserve_v2::stream_response(result, &self.request)
    }
}

type Admitting = Pin<Box<dyn Future<Output = Option<Admitted>> + Send>>;

impl StreamState {
    /// Reads `requests` until the client half-closes, the stream fails or
    /// the server drains (`draining`); answers every request read, in
    /// order, on `responses`; then ends the stream as `order::drive` ends a
    /// `Detect` stream. Returns early, dropping pending work, when the
    /// client goes away.
    async fn drive<S>(
        self,
        mut requests: S,
        responses: mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
        mut draining: watch::Receiver<bool>,
    ) where
        S: Stream<Item = Result<ModelInferRequest, Status>> + Unpin,
    {
        let window = self.window;
        // Requests read and not yet answered, in order.
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // Frames of read requests not yet admitted, in order.
        let mut to_admit: VecDeque<FrameRequest> = VecDeque::new();
        // A frame waiting for the memory budget: nothing else is admitted
        // (and no request read) until it fits.
        let mut admitting: Option<Admitting> = None;
        // Frames being judged, in order.
        let mut in_flight = FuturesOrdered::new();
        let mut reading = true;
        let mut watching = true;
        let mut ending: Option<Status> = None;
        if *draining.borrow() {
            reading = false;
            ending = Some(CallError::ShuttingDown.into());
        }
        loop {
            // Answer every request at the front whose frames are all judged.
            while pending.front().is_some_and(Pending::complete) {
                let Some(done) = pending.pop_front() else {
                    break;
                };
                if responses.send(Ok(done.response())).await.is_err() {
                    return; // The client left; dropping `in_flight` cancels the rest.
                }
            }
            if admitting.is_none() && in_flight.len() < window {
                if let Some(frame) = to_admit.pop_front() {
                    let pipeline = Arc::clone(&self.pipeline);
                    admitting = Some(Box::pin(async move { pipeline.admit(frame).await }));
                }
            }
            tokio::select! {
                // Judgements first, then admission, then reading more.
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    let Answer { judgement, finish } = answer;
                    // The frame is judged: its charge and span end now, so a
                    // request larger than the budget still gets through.
                    drop(finish);
                    if let Some(owner) = pending.iter_mut().find(|p| !p.complete()) {
                        owner.judgements.push(judgement);
                    }
                }
                admitted = async { admitting.as_mut()?.await }, if admitting.is_some() => {
                    admitting = None;
                    match admitted {
                        Some(admitted) => {
                            in_flight.push_back(judge(&self.pipeline, admitted, &self.caller));
                            // A request is read only once the previous one's
                            // frames are all admitted: this was its last.
                            if to_admit.is_empty() {
                                self.receipts.settle();
                            }
                        }
                        None => {
                            // The budget closed, which nothing does: the
                            // requests left cannot be judged.
                            let _ = responses.send(Err(CallError::ShuttingDown.into())).await;
                            return;
                        }
                    }
                }
                changed = draining.changed(), if reading && watching => {
                    // Requests already read are still answered: they were
                    // accepted off the wire.
                    if changed.is_err() {
                        watching = false;
                    } else if *draining.borrow() {
                        reading = false;
                        ending = Some(CallError::ShuttingDown.into());
                    }
                }
                request = requests.next(),
                    if reading
                        && to_admit.is_empty()
                        && admitting.is_none()
                        && in_flight.len() < window
                        && pending.len() < window => match request
                {
                    Some(Ok(request)) => {
                        let id = RequestId::from(&request);
                        // The model in force now: a reload may change it mid-stream.
                        let spec = ModelSpec::new(&self.pipeline.current().info);
                        let parsed = kserve_v2::parse_request(request, &spec, self.deadline);
                        let (reply, frames) = match parsed {
                            Ok((reply, frames)) => (Ok(reply), frames),
                            Err(status) => (Err(status), Vec::new()),
                        };
                        if frames.is_empty() {
                            self.receipts.settle();
                        }
                        pending.push_back(Pending {
                            request: id,
                            reply,
                            frames: frames.len(),
                            judgements: Vec::with_capacity(frames.len()),
                        });
                        to_admit.extend(frames);
                    }
                    Some(Err(status)) => {
                        tracing::debug!(%status, "inbound stream failed; answering pending requests");
                        reading = false;
                        ending = Some(status);
                    }
                    None => reading = false,
                },
                else => break,
            }
        }
        // Every branch is idle: each request read has been answered above.
        if let Some(status) = ending {
            let _ = responses.send(Err(status)).await;
        }
    }
}
