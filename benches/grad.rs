//! Benchmark (not a test): one run of the derived ODIN graph G against one
//! run of the plain ResNet-20, at batch 1, 8, 32 and 128, in one process
//! with the same ONNX Runtime settings, runs interleaved so both see the
//! same machine load. Prints the medians as a Markdown table.
//!
//! `cargo bench --bench grad` (intra-op thread counts: `ODIN_BENCH_THREADS`,
//! a comma list, default `1,2`; model: `ODIN_BENCH_MODEL`, default
//! ResNet-20 from the shared data; `ODIN_BENCH_SPIN=0` turns off ONNX
//! Runtime's spinning worker threads).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use odin_sidecar::grad::{derive, GradOptions};
use ort::session::Session;
use ort::value::Tensor;

fn session(bytes: &[u8], threads: usize) -> Session {
    let options = odin_sidecar::runtime::SessionOptions {
        intra_threads: threads,
        spinning: spinning(),
        ..Default::default()
    };
    odin_sidecar::runtime::session(bytes, &options).expect("session (run scripts/setup.sh)")
}

/// `ODIN_BENCH_SPIN=0` turns off ONNX Runtime's busy-waiting worker
/// threads (on a shared machine a spinning thread competes for the CPU).
fn spinning() -> bool {
    std::env::var("ODIN_BENCH_SPIN")
        .map(|v| v != "0")
        .unwrap_or(true)
}

fn time_once(s: &mut Session, x: &[f32], batch: usize, odin: bool) -> Duration {
    let shape = vec![batch as i64, 3, 32, 32];
    let t = Tensor::from_array((shape, x.to_vec())).expect("tensor");
    let start = Instant::now();
    if odin {
        let scalar = |v: f32| Tensor::from_array((Vec::<i64>::new(), vec![v])).expect("scalar");
        let out = s.run(ort::inputs!["input" => t, "temperature" => scalar(1000.0), "epsilon" => scalar(0.0014)]);
        drop(out.expect("run G"));
    } else {
        drop(s.run(ort::inputs!["input" => t]).expect("run model"));
    }
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let thread_counts: Vec<usize> = std::env::var("ODIN_BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|s| s.trim().parse().expect("ODIN_BENCH_THREADS: numbers"))
        .collect();
    let path = std::env::var("ODIN_BENCH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| common::data_dir().join("models/resnet20_cifar10.onnx"));
    let plain = std::fs::read(&path).expect("model file");
    let g = derive(
        &plain,
        &GradOptions {
            std: common::STD.to_vec(),
            raw_gradient: false,
            ..Default::default()
        },
    )
    .expect("derive");
    let pixels =
        std::fs::read(common::data_dir().join("cifar10_test.u8")).expect("cifar10_test.u8");
    for threads in thread_counts {
        table(&plain, &g.bytes, &pixels, threads, &path);
    }
}

fn table(plain: &[u8], g: &[u8], pixels: &[u8], threads: usize, path: &std::path::Path) {
    let mut fs = session(plain, threads);
    let mut gs = session(g, threads);
    println!();
    println!(
        "model {}, ONNX Runtime CPU, {threads} intra-op thread(s), spinning {}, median of interleaved runs",
        path.display(),
        if spinning() { "on" } else { "off" }
    );
    println!();
    println!("| batch | forward (ms) | G (ms) | G / forward | runs |");
    println!("|---:|---:|---:|---:|---:|");
    for batch in [1usize, 8, 32, 128] {
        let x =
            common::normalize_batch(&pixels[..batch * 3072], batch, &common::MEAN, &common::STD);
        for _ in 0..3 {
            time_once(&mut fs, &x, batch, false);
            time_once(&mut gs, &x, batch, true);
        }
        let runs = (400 / batch).clamp(9, 101);
        let (mut tf, mut tg) = (vec![], vec![]);
        for _ in 0..runs {
            tf.push(time_once(&mut fs, &x, batch, false));
            tg.push(time_once(&mut gs, &x, batch, true));
        }
        let (mf, mg) = (median(tf), median(tg));
        println!("| {batch} | {mf:.2} | {mg:.2} | {:.2} | {runs} |", mg / mf);
    }
}
