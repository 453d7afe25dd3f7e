//! Expected answers, computed independently of the pipeline: its
//! preprocessing, its scorers and its batching.

use odin_sidecar::config::ServeConfig;
use odin_sidecar::engine::{Device, Engine, EngineOptions};
use odin_sidecar::model::Model;

pub use odin_sidecar::score::argmax;

/// ImageNet normalization of the akamaster ResNets.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet normalization of the akamaster ResNets.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `(p/255 - mean)/std`, one HWC u8 image → CHW f32 (any channel count).
pub fn normalize(hwc: &[u8], mean: &[f32], std: &[f32]) -> Vec<f32> {
    let c = mean.len();
    let plane = hwc.len() / c;
    let mut out = vec![0.0f32; hwc.len()];
    for i in 0..plane {
        for ch in 0..c {
            out[ch * plane + i] = (f32::from(hwc[i * c + ch]) / 255.0 - mean[ch]) / std[ch];
        }
    }
    out
}

/// [`normalize`] for `n` images back to back (NHWC → NCHW).
pub fn normalize_batch(nhwc: &[u8], n: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let per = nhwc.len() / n;
    nhwc.chunks_exact(per)
        .flat_map(|image| normalize(image, mean, std))
        .collect()
}

fn f64s(logits: &[f32]) -> impl Iterator<Item = f64> + '_ {
    logits.iter().map(|v| f64::from(*v))
}

/// Max softmax of `logits / t`, in f64.
pub fn reference_max_softmax(logits: &[f32], t: f64) -> f64 {
    let max = f64s(logits).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = f64s(logits).map(|v| ((v - max) / t).exp()).sum();
    1.0 / sum
}

/// Negated energy `t · logsumexp(logits / t)`, in f64.
pub fn reference_energy(logits: &[f32], t: f64) -> f64 {
    let max = f64s(logits).fold(f64::NEG_INFINITY, f64::max);
    max + t * f64s(logits)
        .map(|v| ((v - max) / t).exp())
        .sum::<f64>()
        .ln()
}

/// The largest logit.
pub fn reference_max_logit(logits: &[f32]) -> f64 {
    f64s(logits).fold(f64::NEG_INFINITY, f64::max)
}

/// A single-threaded CPU engine for `config`'s model, without the gradient
/// graph: the in-process reference the served answers are checked against.
pub fn reference_engine(config: &ServeConfig) -> Engine {
    let model = Model::load(&config.model).expect("model loads");
    let options = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        fused: true,
    };
    Engine::load(&model, None, &options).expect("engine builds")
}

/// The logits of one image (HWC u8, already the model's size) by the
/// reference engine, normalized with `mean`/`std`.
pub fn reference_logits(engine: &mut Engine, hwc: &[u8], mean: &[f32], std: &[f32]) -> Vec<f32> {
    engine
        .logits(&normalize(hwc, mean, std), 1)
        .expect("reference engine runs")
}

/// The reference engine with its model's card: logits of images
/// normalized by the test's own code, one image per run.
pub struct Reference {
    pub engine: Engine,
    pub card: odin_sidecar::model::ModelCard,
}

impl Reference {
    /// The reference for `config`'s model.
    pub fn new(config: &ServeConfig) -> Reference {
        let card = Model::load(&config.model).expect("model loads").card;
        Reference {
            engine: reference_engine(config),
            card,
        }
    }

    /// Logits of one HWC u8 image of the model's size.
    pub fn logits(&mut self, hwc: &[u8]) -> Vec<f32> {
        let input = &self.card.input;
        let (mean, std) = (input.mean.clone(), input.std.clone());
        reference_logits(&mut self.engine, hwc, &mean, &std)
    }

    /// Logits of one already normalized CHW tensor.
    pub fn tensor_logits(&mut self, chw: &[f32]) -> Vec<f32> {
        self.engine.logits(chw, 1).expect("reference engine runs")
    }

    /// Asserts that `verdict` is the model's answer for `logits`: its class
    /// and label, and its max-softmax at T = 1 (to 1e-5).
    pub fn assert_answer(&self, verdict: &odin_sidecar::wire::odin_v1::Verdict, logits: &[f32]) {
        let id = &verdict.frame_id;
        assert!(verdict.error.is_none(), "{id}: {:?}", verdict.error);
        let class = argmax(logits);
        assert_eq!(verdict.predicted_class as usize, class, "{id}");
        assert_eq!(verdict.label, self.card.labels[class], "{id}");
        let want = reference_max_softmax(logits, 1.0);
        assert!(
            (f64::from(verdict.max_softmax) - want).abs() < 1e-5,
            "{id}: max_softmax {} vs {want}",
            verdict.max_softmax
        );
    }
}
