//! KServe v2 / Open Inference Protocol (package `inference`, with Triton's
//! `ModelStreamInfer`): the generated protocol types, the descriptor set
//! reflection serves, and every conversion between tensors and the core's
//! domain types, with all the checking of names, datatypes and shapes.
//!
//! The model is described as three alternative inputs and five outputs:
//!
//! | input | datatype | shape | becomes |
//! |---|---|---|---|
//! | `input` | FP32 | `[N, C, H, W]` (the model's C, H, W) | `ImageInput::Tensor` `[C, H, W]` per element |
//! | `image` | UINT8 | `[N, H, W, C]`, any H and W | `ImageInput::Raw` per element |
//! | `encoded` | BYTES | `[N]` | `ImageInput::Encoded` per element |
//!
//! and `score` FP32 `[N]`, `in_distribution` BOOL `[N]`, `predicted_class`
//! INT64 `[N]`, `max_softmax` FP32 `[N]`, `logits` FP32 `[N, K]` (only when
//! asked for). A request carries exactly one input; each of its N elements
//! becomes one `FrameRequest`.

use std::collections::HashMap;
use std::time::Instant;

use tonic::{Code, Status};

use crate::domain;
use crate::error::FrameError;

#[allow(missing_docs, clippy::all)]
mod generated {
    tonic::include_proto!("inference");
}

pub use generated::*;

use infer_parameter::ParameterChoice;
use model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use model_infer_response::InferOutputTensor;
use model_metadata_response::TensorMetadata;

/// The encoded `FileDescriptorSet` of `inference` (the KServe v2 service),
/// for gRPC reflection and the descriptor check against tritonclient.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kserve_v2_descriptor");

/// The gRPC service name.
pub const SERVICE: &str = "inference.GRPCInferenceService";

/// `ServerMetadataResponse.name`.
pub const SERVER_NAME: &str = "odin-sidecar";

/// `ServerMetadataResponse.extensions`: request parameters (scoring
/// overrides) and Triton's bidirectional `ModelStreamInfer`.
pub const EXTENSIONS: [&str; 2] = ["parameters", "model_stream_infer"];

/// `ModelMetadataResponse.platform`.
pub const PLATFORM: &str = "onnxruntime_onnx";

/// Most elements one request may carry (its first dimension). A request is
/// already bounded by the 16 MiB message limit; this bounds the frames one
/// call puts in flight when the elements are tiny (a 1×1 image each).
pub const MAX_BATCH: usize = 1024;

/// The request parameters that set the scoring (`domain::ScoringRequest`).
pub const PARAMETERS: [&str; 4] = ["method", "temperature", "epsilon", "threshold"];

/// The three inputs a request may carry (exactly one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `input`: normalized FP32 tensors, NCHW, the model's own shape.
    Tensor,
    /// `image`: UINT8 pixels, NHWC, any height and width.
    Image,
    /// `encoded`: BYTES, each element a JPEG or PNG file.
    Encoded,
}

impl Input {
    /// Every input, in metadata order.
    pub const ALL: [Input; 3] = [Input::Tensor, Input::Image, Input::Encoded];

    /// The tensor name.
    pub fn name(self) -> &'static str {
        match self {
            Input::Tensor => "input",
            Input::Image => "image",
            Input::Encoded => "encoded",
        }
    }

    /// The KServe datatype.
    pub fn datatype(self) -> &'static str {
        match self {
            Input::Tensor => "FP32",
            Input::Image => "UINT8",
            Input::Encoded => "BYTES",
        }
    }

    fn from_name(name: &str) -> Option<Input> {
        Input::ALL.into_iter().find(|i| i.name() == name)
    }
}

/// The outputs a response may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `score` FP32 `[N]`: higher means more in-distribution.
    Score,
    /// `in_distribution` BOOL `[N]`: `score >= threshold`.
    InDistribution,
    /// `predicted_class` INT64 `[N]`: argmax of the unperturbed logits.
    PredictedClass,
    /// `max_softmax` FP32 `[N]`: at T = 1, of the unperturbed frame.
    MaxSoftmax,
    /// `logits` FP32 `[N, K]`: the unperturbed logits; only on request.
    Logits,
}

impl Output {
    /// Every output, in metadata order.
    pub const ALL: [Output; 5] = [
        Output::Score,
        Output::InDistribution,
        Output::PredictedClass,
        Output::MaxSoftmax,
        Output::Logits,
    ];

    /// What a request that names no outputs gets: all but the logits.
    pub const DEFAULT: [Output; 4] = [
        Output::Score,
        Output::InDistribution,
        Output::PredictedClass,
        Output::MaxSoftmax,
    ];

