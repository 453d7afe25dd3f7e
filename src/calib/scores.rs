//! Scoring whole image sets in-process, in batches, straight on the engine
//! (no gRPC): what `calibrate` and `eval` measure with.

use crate::engine::{Engine, EngineError};
use crate::score::{self, Outputs, Perturbation, Scoring};

use super::sets::Set;

/// Images per engine run.
pub const BATCH: usize = 128;

/// The score of every image of `set` under `scoring`.
pub fn scores(engine: &mut Engine, set: &Set, scoring: Scoring) -> Result<Vec<f32>, EngineError> {
    let len = set.inputs.len() / set.n;
    let classes = engine.shape().classes;
    let mut out = Vec::with_capacity(set.n);
    for chunk in set.inputs.chunks(BATCH * len) {
        let n = chunk.len() / len;
        let batch = engine.run(chunk, n, scoring.perturbation())?;
        for i in 0..n {
            let rows = i * classes..(i + 1) * classes;
            out.push(scoring.score(Outputs {
                logits: &batch.logits[rows.clone()],
                perturbed: batch.perturbed_logits.as_ref().map(|p| &p[rows]),
            }));
        }
    }
    Ok(out)
}

/// The classifier's prediction (argmax of the unperturbed logits) for every
/// image of `set`.
pub fn predictions(engine: &mut Engine, set: &Set) -> Result<Vec<usize>, EngineError> {
    let len = set.inputs.len() / set.n;
    let classes = engine.shape().classes;
    let mut out = Vec::with_capacity(set.n);
    for chunk in set.inputs.chunks(BATCH * len) {
        let logits = engine.logits(chunk, chunk.len() / len)?;
        out.extend(logits.chunks_exact(classes).map(score::argmax));
    }
    Ok(out)
}

/// The share of images of a labelled `set` the classifier gets right
/// (`None` without labels).
pub fn accuracy(engine: &mut Engine, set: &Set) -> Result<Option<f64>, EngineError> {
    let Some(labels) = &set.labels else {
        return Ok(None);
    };
    let predicted = predictions(engine, set)?;
    let correct = predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == usize::from(**l))
        .count();
    Ok(Some(correct as f64 / set.n as f64))
}

/// ODIN scores of every image for every (T, ε) of a grid: `[t][e][image]`.
///
/// The gradient sign depends on T but not on ε, so each T needs one run of
/// the gradient graph (at ε = 1, which yields the direction sign(g)/std), and
/// each ε one forward run of `x − ε · direction`.
pub fn odin_grid(
    engine: &mut Engine,
    set: &Set,
    temperatures: &[f32],
    epsilons: &[f32],
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
    let len = set.inputs.len() / set.n;
    let classes = engine.shape().classes;
    let mut out = vec![vec![Vec::with_capacity(set.n); epsilons.len()]; temperatures.len()];
    for chunk in set.inputs.chunks(BATCH * len) {
        let n = chunk.len() / len;
        for (ti, &temperature) in temperatures.iter().enumerate() {
            let (logits, unit_step) = engine.perturb(
                chunk,
                n,
                Perturbation {
                    temperature,
                    epsilon: 1.0,
                },
            )?;
            let direction: Vec<f32> = chunk.iter().zip(&unit_step).map(|(x, p)| x - p).collect();
            for (ei, &epsilon) in epsilons.iter().enumerate() {
                let perturbed_logits = if epsilon == 0.0 {
                    logits.clone()
                } else {
                    let x: Vec<f32> = chunk
                        .iter()
                        .zip(&direction)
                        .map(|(x, d)| x - epsilon * d)
                        .collect();
                    engine.logits(&x, n)?
                };
                out[ti][ei].extend(
                    perturbed_logits
                        .chunks_exact(classes)
                        .map(|z| score::max_softmax(z, temperature)),
                );
            }
            progress(n);
        }
    }
    Ok(out)
}
