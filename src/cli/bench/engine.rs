//! `bench engine`: one run of the plain model vs the gradient graph G vs
//! whole ODIN (G, then the model on the perturbed batch), per batch size,
//! alternating the contenders round by round.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::median;
use crate::app;
use crate::cli::ModelArgs;
use crate::score::Perturbation;

/// Flags of `bench engine`.
#[derive(Debug, Clone, Args)]
pub struct EngineBench {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 128])]
    pub batches: Vec<usize>,
    /// Rounds per batch size; each round times every contender once.
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `bench engine`.
pub fn run(args: &EngineBench) -> anyhow::Result<ExitCode> {
    let config = args.model.config()?;
    let (model, mut engine, pre) = app::offline_engine(&config)?;
    anyhow::ensure!(
        engine.can_perturb(),
        "the gradient graph could not be derived for this model"
    );
    let odin = Perturbation {
        temperature: 1000.0,
        epsilon: model.card.odin.epsilon,
    };
    println!(
        "model {}, {}, intra-op threads {}, median of {} rounds\n",
        model.card.name,
        engine.provider(),
        if config.engine.intra_threads == 0 {
            "auto".to_string()
        } else {
            config.engine.intra_threads.to_string()
        },
        args.rounds
    );
    println!("| batch | forward ms | G ms | G / forward | ODIN ms | forward frames/s | ODIN frames/s | ODIN / forward |");
    println!("|---|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        // Real-looking input: a deterministic ramp, normalized like the model's.
        let input: Vec<f32> = (0..batch * pre.tensor_len())
            .map(|i| ((i % 255) as f32 / 255.0 - 0.5) / 0.25)
            .collect();
        let (mut forward, mut gradient, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds + 2 {
            let t = Instant::now();
            engine.logits(&input, batch)?;
            let f = t.elapsed();
            let t = Instant::now();
            engine.perturb(&input, batch, odin)?;
            let g = t.elapsed();
            let t = Instant::now();
            engine.run(&input, batch, Some(odin))?;
            let o = t.elapsed();
            // The first two rounds warm caches and allocators.
            if round >= 2 {
                forward.push(f);
                gradient.push(g);
                whole.push(o);
            }
        }
        let (f, g, o) = (median(forward), median(gradient), median(whole));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let fps = |d: Duration| batch as f64 / d.as_secs_f64();
        println!(
            "| {batch} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.3} |",
            ms(f),
            ms(g),
            ms(g) / ms(f),
            ms(o),
            fps(f),
            fps(o),
            fps(o) / fps(f)
        );
    }
    Ok(ExitCode::SUCCESS)
}
