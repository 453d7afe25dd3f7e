//! `odin-sidecar export-grad`: derive the ODIN perturbation graph of a
//! classifier, print what the pass did, check the result runs under ONNX
//! Runtime and agrees with the model, then write it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ort::value::Tensor;

use crate::grad::{self, names, GradOptions};
use crate::model::ModelCard;

/// Flags of `export-grad`.
#[derive(Debug, Clone, Args)]
pub struct ExportGradArgs {
    /// The classifier (ONNX).
    pub model: PathBuf,
    /// Where to write the derived graph.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also output the raw gradient as `gradient`.
    #[arg(long)]
    pub raw_gradient: bool,
    /// Model card whose `input.std` scales ε (default: MODEL with
    /// extension .card.json, when present).
    #[arg(long, conflicts_with = "std")]
    pub card: Option<PathBuf>,
    /// Per-channel std of the input normalisation, e.g. 0.229,0.224,0.225.
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
}

/// Runs `export-grad`.
pub async fn run(args: ExportGradArgs) -> anyhow::Result<ExitCode> {
    let std = match (&args.std, &args.card) {
        (Some(std), _) => std.clone(),
        (None, Some(card)) => ModelCard::load(card)?.input.std,
        (None, None) => {
            let beside = crate::model::card::path_beside(&args.model);
            anyhow::ensure!(
                beside.is_file(),
                "no std given: pass --std a,b,c or --card CARD.json (no card found at {})",
                beside.display()
            );
            ModelCard::load(&beside)?.input.std
        }
    };
    let bytes = std::fs::read(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    let options = GradOptions {
        std,
        raw_gradient: args.raw_gradient,
        ..Default::default()
    };
    let derived = grad::derive(&bytes, &options)
        .with_context(|| format!("deriving {}", args.model.display()))?;
    print!("{}", derived.summary);
    let diff =
        check(&bytes, &derived.bytes).context("checking the derived graph with ONNX Runtime")?;
    println!("check: ONNX Runtime ran it; logits match the model's (max |Δ| = {diff:.1e})");
    std::fs::write(&args.output, &derived.bytes)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({} bytes)",
        args.output.display(),
        derived.bytes.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the model and the derived graph once on the same batch-1 input
/// and returns the largest logit difference; fails when an output is
/// missing, misshapen or not finite.
pub fn check(model: &[u8], derived: &[u8]) -> anyhow::Result<f32> {
    let session = |b: &[u8]| crate::runtime::session(b, &crate::runtime::SessionOptions::default());
    let mut plain = session(model)?;
    let mut g = session(derived)?;
    let input = plain.inputs().first().context("the model has no input")?;
    let name = input.name().to_string();
    let ort::value::ValueType::Tensor { shape, .. } = input.dtype() else {
        anyhow::bail!("input {name:?} is not a tensor");
    };
    let shape: Vec<i64> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if i == 0 || d < 0 { 1 } else { d })
        .collect();
    let n = shape.iter().product::<i64>() as usize;
    // A fixed, non-constant pattern: zeros would give a degenerate check.
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let z = {
        let out = plain
            .run(ort::inputs![name.as_str() => Tensor::from_array((shape.clone(), x.clone()))?])?;
        out[0].try_extract_tensor::<f32>()?.1.to_vec()
    };
    let scalar = |v: f32| Tensor::from_array((Vec::<i64>::new(), vec![v]));
    let out = g.run(ort::inputs![
        name.as_str() => Tensor::from_array((shape.clone(), x.clone()))?,
        names::TEMPERATURE => scalar(1000.0)?,
        names::EPSILON => scalar(0.0014)?,
    ])?;
    let logits = out[names::LOGITS].try_extract_tensor::<f32>()?.1.to_vec();
    let perturbed = out[names::PERTURBED]
        .try_extract_tensor::<f32>()?
        .1
        .to_vec();
    anyhow::ensure!(
        logits.len() == z.len(),
        "logits have {} values, the model gives {}",
        logits.len(),
        z.len()
    );
    anyhow::ensure!(
        perturbed.len() == n,
        "perturbed has {} values, the input {n}",
        perturbed.len()
    );
    anyhow::ensure!(
        perturbed.iter().chain(&logits).all(|v| v.is_finite()),
        "non-finite output"
    );
    anyhow::ensure!(
        perturbed != x,
        "perturbed equals the input: ε had no effect"
    );
    Ok(logits
        .iter()
        .zip(&z)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ExportGradArgs,
    }

    #[test]
    fn std_is_a_comma_list_and_excludes_card() {
        let w =
            Wrap::try_parse_from(["x", "m.onnx", "-o", "g.onnx", "--std", "0.5,0.25,2"]).unwrap();
        assert_eq!(w.args.std, Some(vec![0.5, 0.25, 2.0]));
        assert!(!w.args.raw_gradient);
        let e = Wrap::try_parse_from([
            "x", "m.onnx", "-o", "g.onnx", "--std", "1", "--card", "c.json",
        ]);
        assert!(e.is_err());
        assert!(
            Wrap::try_parse_from(["x", "m.onnx"]).is_err(),
            "-o is required"
        );
    }

    /// The built-in model's card (compiled in, like the model).
    fn builtin_card() -> ModelCard {
        ModelCard::parse(
            crate::model::DEFAULT_MODEL_CARD,
            std::path::Path::new("<embedded>"),
        )
        .unwrap()
    }

    #[test]
    fn check_rejects_a_graph_without_the_odin_outputs() {
        let bytes = crate::model::DEFAULT_MODEL_ONNX;
        // The plain model has no temperature/epsilon inputs or perturbed output.
        assert!(check(bytes, bytes).is_err());
        let options = GradOptions {
            std: builtin_card().input.std,
            raw_gradient: false,
            ..Default::default()
        };
        let derived = grad::derive(bytes, &options).unwrap();
        assert_eq!(check(bytes, &derived.bytes).unwrap(), 0.0);
    }

    #[tokio::test]
    async fn writes_a_checked_graph_with_std_from_the_card() {
        let dir = std::env::temp_dir().join(format!("odin-export-grad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("cnn.onnx");
        std::fs::write(&model, crate::model::DEFAULT_MODEL_ONNX).unwrap();
        let out = dir.join("cnn.odin.onnx");
        let card = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/cifar10_cnn.card.json"
        ));
        let std = ModelCard::load(&card).unwrap().input.std;
        let args = ExportGradArgs {
            model,
            output: out.clone(),
            raw_gradient: true,
            card: Some(card),
            std: None,
        };
        assert_eq!(run(args).await.unwrap(), ExitCode::SUCCESS);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let m = <crate::onnx::ModelProto as prost::Message>::decode(bytes.as_slice()).unwrap();
        let outputs: Vec<&str> = m
            .graph
            .as_ref()
            .unwrap()
            .output
            .iter()
            .map(|o| o.name())
            .collect();
        assert_eq!(outputs, [names::LOGITS, names::PERTURBED, names::GRADIENT]);

        // The step is ε / std[c] of the card, per channel, against the
        // gradient's sign (+1 where the gradient is zero).
        let mut g =
            crate::runtime::session(&bytes, &crate::runtime::SessionOptions::default()).unwrap();
        let input = g.inputs()[0].name().to_string();
        let (c, hw) = (std.len(), 32 * 32);
        let x: Vec<f32> = (0..c * hw)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let epsilon = 0.004f32;
        let scalar = |v: f32| Tensor::from_array((Vec::<i64>::new(), vec![v])).unwrap();
        let result = g
            .run(ort::inputs![
                input.as_str() => Tensor::from_array((vec![1i64, c as i64, 32, 32], x.clone())).unwrap(),
                names::TEMPERATURE => scalar(10.0),
                names::EPSILON => scalar(epsilon),
            ])
            .unwrap();
        let perturbed = result[names::PERTURBED]
            .try_extract_tensor::<f32>()
            .unwrap()
            .1
            .to_vec();
        let gradient = result[names::GRADIENT]
            .try_extract_tensor::<f32>()
            .unwrap()
            .1
            .to_vec();
        assert_eq!((perturbed.len(), gradient.len()), (x.len(), x.len()));
        assert!(gradient.iter().any(|v| *v != 0.0), "a degenerate gradient");
        for (i, ((p, x), g)) in perturbed.iter().zip(&x).zip(&gradient).enumerate() {
            let channel = i / hw;
            let sign = if *g < 0.0 { -1.0 } else { 1.0 };
            let want = -sign * epsilon / std[channel];
            assert!(
                ((p - x) - want).abs() < 1e-6,
                "value {i} (channel {channel}): stepped {} instead of {want}",
                p - x
            );
        }
    }

    #[tokio::test]
    async fn an_unreadable_model_is_an_error_and_writes_nothing() {
        let out = std::env::temp_dir().join(format!(
            "odin-export-grad-missing-{}.onnx",
            std::process::id()
        ));
        let args = ExportGradArgs {
            model: PathBuf::from("/nonexistent/model.onnx"),
            output: out.clone(),
            raw_gradient: false,
            card: None,
            std: Some(vec![1.0]),
        };
        let e = run(args).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/model.onnx"),
            "{e:#}"
        );
        assert!(!out.exists());
    }
}