    /// The tensor name.
    pub fn name(self) -> &'static str {
        match self {
            Output::Score => "score",
            Output::InDistribution => "in_distribution",
            Output::PredictedClass => "predicted_class",
            Output::MaxSoftmax => "max_softmax",
            Output::Logits => "logits",
        }
    }

    /// The KServe datatype.
    pub fn datatype(self) -> &'static str {
        match self {
            Output::Score | Output::MaxSoftmax | Output::Logits => "FP32",
            Output::InDistribution => "BOOL",
            Output::PredictedClass => "INT64",
        }
    }

    fn from_name(name: &str) -> Option<Output> {
        Output::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// The served model as the protocol names and shapes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The model card's name.
    pub name: String,
    /// The model card's version.
    pub version: String,
    /// The card's version with the start of the model file's SHA-256
    /// (`ModelInfo.revision`): a second name of the same version.
    pub revision: String,
    /// Channels of the model input.
    pub channels: usize,
    /// Height of the model input.
    pub height: usize,
    /// Width of the model input.
    pub width: usize,
    /// Logits per image, when the card names the classes.
    pub classes: Option<usize>,
}

impl ModelSpec {
    /// The spec of the model `info` describes.
    pub fn new(info: &domain::ModelInfo) -> ModelSpec {
        let input = &info.preprocessing;
        ModelSpec {
            name: info.name.clone(),
            version: info.version.clone(),
            revision: info.versions.model.to_string(),
            channels: input.channels as usize,
            height: input.height as usize,
            width: input.width as usize,
            classes: (!info.labels.is_empty()).then_some(info.labels.len()),
        }
    }

    /// Whether `name` and `version` (empty: any) name this model; NOT_FOUND
    /// when not.
    pub fn check(&self, name: &str, version: &str) -> Result<(), Status> {
        if name != self.name {
            return Err(Status::not_found(format!(
                "unknown model '{name}'; this server serves '{}'",
                self.name
            )));
        }
        if !version.is_empty() && version != self.version && version != self.revision {
            return Err(Status::not_found(format!(
                "model '{name}' has no version '{version}'; its only version is '{}'",
                self.version
            )));
        }
        Ok(())
    }

    /// The shape of one input, as metadata shows it (-1: any size).
    pub fn input_shape(&self, input: Input) -> Vec<i64> {
        let (c, h, w) = (dim(self.channels), dim(self.height), dim(self.width));
        match input {
            Input::Tensor => vec![-1, c, h, w],
            Input::Image => vec![-1, -1, -1, c],
            Input::Encoded => vec![-1],
        }
    }

    /// `ModelMetadata`'s answer.
    pub fn metadata(&self) -> ModelMetadataResponse {
        let classes = self.classes.map_or(-1, dim);
        ModelMetadataResponse {
            name: self.name.clone(),
            versions: vec![self.version.clone(), self.revision.clone()],
            platform: PLATFORM.to_string(),
            inputs: Input::ALL
                .iter()
                .map(|i| TensorMetadata {
                    name: i.name().to_string(),
                    datatype: i.datatype().to_string(),
                    shape: self.input_shape(*i),
                })
                .collect(),
            outputs: Output::ALL
                .iter()
                .map(|o| TensorMetadata {
                    name: o.name().to_string(),
                    datatype: o.datatype().to_string(),
                    shape: match o {
                        Output::Logits => vec![-1, classes],
                        _ => vec![-1],
                    },
                })
                .collect(),
        }
    }
}

