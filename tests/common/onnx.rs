//! ONNX Runtime for the gradient-pass tests and benchmark: sessions, runs
//! in float32 or float64, a seeded PRNG, little-endian f32 files.

use ort::session::Session;
use ort::value::Tensor;

/// Builds a CPU session (two intra-op threads: the machine has two cores).
pub fn session(bytes: &[u8]) -> Session {
    try_session_with(bytes, 2).expect("ONNX Runtime session (run scripts/setup.sh)")
}

/// Like [`session`] but returns ONNX Runtime's error (e.g. a kernel with no
/// double implementation).
pub fn try_session(bytes: &[u8]) -> Result<Session, String> {
    try_session_with(bytes, 1)
}

fn try_session_with(bytes: &[u8], intra_threads: usize) -> Result<Session, String> {
    let options = odin_sidecar::runtime::SessionOptions {
        intra_threads,
        ..Default::default()
    };
    odin_sidecar::runtime::session(bytes, &options).map_err(|e| e.to_string())
}

/// Element types the tests run models in.
pub trait Float: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static {
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}
impl Float for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}
impl Float for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// Runs a session on named inputs; returns every output as f64, in the
/// session's output order.
pub fn run<T: Float>(
    s: &mut Session,
    x_name: &str,
    shape: &[i64],
    x: &[T],
    extra: &[(&str, f32)],
) -> Vec<Vec<f64>> {
    let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![(
        x_name.to_string(),
        Tensor::from_array((shape.to_vec(), x.to_vec()))
            .unwrap()
            .into_dyn()
            .into(),
    )];
    for (name, v) in extra {
        inputs.push((
            name.to_string(),
            Tensor::from_array((Vec::<i64>::new(), vec![*v]))
                .unwrap()
                .into_dyn()
                .into(),
        ));
    }
    let out = s.run(inputs).unwrap();
    out.iter()
        .map(|(_, v)| match v.try_extract_tensor::<T>() {
            Ok((_, d)) => d.iter().map(|x| x.to_f64()).collect(),
            Err(_) => {
                let (_, d) = v.try_extract_tensor::<f32>().unwrap();
                d.iter().map(|&x| f64::from(x)).collect()
            }
        })
        .collect()
}

/// Index of an output by name.
pub fn output_index(s: &Session, name: &str) -> usize {
    s.outputs()
        .iter()
        .position(|o| o.name() == name)
        .unwrap_or_else(|| panic!("no output {name}"))
}

/// A seeded generator (the crate's SplitMix64), so test models are reproducible.
pub struct Rng(odin_sidecar::calib::sets::SplitMix64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(odin_sidecar::calib::sets::SplitMix64(seed))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// n values uniform in [-a, a).
    pub fn vec(&mut self, n: usize, a: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(-a, a)).collect()
    }
}

/// Little-endian f32 file.
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The built-in model with a `Sin` node on its input: a classifier ONNX
/// Runtime runs as before, but one the gradient pass cannot differentiate
/// (`Sin` has no rule), so it is served without ODIN.
pub fn builtin_without_gradient() -> Vec<u8> {
    use odin_sidecar::onnx::{ModelProto, NodeProto};
    use prost::Message;
    let mut model =
        ModelProto::decode(odin_sidecar::model::DEFAULT_MODEL_ONNX).expect("built-in model");
    let graph = model.graph.as_mut().expect("graph");
    let weights: std::collections::HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    let x = graph
        .input
        .iter()
        .map(|i| i.name().to_string())
        .find(|name| !weights.contains(name))
        .expect("an image input");
    for node in &mut graph.node {
        for input in &mut node.input {
            if *input == x {
                *input = "x_sin".into();
            }
        }
    }
    graph.node.insert(
        0,
        NodeProto {
            op_type: Some("Sin".into()),
            name: Some("no_rule_sin".into()),
            input: vec![x],
            output: vec!["x_sin".into()],
            ..Default::default()
        },
    );
    model.encode_to_vec()
}
