//! `bench engine`: one run of the plain model vs the gradient graph G vs
//! whole ODIN, the two-session way (G, then the model on the perturbed
//! batch) and fused (one graph), per batch size, alternating the
//! contenders round by round; and the KNN search on the batch's features
//! against a bank of 50,000 training features (the fit statistics' bank
//! with `--fit-stats`, else a random unit bank of that size).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::median;
use crate::app;
use crate::cli::ModelArgs;
use crate::engine::Engine;
use crate::model::Model;
use crate::score::{Detector, FeatureBatch, Knn, Perturbation};

/// Flags of `bench engine`.
#[derive(Debug, Clone, Args)]
pub struct EngineBench {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 128])]
    pub batches: Vec<usize>,
    /// Rounds per batch size; each round times every contender once.
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    /// Fit statistics whose KNN bank the search runs against (default: a
    /// random unit bank of `--bank-rows` rows).
    #[arg(long)]
    pub fit_stats: Option<std::path::PathBuf>,
    /// Rows of the random bank when no statistics are given.
    #[arg(long, default_value_t = 50_000)]
    pub bank_rows: usize,
    /// Neighbours of the KNN search.
    #[arg(long, default_value_t = 50)]
    pub k: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn engine(
    model: &Model,
    config: &crate::config::ServeConfig,
    fused: bool,
) -> anyhow::Result<Engine> {
    let mut config = config.clone();
    config.engine.fused = fused;
    let graphs = app::graphs(model, &config)?;
    anyhow::ensure!(
        graphs.gradient.is_some(),
        "the gradient graph could not be derived for this model"
    );
    Ok(Engine::load(model, Some(&graphs), &config.engine)?)
}

/// Runs `bench engine`.
pub fn run(args: &EngineBench) -> anyhow::Result<ExitCode> {
    let config = args.model.config()?;
    let model = Model::load(&config.model)?;
    let mut two = engine(&model, &config, false)?;
    let mut fused = engine(&model, &config, true)?;
    let pre = crate::pipeline::Preprocessor::new(&model.card.input);
    let odin = Perturbation {
        temperature: 1000.0,
        epsilon: model.card.odin.epsilon,
    };
    let knn = match (fused.feature_dim(), &args.fit_stats) {
        (None, _) => None,
        (Some(_), Some(path)) => {
            let stats = crate::fit::Stats::load(path)?;
            Some(Knn::new(&stats, args.k)?)
        }
        (Some(d), None) => {
            let mut rng = crate::fit::rng::SplitMix64::new(7);
            let mut bank = Vec::with_capacity(args.bank_rows * d);
            for _ in 0..args.bank_rows {
                let row: Vec<f64> = (0..d).map(|_| rng.next_f64()).collect();
                let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                bank.extend(row.iter().map(|v| (v / n) as f32));
            }
            Some(Knn::from_bank(&bank, d, args.k)?)
        }
    };
    let knn = knn.map(Arc::new);
    println!(
        "model {}, {}, intra-op threads {}, median of {} rounds; KNN k = {} over {} bank rows\n",
        model.card.name,
        fused.provider(),
        if config.engine.intra_threads == 0 {
            "auto".to_string()
        } else {
            config.engine.intra_threads.to_string()
        },
        args.rounds,
        args.k,
        knn.as_ref().map_or(0, |k| k.bank_rows()),
    );
    println!("| batch | forward ms | G ms | ODIN two-session ms | ODIN fused ms | forward frames/s | ODIN/forward two-session | ODIN/forward fused | KNN ms | KNN / ODIN fused |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        // Real-looking input: a deterministic ramp, normalized like the model's.
        let input: Vec<f32> = (0..batch * pre.tensor_len())
            .map(|i| ((i % 255) as f32 / 255.0 - 0.5) / 0.25)
            .collect();
        let (mut forward, mut gradient, mut whole, mut one, mut search) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut scores = vec![0.0f32; batch];
        for round in 0..args.rounds + 2 {
            let t = Instant::now();
            two.logits(&input, batch)?;
            let f = t.elapsed();
            let t = Instant::now();
            two.perturb(&input, batch, odin)?;
            let g = t.elapsed();
            let t = Instant::now();
            two.run(&input, batch, Some(odin))?;
            let o = t.elapsed();
            let t = Instant::now();
            let out = fused.run(&input, batch, Some(odin))?;
            let u = t.elapsed();
            let k = match (&knn, out.perturbed_features.as_deref()) {
                (Some(knn), Some(h)) => {
                    let t = Instant::now();
                    knn.score_batch(
                        FeatureBatch {
                            logits: &out.logits,
                            features: h,
                            n: batch,
                        },
                        &mut scores,
                    )?;
                    t.elapsed()
                }
                _ => Duration::ZERO,
            };
            // The first two rounds warm caches and allocators.
            if round >= 2 {
                forward.push(f);
                gradient.push(g);
                whole.push(o);
                one.push(u);
                search.push(k);
            }
        }
        let (f, g, o, u, k) = (
            median(forward),
            median(gradient),
            median(whole),
            median(one),
            median(search),
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let fps = |d: Duration| batch as f64 / d.as_secs_f64();
        println!(
            "| {batch} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.3} | {:.3} | {:.2} | {:.3} |",
            ms(f),
            ms(g),
            ms(o),
            ms(u),
            fps(f),
            fps(o) / fps(f),
            fps(u) / fps(f),
            ms(k),
            ms(k) / ms(u),
        );
    }
    Ok(ExitCode::SUCCESS)
}