fn dim(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What answering a validated request needs once its frames are judged.
#[derive(Debug, Clone, PartialEq)]
pub struct InferReply {
    /// The request's id, echoed.
    pub id: String,
    model_name: String,
    model_version: String,
    outputs: Vec<Output>,
}

/// Checks a `ModelInferRequest` against `spec` and splits it into one
/// `FrameRequest` per batch element (each with `deadline`), in order. Every
/// error is the whole request's: NOT_FOUND for another model, else
/// INVALID_ARGUMENT naming what is wrong.
pub fn parse_request(
    request: ModelInferRequest,
    spec: &ModelSpec,
    deadline: Option<Instant>,
) -> Result<(InferReply, Vec<domain::FrameRequest>), Status> {
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = request;
    spec.check(&model_name, &model_version)?;
    let scoring = scoring(&parameters)?;
    let outputs = requested_outputs(&outputs)?;
    let images = images(inputs, raw_input_contents, spec)?;
    let frames = images
        .into_iter()
        .map(|image| domain::FrameRequest {
            id: id.clone(),
            image: Some(image),
            scoring: scoring.clone(),
            deadline,
            ..domain::FrameRequest::default()
        })
        .collect();
    let reply = InferReply {
        id,
        model_name: spec.name.clone(),
        model_version: spec.version.clone(),
        outputs,
    };
    Ok((reply, frames))
}

/// The status a request gets when its element `index` could not be judged:
/// that frame's code, and its message prefixed by the index.
pub fn frame_status(index: usize, error: &FrameError) -> Status {
    Status::new(error.code(), format!("frame {index}: {error}"))
}

impl InferReply {
    /// The response for the request's judgements, in element order; the
    /// first element with an error fails the whole request
    /// ([`frame_status`]).
    pub fn respond(&self, judgements: &[domain::Judgement]) -> Result<ModelInferResponse, Status> {
        let mut decisions = Vec::with_capacity(judgements.len());
        for (i, judgement) in judgements.iter().enumerate() {
            match &judgement.outcome {
                Ok(decision) => decisions.push(decision),
                Err(error) => return Err(frame_status(i, error)),
            }
        }
        let n = dim(decisions.len());
        let mut tensors = Vec::with_capacity(self.outputs.len());
        let mut raw = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let (shape, bytes) = match output {
                Output::Score => (vec![n], f32_bytes(decisions.iter().map(|d| d.score))),
                Output::MaxSoftmax => (vec![n], f32_bytes(decisions.iter().map(|d| d.max_softmax))),
                Output::InDistribution => (
                    vec![n],
                    decisions
                        .iter()
                        .map(|d| u8::from(d.in_distribution))
                        .collect(),
                ),
                Output::PredictedClass => (
                    vec![n],
                    decisions
                        .iter()
                        .flat_map(|d| i64::try_from(d.predicted_class).unwrap_or(-1).to_le_bytes())
                        .collect(),
                ),
                Output::Logits => {
                    let k = decisions.first().map_or(0, |d| d.logits.len());
                    if let Some(d) = decisions.iter().find(|d| d.logits.len() != k) {
                        return Err(Status::internal(format!(
                            "the model gave {} and {k} logits for frames of one batch",
                            d.logits.len()
                        )));
                    }
                    (
                        vec![n, dim(k)],
                        f32_bytes(decisions.iter().flat_map(|d| d.logits.iter().copied())),
                    )
                }
            };
            tensors.push(InferOutputTensor {
                name: output.name().to_string(),
                datatype: output.datatype().to_string(),
                shape,
                ..InferOutputTensor::default()
            });
            raw.push(bytes);
        }
        let mut parameters = HashMap::new();
        if let Some(applied) = judgements.first().and_then(|j| j.scoring) {
            let scoring = applied.scoring;
            parameters.insert(
                "method".to_string(),
                string_param(scoring.method.to_string()),
            );
            parameters.insert("temperature".into(), double_param(scoring.temperature));
            parameters.insert("epsilon".into(), double_param(scoring.effective_epsilon()));
            parameters.insert("threshold".into(), double_param(applied.threshold));
        }
        // Which model and calibration judged it (a live reload changes them).
        if let Some(first) = judgements.first() {
            parameters.insert(
                "model_revision".into(),
                string_param(first.versions.model.to_string()),
            );
            parameters.insert(
                "calibration_version".into(),
                string_param(first.versions.calibration.to_string()),
            );
        }
        Ok(ModelInferResponse {
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            id: self.id.clone(),
            parameters,
            outputs: tensors,
            raw_output_contents: raw,
        })
    }
}

/// A `ModelStreamInfer` answer: the response, or, for a request that
/// failed, its error in `error_message` (Triton's convention: the stream
/// goes on) with the request's id and model in `infer_response`.
pub fn stream_response(
    result: Result<ModelInferResponse, Status>,
    request: &RequestId,
) -> ModelStreamInferResponse {
    match result {
        Ok(response) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response),
        },
        Err(status) => ModelStreamInferResponse {
            error_message: status.message().to_string(),
            infer_response: Some(ModelInferResponse {
                model_name: request.model_name.clone(),
                model_version: request.model_version.clone(),
                id: request.id.clone(),
                ..ModelInferResponse::default()
            }),
        },
    }
}

/// Who a request was, for answering it when it fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestId {
    /// `model_name` as sent.
    pub model_name: String,
    /// `model_version` as sent.
    pub model_version: String,
    /// `id` as sent.
    pub id: String,
}

impl From<&ModelInferRequest> for RequestId {
    fn from(request: &ModelInferRequest) -> Self {
        RequestId {
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
            id: request.id.clone(),
        }
    }
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

fn string_param(value: String) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value)),
    }
}

/// `value` as a double with the f32's shortest decimal (0.004, not
/// 0.003999999724328518), as a client wrote it.
fn double_param(value: f32) -> InferParameter {
    let double = value.to_string().parse().unwrap_or(f64::from(value));
    InferParameter {
        parameter_choice: Some(ParameterChoice::DoubleParam(double)),
    }
}

fn invalid(message: String) -> Status {
    Status::new(Code::InvalidArgument, message)
}

