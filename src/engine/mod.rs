//! The engine: ONNX Runtime sessions that turn a batch of input tensors into
//! logits and, for ODIN, into the logits of the perturbed batch. Each engine
//! worker thread owns one `Engine` (`Session::run` takes `&mut self`), built
//! on the shared process-wide environment.
//!
//! A perturbed batch takes one run of the fused graph: the gradient graph
//! `G` derived from the model (x, T, ε → logits, perturbed) with the model's
//! forward pass on `perturbed` appended (weights shared), which outputs the
//! logits and penultimate features of the frames and of their perturbed
//! versions at once, so nothing returns to the host between the stages (on
//! CUDA too). The two-session path (G, then the model on G's `perturbed`
//! output, straight from G's output buffer on CPU) is kept for the equality
//! test and `bench engine`. An unperturbed batch runs the model alone, with
//! its features tensor exposed as a second output.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use ort::session::Session;
use ort::value::{TensorRef, ValueType};

use crate::grad::names as graph_names;
use crate::grad::taps::Taps;
use crate::model::Model;
use crate::runtime::{self, RuntimeError, SessionOptions};
use crate::score::Perturbation;

/// Which execution provider to ask for (`--device auto|cpu|cuda[:N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when it can be registered, else CPU with one warning.
    #[default]
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA on the given device; failing to register it is an error.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid device {s:?}: use auto, cpu, cuda or cuda:N");
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .map(Device::Cuda)
                    .ok_or_else(bad)
            }
        }
    }
}

/// The execution provider a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// The CUDA provider on a device.
    Cuda(i32),
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::Cpu => f.write_str("CPUExecutionProvider"),
            Provider::Cuda(n) => write!(f, "CUDAExecutionProvider:{n}"),
        }
    }
}

/// How to build each session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Requested execution provider.
    pub device: Device,
    /// Intra-op threads per session (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
    /// One fused graph for perturbed batches (G plus the model's forward
    /// pass on `perturbed`, weights shared: one session run, nothing back
    /// on the host between the stages), instead of two sessions (G, then
    /// the model on G's output). The two-session path is kept for the
    /// equality test and the benchmark.
    pub fused: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Auto,
            intra_threads: 1,
            fused: true,
        }
    }
}

/// Why an engine could not be built or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime itself is not available, or refused the model.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// CUDA was required but could not be registered.
    #[error(
        "--device cuda:{device} was requested but the CUDA execution provider could not be registered: {detail} \
         Use --device auto to fall back to CPU, or install an onnxruntime build with CUDA (onnxruntime-gpu) \
         and point {env} at it",
        env = runtime::ENV_DYLIB_PATH
    )]
    CudaUnavailable {
        /// The requested CUDA device.
        device: i32,
        /// What ONNX Runtime said.
        detail: String,
    },
    /// The model does not have the shape of an image classifier.
    #[error("model is not an image classifier this sidecar can serve: {0}")]
    Model(String),
    /// ONNX Runtime failed.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

fn ort_error(e: impl fmt::Display) -> EngineError {
    EngineError::Ort(e.to_string())
}

/// What the engine learned from the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Name of the image input.
    pub input_name: String,
    /// The declared input shape; -1 for dynamic axes.
    pub input_shape: Vec<i64>,
    /// Number of logits per image.
    pub classes: usize,
}

/// What one engine run computed for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// `batch × classes` logits of the frames as sent.
    pub logits: Vec<f32>,
    /// `batch × D` penultimate features of the frames, when tapped.
    pub features: Option<Vec<f32>>,
    /// `batch × classes` logits of the perturbed frames, when perturbed.
    pub perturbed_logits: Option<Vec<f32>>,
    /// `batch × D` features of the perturbed frames, when perturbed and tapped.
    pub perturbed_features: Option<Vec<f32>>,
    /// Time in the gradient graph G, when perturbed (for the batch's trace;
    /// with the fused graph, the whole run).
    pub gradient_time: Option<std::time::Duration>,
    /// Time in the forward run of the model (zero for a fused run).
    pub forward_time: std::time::Duration,
}

impl BatchOutput {
    /// The features of the frames as sent (`perturbed = false`) or of their
    /// perturbed versions, when computed.
    pub fn features_of(&self, perturbed: bool) -> Option<&[f32]> {
        if perturbed {
            self.perturbed_features.as_deref()
        } else {
            self.features.as_deref()
        }
    }
}

