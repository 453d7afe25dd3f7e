//! The real data (`../shared/data`, or `$ODIN_DATA`) and what a test does
//! without it.
//!
//! A test that needs a data file asks for it with `require!`: when the data
//! directory is absent (a fresh clone without `../shared`), the test prints
//! one `SKIP` line, records it under `$ODIN_SKIP_LOG` (one file per test;
//! `scripts/test.sh` collects them) and returns. When the directory exists
//! but the file does not, the test fails: data that is there but incomplete
//! must not pass as a skip.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use odin_sidecar::config::ServeConfig;
use odin_sidecar::dataset::RawSet;
use odin_sidecar::model::ModelSource;

/// `require!("file")` gives the path of a data file, or returns from the
/// test (a recorded skip) when there is no data directory;
/// `require!(expr)` does the same with a helper's `Option` (`resnet20()`,
/// `cifar10_test()`, ...).
macro_rules! require {
    ($file:literal) => {
        match $crate::common::data::require($file) {
            Some(path) => path,
            None => return,
        }
    };
    ($data:expr) => {
        match $data {
            Some(data) => data,
            None => return,
        }
    };
}

/// `../shared/data` beside the checkout, or `$ODIN_DATA`.
pub fn data_dir() -> PathBuf {
    odin_sidecar::dataset::shared_data_dir()
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The data file `file` (relative to the data directory); `None`, after
/// recording the skip, when there is no data directory. Panics when the
/// directory exists but lacks the file.
pub fn require(file: &str) -> Option<PathBuf> {
    let dir = data_dir();
    if !dir.is_dir() {
        skip(&dir, file);
        return None;
    }
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing, but the data directory {} exists: a test does not skip when the data is \
         there but incomplete",
        path.display(),
        dir.display()
    );
    Some(path)
}

thread_local! {
    // libtest runs each test on its own thread: one skip line per test, even
    // when it asks for several files.
    static SKIPPED: Cell<bool> = const { Cell::new(false) };
}

/// Prints `SKIP <test binary>::<test>: no data at <dir> (needs <file>)` on
/// stderr and writes the same line to a file of its own under
/// `$ODIN_SKIP_LOG`, when set.
fn skip(dir: &Path, file: &str) {
    if SKIPPED.with(|s| s.replace(true)) {
        return;
    }
    let thread = std::thread::current();
    // libtest names the thread after the test.
    let test = thread.name().unwrap_or("unnamed");
    let name = format!("{}::{test}", env!("CARGO_CRATE_NAME"));
    let line = format!("SKIP {name}: no data at {} (needs {file})", dir.display());
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("ODIN_SKIP_LOG").filter(|v| !v.is_empty()) {
        let log = PathBuf::from(log);
        std::fs::create_dir_all(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let file_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let path = log.join(file_name);
        std::fs::write(&path, format!("{line}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// Serving config for the real ResNet-20 from the data directory, on CPU.
pub fn resnet20() -> Option<ServeConfig> {
    let model = require("models/resnet20_cifar10.onnx")?;
    let mut config = ServeConfig {
        model: ModelSource::File {
            model,
            card: Some(repo_dir().join("models/resnet20_cifar10.card.json")),
        },
        ..ServeConfig::default()
    };
    config.engine.device = odin_sidecar::engine::Device::Cpu;
    config.engine.intra_threads = 1;
    Some(config)
}

/// The CIFAR-10 test set (10,000 JPEG-degraded images, labelled).
pub fn cifar10_test() -> Option<RawSet> {
    let path = require("cifar10_test.u8")?;
    Some(RawSet::open(&path).expect("cifar10_test.u8 readable"))
}

/// TinyImageNet crops (out-of-distribution for CIFAR-10).
pub fn tin_crop() -> Option<RawSet> {
    let path = require("tin_crop.u8")?;
    Some(RawSet::open(&path).expect("tin_crop.u8 readable"))
}