/// The request's scoring parameters; `None` when it sets none.
fn scoring(
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<domain::ScoringRequest>, Status> {
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    let mut scoring = domain::ScoringRequest::default();
    for key in keys {
        let value = &parameters[key];
        match key.as_str() {
            "method" => match &value.parameter_choice {
                // Empty keeps the server's, as odin.v1's empty method does.
                Some(ParameterChoice::StringParam(m)) => {
                    scoring.method = (!m.is_empty()).then(|| m.clone());
                }
                other => {
                    return Err(invalid(format!(
                        "parameter 'method' must be a string_param (msp, odin, energy or maxlogit), not {}",
                        kind(other)
                    )))
                }
            },
            "temperature" => scoring.temperature = Some(number(key, value)?),
            "epsilon" => scoring.epsilon = Some(number(key, value)?),
            "threshold" => scoring.threshold = Some(number(key, value)?),
            _ => {
                return Err(invalid(format!(
                    "unknown request parameter '{key}'; the parameters are {}",
                    PARAMETERS.join(", ")
                )))
            }
        }
    }
    Ok((scoring != domain::ScoringRequest::default()).then_some(scoring))
}

fn kind(choice: &Option<ParameterChoice>) -> String {
    match choice {
        None => "unset".into(),
        Some(ParameterChoice::BoolParam(v)) => format!("bool_param {v}"),
        Some(ParameterChoice::Int64Param(v)) => format!("int64_param {v}"),
        Some(ParameterChoice::StringParam(v)) => format!("string_param {v:?}"),
        Some(ParameterChoice::DoubleParam(v)) => format!("double_param {v}"),
        Some(ParameterChoice::Uint64Param(v)) => format!("uint64_param {v}"),
    }
}

/// A numeric parameter, from a double, an integer or a string. Its range
/// is the pipeline's to check, with odin.v1's bounds and messages.
fn number(key: &str, value: &InferParameter) -> Result<f32, Status> {
    match &value.parameter_choice {
        Some(ParameterChoice::DoubleParam(v)) => Ok(*v as f32),
        Some(ParameterChoice::Int64Param(v)) => Ok(*v as f32),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v as f32),
        Some(ParameterChoice::StringParam(s)) => s.trim().parse::<f32>().map_err(|_| {
            invalid(format!(
                "parameter '{key}' is the string {s:?}, which is not a number"
            ))
        }),
        other => Err(invalid(format!(
            "parameter '{key}' must be a number (double_param, int64_param or a numeric string_param), not {}",
            kind(other)
        ))),
    }
}

fn requested_outputs(requested: &[InferRequestedOutputTensor]) -> Result<Vec<Output>, Status> {
    if requested.is_empty() {
        return Ok(Output::DEFAULT.to_vec());
    }
    let mut outputs = Vec::with_capacity(requested.len());
    for r in requested {
        let output = Output::from_name(&r.name).ok_or_else(|| {
            invalid(format!(
                "unknown output '{}'; the model's outputs are {}",
                r.name,
                Output::ALL.map(Output::name).join(", ")
            ))
        })?;
        if outputs.contains(&output) {
            return Err(invalid(format!("output '{}' is requested twice", r.name)));
        }
        outputs.push(output);
    }
    Ok(outputs)
}

fn input_list() -> String {
    Input::ALL.map(Input::name).join(", ")
}

/// The request's one input, split into its elements.
fn images(
    mut inputs: Vec<InferInputTensor>,
    mut raw: Vec<Vec<u8>>,
    spec: &ModelSpec,
) -> Result<Vec<domain::ImageInput>, Status> {
    if inputs.len() != 1 {
        let names: Vec<String> = inputs.iter().map(|i| format!("'{}'", i.name)).collect();
        return Err(invalid(format!(
            "the request has {} inputs{}{}; send exactly one of {}",
            inputs.len(),
            if names.is_empty() { "" } else { " " },
            names.join(", "),
            input_list()
        )));
    }
    if raw.len() > 1 {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for 1 input",
            raw.len()
        )));
    }
    let InferInputTensor {
        name,
        datatype,
        shape: declared,
        contents,
        ..
    } = inputs.remove(0);
    let name = name.as_str();
    let input = Input::from_name(name).ok_or_else(|| {
        invalid(format!(
            "unknown input '{name}'; the model takes exactly one of {}",
            Input::ALL
                .map(|i| format!("{} ({} {:?})", i.name(), i.datatype(), spec.input_shape(i)))
                .join(", ")
        ))
    })?;
    if datatype != input.datatype() {
        return Err(invalid(format!(
            "input '{name}' must be {}, not {datatype:?}",
            input.datatype()
        )));
    }
    let shape = check_shape(input, &declared, spec)?;
    let n = shape[0];
    let data = Data::of(name, contents, raw.pop())?;
    match input {
        Input::Tensor => {
            let values = data.fp32(name, &declared, elements(&shape))?;
            let (c, h, w) = (shape[1], shape[2], shape[3]);
            let per = c * h * w;
            let dims = [c, h, w].map(|d| u32::try_from(d).unwrap_or(u32::MAX));
            Ok(values
                .chunks_exact(per)
                .map(|chunk| {
                    domain::ImageInput::Tensor(domain::TensorInput {
                        shape: dims.to_vec(),
                        data: chunk.to_vec(),
                    })
                })
                .collect())
        }
        Input::Image => {
            let pixels = data.uint8(name, &declared, elements(&shape))?;
            let (h, w, c) = (shape[1], shape[2], shape[3]);
            let per = h * w * c;
            let [height, width, channels] = [h, w, c].map(|d| u32::try_from(d).unwrap_or(u32::MAX));
            Ok(pixels
                .chunks_exact(per)
                .map(|chunk| {
                    domain::ImageInput::Raw(domain::RawPixels {
                        width,
                        height,
                        channels,
                        pixels: chunk.to_vec(),
                    })
                })
                .collect())
        }
        Input::Encoded => Ok(data
            .bytes(name, n)?
            .into_iter()
            .map(domain::ImageInput::Encoded)
            .collect()),
    }
}