/// The graphs one model is served with, derived once and shared by every
/// engine worker.
#[derive(Debug, Clone)]
pub struct Graphs {
    /// The model, with its features tensor also output when tapped.
    pub forward: Arc<[u8]>,
    /// The gradient graph G, or the fused graph (G plus the forward pass on
    /// `perturbed`), when it could be derived.
    pub gradient: Option<Arc<[u8]>>,
    /// Whether `gradient` is the fused graph.
    pub fused: bool,
    /// Where the features are, when the model has them.
    pub taps: Option<Arc<Taps>>,
}

impl Graphs {
    /// The plain model only: no features, no perturbation.
    pub fn plain(model: &Model) -> Graphs {
        Graphs {
            forward: Arc::clone(&model.onnx),
            gradient: None,
            fused: false,
            taps: None,
        }
    }
}

/// The model's session, and the gradient graph's when ODIN is available.
pub struct Engine {
    session: Session,
    gradient: Option<Session>,
    fused: bool,
    shape: ModelShape,
    chw: [usize; 3],
    provider: Provider,
    /// The features output of the forward session and D.
    features: Option<(String, usize)>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("shape", &self.shape)
            .field("provider", &self.provider)
            .field("fused", &self.fused)
            .finish()
    }
}

impl Engine {
    /// Builds a session for the model (and for its gradient or fused graph,
    /// when `graphs` has one) and checks that the input is an NCHW image of
    /// the card's size and the output logits. `None` serves the plain
    /// model: no features, no perturbation.
    pub fn load(
        model: &Model,
        graphs: Option<&Graphs>,
        options: &EngineOptions,
    ) -> Result<Engine, EngineError> {
        let plain;
        let graphs = match graphs {
            Some(g) => g,
            None => {
                plain = Graphs::plain(model);
                &plain
            }
        };
        let on = |cuda: Option<i32>| SessionOptions {
            intra_threads: options.intra_threads,
            cuda,
            ..SessionOptions::default()
        };
        let forward = &graphs.forward;
        let (session, provider) = match options.device {
            Device::Cpu => (runtime::session(forward, &on(None))?, Provider::Cpu),
            Device::Cuda(n) => match runtime::session(forward, &on(Some(n))) {
                Ok(session) => (session, Provider::Cuda(n)),
                Err(RuntimeError::Session(detail)) => {
                    return Err(EngineError::CudaUnavailable { device: n, detail })
                }
                Err(other) => return Err(other.into()),
            },
            Device::Auto => match runtime::session(forward, &on(Some(0))) {
                Ok(session) => (session, Provider::Cuda(0)),
                Err(RuntimeError::Session(detail)) => {
                    tracing::debug!(%detail, "CUDA provider not registered");
                    (runtime::session(forward, &on(None))?, Provider::Cpu)
                }
                Err(other) => return Err(other.into()),
            },
        };
        let cuda = match provider {
            Provider::Cuda(n) => Some(n),
            Provider::Cpu => None,
        };
        let gradient = graphs
            .gradient
            .as_deref()
            .map(|bytes| runtime::session(bytes, &on(cuda)))
            .transpose()?;
        let shape = model_shape(&session)?;
        let c = &model.card.input;
        let chw = [c.channels as usize, c.height as usize, c.width as usize];
        let declared = &shape.input_shape[1..];
        let fits = declared
            .iter()
            .zip(chw)
            .all(|(d, want)| *d < 0 || *d as usize == want);
        if !fits {
            return Err(EngineError::Model(format!(
                "the card says the input is [N, {}, {}, {}] but the model declares {:?}",
                chw[0], chw[1], chw[2], shape.input_shape
            )));
        }
        Ok(Engine {
            session,
            gradient,
            fused: graphs.fused,
            shape,
            chw,
            provider,
            features: graphs.taps.as_ref().map(|t| (t.features.clone(), t.dim)),
        })
    }

    /// The execution provider this engine runs on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Whether the gradient graph is loaded, so frames can be perturbed.
    pub fn can_perturb(&self) -> bool {
        self.gradient.is_some()
    }