/// The product of `shape` (already checked not to overflow).
fn elements(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Checks the declared shape of `input` and returns it as sizes.
fn check_shape(input: Input, shape: &[i64], spec: &ModelSpec) -> Result<Vec<usize>, Status> {
    let name = input.name();
    let want = spec.input_shape(input);
    let layout = match input {
        Input::Tensor => "N, C, H, W",
        Input::Image => "N, H, W, C",
        Input::Encoded => "N",
    };
    if shape.len() != want.len() {
        return Err(invalid(format!(
            "input '{name}' has shape {shape:?} (rank {}); it must be rank {} [{layout}], {want:?}",
            shape.len(),
            want.len()
        )));
    }
    let mut sizes = Vec::with_capacity(shape.len());
    for (axis, (&got, &need)) in shape.iter().zip(&want).enumerate() {
        if got < 0 || (axis > 0 && got == 0) {
            return Err(invalid(format!(
                "input '{name}' has shape {shape:?}: dimension {axis} is {got}; sizes must be positive"
            )));
        }
        if need >= 0 && got != need {
            return Err(invalid(format!(
                "input '{name}' has shape {shape:?}, but the model takes {want:?} [{layout}]"
            )));
        }
        sizes.push(usize::try_from(got).unwrap_or(usize::MAX));
    }
    let n = sizes[0];
    if n == 0 || n > MAX_BATCH {
        return Err(invalid(format!(
            "input '{name}' has a batch of {n}; a request carries 1 to {MAX_BATCH} elements"
        )));
    }
    let mut total: usize = 1;
    for s in &sizes {
        total = total.checked_mul(*s).ok_or_else(|| {
            invalid(format!(
                "input '{name}' has shape {shape:?}: too many elements"
            ))
        })?;
    }
    // Bytes at 4 per value must not overflow either.
    total.checked_mul(4).ok_or_else(|| {
        invalid(format!(
            "input '{name}' has shape {shape:?}: too many elements"
        ))
    })?;
    Ok(sizes)
}

/// Where a tensor's data came from.
enum Data {
    Raw(Vec<u8>),
    Typed(InferTensorContents),
}

impl Data {
    fn of(
        name: &str,
        contents: Option<InferTensorContents>,
        raw: Option<Vec<u8>>,
    ) -> Result<Data, Status> {
        let typed = contents.filter(|c| !filled(c).is_empty());
        match (raw, typed) {
            (Some(_), Some(_)) => Err(invalid(format!(
                "input '{name}' has both raw_input_contents and typed contents; send one"
            ))),
            (Some(raw), None) => Ok(Data::Raw(raw)),
            (None, Some(contents)) => Ok(Data::Typed(contents)),
            (None, None) => Err(invalid(format!(
                "input '{name}' has no data: put it in raw_input_contents or in contents"
            ))),
        }
    }

    /// The typed field `datatype`'s values belong in; others must be empty.
    fn only(
        contents: &InferTensorContents,
        name: &str,
        datatype: &str,
        field: &str,
    ) -> Result<(), Status> {
        let filled = filled(contents);
        match filled.iter().find(|f| **f != field) {
            Some(other) => Err(invalid(format!(
                "input '{name}' is {datatype}: its values go in contents.{field} (or raw_input_contents), not contents.{other}"
            ))),
            None => Ok(()),
        }
    }

    fn fp32(self, name: &str, shape: &[i64], count: usize) -> Result<Vec<f32>, Status> {
        match self {
            Data::Raw(bytes) => {
                raw_size(name, shape, "FP32", count * 4, bytes.len())?;
                Ok(bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            }
            Data::Typed(contents) => {
                Data::only(&contents, name, "FP32", "fp32_contents")?;
                typed_count(name, shape, count, contents.fp32_contents.len())?;
                Ok(contents.fp32_contents)
            }
        }
    }

    fn uint8(self, name: &str, shape: &[i64], count: usize) -> Result<Vec<u8>, Status> {
        match self {
            Data::Raw(bytes) => {
                raw_size(name, shape, "UINT8", count, bytes.len())?;
                Ok(bytes)
            }
            Data::Typed(contents) => {
                Data::only(&contents, name, "UINT8", "uint_contents")?;
                typed_count(name, shape, count, contents.uint_contents.len())?;
                contents
                    .uint_contents
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        u8::try_from(*v).map_err(|_| {
                            invalid(format!(
                                "input '{name}' is UINT8, but contents.uint_contents[{i}] is {v}"
                            ))
                        })
                    })
                    .collect()
            }
        }
    }

    fn bytes(self, name: &str, n: usize) -> Result<Vec<Vec<u8>>, Status> {
        match self {
            Data::Raw(bytes) => split_bytes(name, n, &bytes),
            Data::Typed(contents) => {
                Data::only(&contents, name, "BYTES", "bytes_contents")?;
                if contents.bytes_contents.len() != n {
                    return Err(invalid(format!(
                        "input '{name}' has shape [{n}], but contents.bytes_contents holds {} elements",
                        contents.bytes_contents.len()
                    )));
                }
                Ok(contents.bytes_contents)
            }
        }
    }
}