    /// Whether perturbed batches run as one fused graph.
    pub fn fused(&self) -> bool {
        self.fused && self.gradient.is_some()
    }

    /// The feature dimension D, when the model's features are tapped.
    pub fn feature_dim(&self) -> Option<usize> {
        self.features.as_ref().map(|(_, d)| *d)
    }

    /// The model's input and output facts.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Runs `batch` images, laid out back to back in `input` (NCHW), and
    /// returns `batch × classes` logits.
    pub fn logits(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        Ok(self.forward(input, batch)?.0)
    }

    /// Runs `batch` images through the model: their logits and, when the
    /// model is tapped, their features (`batch × D`).
    pub fn forward(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), EngineError> {
        let [c, h, w] = self.chw;
        debug_assert_eq!(input.len(), batch * c * h * w);
        let tensor = TensorRef::from_array_view(([batch, c, h, w], input)).map_err(ort_error)?;
        let outputs = self
            .session
            .run(ort::inputs![self.shape.input_name.as_str() => tensor])
            .map_err(ort_error)?;
        let (shape, logits) = outputs[0].try_extract_tensor::<f32>().map_err(ort_error)?;
        if shape.len() != 2 || shape[0] as usize != batch || shape[1] as usize != self.shape.classes
        {
            return Err(EngineError::Model(format!(
                "expected logits of shape [{batch}, {}], got {shape:?}",
                self.shape.classes
            )));
        }
        let features = match &self.features {
            Some((name, d)) => Some(extract(&outputs, name, batch * d)?.to_vec()),
            None => None,
        };
        Ok((logits.to_vec(), features))
    }

    /// Runs a batch, perturbed first when `perturbation` is given: the
    /// fused graph once, or G on the batch then the model on G's
    /// `perturbed` output.
    pub fn run(
        &mut self,
        input: &[f32],
        batch: usize,
        perturbation: Option<Perturbation>,
    ) -> Result<BatchOutput, EngineError> {
        let started = std::time::Instant::now();
        let Some(perturbation) = perturbation else {
            let (logits, features) = self.forward(input, batch)?;
            return Ok(BatchOutput {
                logits,
                features,
                perturbed_logits: None,
                perturbed_features: None,
                gradient_time: None,
                forward_time: started.elapsed(),
            });
        };
        let [c, h, w] = self.chw;
        let classes = self.shape.classes;
        let dim = self.feature_dim();
        let (logits, g_out) = run_gradient(
            &mut self.gradient,
            &self.shape,
            [batch, c, h, w],
            input,
            perturbation,
        )?;
        let features = match dim {
            Some(d) => Some(extract(&g_out, graph_names::FEATURES, batch * d)?.to_vec()),
            None => None,
        };
        if self.fused {
            let perturbed_logits =
                extract(&g_out, graph_names::PERTURBED_LOGITS, batch * classes)?.to_vec();
            let perturbed_features = match dim {
                Some(d) => {
                    Some(extract(&g_out, graph_names::PERTURBED_FEATURES, batch * d)?.to_vec())
                }
                None => None,
            };
            return Ok(BatchOutput {
                logits,
                features,
                perturbed_logits: Some(perturbed_logits),
                perturbed_features,
                gradient_time: Some(started.elapsed()),
                forward_time: std::time::Duration::ZERO,
            });
        }
        let perturbed = extract(&g_out, graph_names::PERTURBED, input.len())?;
        let gradient_time = started.elapsed();
        let x2 = TensorRef::from_array_view(([batch, c, h, w], perturbed)).map_err(ort_error)?;
        let out = self
            .session
            .run(ort::inputs![self.shape.input_name.as_str() => x2])
            .map_err(ort_error)?;
        let (_, perturbed_logits) = out[0].try_extract_tensor::<f32>().map_err(ort_error)?;
        if perturbed_logits.len() != batch * classes {
            return Err(EngineError::Model(format!(
                "perturbed logits have {} values, expected {}",
                perturbed_logits.len(),
                batch * classes
            )));
        }
        let perturbed_features = match &self.features {
            Some((name, d)) => Some(extract(&out, name, batch * d)?.to_vec()),
            None => None,
        };
        Ok(BatchOutput {
            logits,
            features,
            perturbed_logits: Some(perturbed_logits.to_vec()),
            perturbed_features,
            gradient_time: Some(gradient_time),
            forward_time: started.elapsed() - gradient_time,
        })
    }