/// The names of the typed fields that hold values.
fn filled(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| !empty)
    .map(|(field, _)| field)
    .collect()
}

fn raw_size(
    name: &str,
    shape: &[i64],
    datatype: &str,
    want: usize,
    got: usize,
) -> Result<(), Status> {
    if want == got {
        return Ok(());
    }
    Err(invalid(format!(
        "input '{name}' has shape {shape:?} ({datatype}): that is {want} bytes, but raw_input_contents[0] holds {got}"
    )))
}

fn typed_count(name: &str, shape: &[i64], want: usize, got: usize) -> Result<(), Status> {
    if want == got {
        return Ok(());
    }
    Err(invalid(format!(
        "input '{name}' has shape {shape:?}: that is {want} values, but its contents hold {got}"
    )))
}

/// BYTES raw contents: each element a 4-byte little-endian length, then
/// that many bytes; exactly `n` of them, with nothing left over.
fn split_bytes(name: &str, n: usize, raw: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
    let mut elements = Vec::with_capacity(n);
    let mut rest = raw;
    while !rest.is_empty() {
        let index = elements.len();
        if index == n {
            return Err(invalid(format!(
                "input '{name}' has shape [{n}], but raw_input_contents[0] holds {} more bytes after its {n} elements",
                rest.len()
            )));
        }
        let Some((prefix, tail)) = rest.split_first_chunk::<4>() else {
            return Err(invalid(format!(
                "input '{name}': element {index} of raw_input_contents[0] is cut short in its 4-byte length prefix ({} bytes left)",
                rest.len()
            )));
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if tail.len() < len {
            return Err(invalid(format!(
                "input '{name}': element {index} of raw_input_contents[0] declares {len} bytes, but only {} follow",
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(len);
        elements.push(element.to_vec());
        rest = tail;
    }
    if elements.len() != n {
        return Err(invalid(format!(
            "input '{name}' has shape [{n}], but raw_input_contents[0] holds {} length-prefixed elements",
            elements.len()
        )));
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: "1".into(),
            revision: "1@00000000".into(),
            channels: 3,
            height: 2,
            width: 2,
            classes: Some(10),
        }
    }

    fn request(name: &str, datatype: &str, shape: Vec<i64>, raw: Vec<u8>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            id: "r".into(),
            inputs: vec![InferInputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                ..InferInputTensor::default()
            }],
            raw_input_contents: vec![raw],
            ..ModelInferRequest::default()
        }
    }

    fn error(request: ModelInferRequest) -> (Code, String) {
        let status = parse_request(request, &spec(), None).expect_err("refused");
        (status.code(), status.message().to_string())
    }

    #[test]
    fn descriptor_set_names_the_inference_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "inference")
            .expect("inference file present");
        assert!(file
            .service
            .iter()
            .any(|s| s.name() == "GRPCInferenceService"));
    }

    #[test]
    fn models_are_found_by_name_and_optional_version() {
        let spec = spec();
        assert!(spec.check("m", "").is_ok());
        assert!(spec.check("m", "1").is_ok());
        assert_eq!(spec.check("m", "2").unwrap_err().code(), Code::NotFound);
        assert_eq!(spec.check("x", "").unwrap_err().code(), Code::NotFound);
    }

    #[test]
    fn an_image_batch_splits_into_raw_frames() {
        let pixels: Vec<u8> = (0..24).collect();
        let (reply, frames) = parse_request(
            request("image", "UINT8", vec![2, 2, 2, 3], pixels),
            &spec(),
            None,
        )
        .expect("valid");
        assert_eq!(reply.id, "r");
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[1].image,
            Some(domain::ImageInput::Raw(domain::RawPixels {
                width: 2,
                height: 2,
                channels: 3,
                pixels: (12..24).collect(),
            }))
        );
        assert_eq!(frames[0].id, "r");
        assert_eq!(frames[0].scoring, None);
    }

    #[test]
    fn fp32_raw_and_typed_contents_give_the_same_tensors() {
        let values: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (_, from_raw) = parse_request(
            request("input", "FP32", vec![1, 3, 2, 2], raw),
            &spec(),
            None,
        )
        .expect("raw");
        let mut typed = request("input", "FP32", vec![1, 3, 2, 2], Vec::new());
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: values.clone(),
            ..InferTensorContents::default()
        });
        let (_, from_typed) = parse_request(typed, &spec(), None).expect("typed");
        assert_eq!(from_raw, from_typed);
        assert_eq!(
            from_raw[0].image,
            Some(domain::ImageInput::Tensor(domain::TensorInput {
                shape: vec![3, 2, 2],
                data: values,
            }))
        );
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for element in [&b"abc"[..], b"", b"zz"] {
            raw.extend((element.len() as u32).to_le_bytes());
            raw.extend(element);
        }
        let (_, frames) = parse_request(
            request("encoded", "BYTES", vec![3], raw.clone()),
            &spec(),
            None,
        )
        .expect("valid");
        let got: Vec<_> = frames.into_iter().map(|f| f.image).collect();
        assert_eq!(
            got,
            vec![
                Some(domain::ImageInput::Encoded(b"abc".to_vec())),
                Some(domain::ImageInput::Encoded(Vec::new())),
                Some(domain::ImageInput::Encoded(b"zz".to_vec())),
            ]
        );
        let (code, message) = error(request("encoded", "BYTES", vec![2], raw.clone()));
        assert_eq!(code, Code::InvalidArgument);
        assert!(
            message.contains("6 more bytes after its 2 elements"),
            "{message}"
        );
        let (_, message) = error(request("encoded", "BYTES", vec![4], raw.clone()));
        assert!(
            message.contains("holds 3 length-prefixed elements"),
            "{message}"
        );
        let mut cut = raw.clone();
        cut.truncate(raw.len() - 1);
        let (_, message) = error(request("encoded", "BYTES", vec![3], cut));
        assert!(
            message.contains("declares 2 bytes, but only 1 follow"),
            "{message}"
        );
        let (_, message) = error(request("encoded", "BYTES", vec![1], vec![1, 0]));
        assert!(
            message.contains("cut short in its 4-byte length prefix"),
            "{message}"
        );
    }

    #[test]
    fn wrong_requests_get_precise_messages() {
        let image =
            |shape: Vec<i64>, bytes: usize| request("image", "UINT8", shape, vec![0; bytes]);
        let cases: Vec<(ModelInferRequest, &str)> = vec![
            (
                request("pixels", "UINT8", vec![1, 2, 2, 3], vec![0; 12]),
                "unknown input 'pixels'",
            ),
            (
                request("image", "FP32", vec![1, 2, 2, 3], vec![0; 48]),
                "input 'image' must be UINT8, not \"FP32\"",
            ),
            (
                image(vec![2, 2, 2, 3], 12),
                "that is 24 bytes, but raw_input_contents[0] holds 12",
            ),
            (image(vec![2, 2, 3], 12), "rank 3"),
            (
                image(vec![1, 2, 2, 2], 8),
                "but the model takes [-1, -1, -1, 3]",
            ),
            (image(vec![1, 0, 2, 3], 0), "dimension 1 is 0"),
            (image(vec![0, 2, 2, 3], 0), "a batch of 0"),
            (image(vec![2000, 1, 1, 3], 6000), "a batch of 2000"),
            (
                image(vec![1, i64::MAX, i64::MAX, 3], 0),
                "too many elements",
            ),
            (
                request("input", "FP32", vec![1, 3, 1, 1], vec![0; 12]),
                "but the model takes [-1, 3, 2, 2]",
            ),
        ];
        for (request, want) in cases {
            let (code, message) = error(request);
            assert_eq!(code, Code::InvalidArgument, "{message}");
            assert!(message.contains(want), "{message:?} lacks {want:?}");
        }
        let mut two = image(vec![1, 2, 2, 3], 12);
        two.inputs.push(two.inputs[0].clone());
        two.raw_input_contents.push(vec![0; 12]);
        assert!(error(two)
            .1
            .contains("the request has 2 inputs 'image', 'image'"));
        let mut none = image(vec![1, 2, 2, 3], 12);
        none.raw_input_contents.clear();
        assert!(error(none).1.contains("has no data"));
        let mut both = image(vec![1, 2, 2, 3], 12);
        both.inputs[0].contents = Some(InferTensorContents {
            uint_contents: vec![0; 12],
            ..InferTensorContents::default()
        });
        assert!(error(both)
            .1
            .contains("both raw_input_contents and typed contents"));
        let mut wrong_field = image(vec![1, 2, 2, 3], 0);
        wrong_field.raw_input_contents.clear();
        wrong_field.inputs[0].contents = Some(InferTensorContents {
            int_contents: vec![0; 12],
            ..InferTensorContents::default()
        });
        assert!(error(wrong_field)
            .1
            .contains("its values go in contents.uint_contents (or raw_input_contents), not contents.int_contents"));
        let mut big = image(vec![1, 2, 2, 3], 0);
        big.raw_input_contents.clear();
        big.inputs[0].contents = Some(InferTensorContents {
            uint_contents: vec![256; 12],
            ..InferTensorContents::default()
        });
        assert!(error(big).1.contains("uint_contents[0] is 256"));
        let mut other_model = image(vec![1, 2, 2, 3], 12);
        other_model.model_name = "x".into();
        assert_eq!(error(other_model).0, Code::NotFound);
    }

    fn param(choice: ParameterChoice) -> InferParameter {
        InferParameter {
            parameter_choice: Some(choice),
        }
    }

    #[test]
    fn parameters_become_the_scoring_override_in_any_numeric_form() {
        let mut request = request("image", "UINT8", vec![1, 2, 2, 3], vec![0; 12]);
        request.parameters = [
            (
                "method".to_string(),
                param(ParameterChoice::StringParam("msp".into())),
            ),
            (
                "temperature".to_string(),
                param(ParameterChoice::DoubleParam(10.0)),
            ),
            (
                "epsilon".to_string(),
                param(ParameterChoice::StringParam("0.001".into())),
            ),
            (
                "threshold".to_string(),
                param(ParameterChoice::Int64Param(0)),
            ),
        ]
        .into();
        let (_, frames) = parse_request(request.clone(), &spec(), None).expect("valid");
        assert_eq!(
            frames[0].scoring,
            Some(domain::ScoringRequest {
                method: Some("msp".into()),
                temperature: Some(10.0),
                epsilon: Some(0.001),
                threshold: Some(0.0),
            })
        );
        request.parameters.insert(
            "temprature".into(),
            param(ParameterChoice::DoubleParam(1.0)),
        );
        assert!(error(request.clone())
            .1
            .contains("unknown request parameter 'temprature'"));
        request.parameters.remove("temprature");
        request
            .parameters
            .insert("epsilon".into(), param(ParameterChoice::BoolParam(true)));
        assert!(error(request.clone())
            .1
            .contains("parameter 'epsilon' must be a number"));
        request.parameters.insert(
            "epsilon".into(),
            param(ParameterChoice::StringParam("x".into())),
        );
        assert!(error(request.clone())
            .1
            .contains("is the string \"x\", which is not a number"));
        request.parameters.remove("epsilon");
        request
            .parameters
            .insert("method".into(), param(ParameterChoice::DoubleParam(1.0)));
        assert!(error(request)
            .1
            .contains("parameter 'method' must be a string_param"));
    }

    #[test]
    fn outputs_default_to_four_and_unknown_ones_are_refused() {
        assert_eq!(requested_outputs(&[]).expect("default"), Output::DEFAULT);
        let ask = |names: &[&str]| {
            requested_outputs(
                &names
                    .iter()
                    .map(|n| InferRequestedOutputTensor {
                        name: n.to_string(),
                        ..InferRequestedOutputTensor::default()
                    })
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            ask(&["logits", "score"]).expect("known"),
            vec![Output::Logits, Output::Score]
        );
        assert!(ask(&["nope"])
            .unwrap_err()
            .message()
            .contains("unknown output 'nope'"));
        assert!(ask(&["score", "score"]).is_err());
    }

    #[test]
    fn responses_carry_every_output_little_endian_and_fail_on_a_frame_error() {
        let decision = |score: f32, class: usize| domain::Decision {
            score,
            in_distribution: score >= 0.5,
            predicted_class: class,
            label: String::new(),
            max_softmax: score,
            logits: vec![score, 1.0 - score],
        };
        let judgement = |outcome| domain::Judgement {
            frame_id: "r".into(),
            attributes: HashMap::new(),
            scoring: None,
            outcome,
            timings: domain::Timings::default(),
            versions: domain::Versions::default(),
        };
        let reply = InferReply {
            id: "r".into(),
            model_name: "m".into(),
            model_version: "1".into(),
            outputs: Output::ALL.to_vec(),
        };
        let response = reply
            .respond(&[
                judgement(Ok(decision(0.75, 3))),
                judgement(Ok(decision(0.25, 7))),
            ])
            .expect("ok");
        assert_eq!(response.outputs.len(), 5);
        assert_eq!(response.raw_output_contents.len(), 5);
        assert_eq!(response.outputs[4].shape, vec![2, 2]);
        assert_eq!(response.raw_output_contents[1], vec![1, 0]);
        assert_eq!(
            response.raw_output_contents[2],
            [3i64.to_le_bytes(), 7i64.to_le_bytes()].concat()
        );
        assert_eq!(
            response.raw_output_contents[0],
            [0.75f32.to_le_bytes(), 0.25f32.to_le_bytes()].concat()
        );
        let failed = reply
            .respond(&[
                judgement(Ok(decision(0.75, 3))),
                judgement(Err(FrameError::Channels(2))),
            ])
            .expect_err("frame 1 failed");
        assert_eq!(failed.code(), Code::InvalidArgument);
        assert!(failed
            .message()
            .starts_with("frame 1: raw frame has 2 channels"));
    }
}