    /// Runs only the perturbation: (logits, perturbed input) of a batch.
    /// Calibration uses it to reuse one gradient direction for many ε.
    pub fn perturb(
        &mut self,
        input: &[f32],
        batch: usize,
        perturbation: Perturbation,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let [c, h, w] = self.chw;
        let (logits, g_out) = run_gradient(
            &mut self.gradient,
            &self.shape,
            [batch, c, h, w],
            input,
            perturbation,
        )?;
        let perturbed = extract(&g_out, graph_names::PERTURBED, input.len())?.to_vec();
        Ok((logits, perturbed))
    }
}

fn no_gradient() -> EngineError {
    EngineError::Model("no gradient graph is loaded; ODIN is unavailable".into())
}

/// One run of the gradient graph G on an NCHW batch: its logits, and the
/// outputs still borrowed, so `perturbed` can feed the next run uncopied.
fn run_gradient<'s>(
    gradient: &'s mut Option<Session>,
    shape: &ModelShape,
    dims: [usize; 4],
    input: &[f32],
    perturbation: Perturbation,
) -> Result<(Vec<f32>, ort::session::SessionOutputs<'s>), EngineError> {
    let gradient = gradient.as_mut().ok_or_else(no_gradient)?;
    let x = TensorRef::from_array_view((dims, input)).map_err(ort_error)?;
    let temperature = [perturbation.temperature];
    let epsilon = [perturbation.epsilon];
    // ONNX Runtime accepts shape [1] for the scalar inputs G declares.
    let t = TensorRef::from_array_view(([1usize], &temperature[..])).map_err(ort_error)?;
    let e = TensorRef::from_array_view(([1usize], &epsilon[..])).map_err(ort_error)?;
    let outputs = gradient
        .run(ort::inputs![
            shape.input_name.as_str() => x,
            graph_names::TEMPERATURE => t,
            graph_names::EPSILON => e,
        ])
        .map_err(ort_error)?;
    let logits = extract(&outputs, graph_names::LOGITS, dims[0] * shape.classes)?.to_vec();
    Ok((logits, outputs))
}

/// The f32 output `name` of a run, checked to hold `len` values.
fn extract<'a>(
    outputs: &'a ort::session::SessionOutputs<'_>,
    name: &str,
    len: usize,
) -> Result<&'a [f32], EngineError> {
    let value = outputs
        .get(name)
        .ok_or_else(|| EngineError::Model(format!("the graph has no output {name:?}")))?;
    let (_, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
    if data.len() != len {
        return Err(EngineError::Model(format!(
            "graph output {name:?} has {} values, expected {len}",
            data.len()
        )));
    }
    Ok(data)
}

/// Reads the input name/shape and checks the output is `[N, K]` float logits.
fn model_shape(session: &Session) -> Result<ModelShape, EngineError> {
    let bad = |m: String| EngineError::Model(m);
    let [input] = session.inputs() else {
        return Err(bad(format!(
            "expected one input, found {}",
            session.inputs().len()
        )));
    };
    let Some(output) = session.outputs().first() else {
        return Err(bad("the model has no outputs".into()));
    };
    let input_shape = match input.dtype() {
        ValueType::Tensor { ty, shape, .. }
            if *ty == ort::value::TensorElementType::Float32 && shape.len() == 4 =>
        {
            shape.iter().copied().collect::<Vec<i64>>()
        }
        other => {
            return Err(bad(format!(
                "input {:?} must be a float32 NCHW tensor, found {other:?}",
                input.name()
            )))
        }
    };
    let classes = match output.dtype() {
        ValueType::Tensor { ty, shape, .. }
            if *ty == ort::value::TensorElementType::Float32
                && shape.len() == 2
                && shape[1] >= 2 =>
        {
            shape[1] as usize
        }
        other => {
            return Err(bad(format!(
                "output {:?} must be float32 logits [N, K] with K >= 2 known, found {other:?}",
                output.name()
            )))
        }
    };
    Ok(ModelShape {
        input_name: input.name().to_string(),
        input_shape,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("auto".parse(), Ok(Device::Auto));
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().unwrap_err().contains("gpu"));
    }
}
