//! ONNX Runtime at the bottom of the stack: finding and loading the shared
//! library, the process-wide environment, and the one session builder every
//! part of the crate uses (the engine, the gradient pass's probe run, the
//! `export-grad` check, tests and benchmarks).
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time
//! (its CDN is unreachable behind many firewalls). The library comes from the
//! pinned PyPI wheel `onnxruntime==1.32.0`, which `scripts/setup.sh` unpacks
//! into `.cache/onnxruntime/`. The library is checked to exist before `ort`
//! sees it, so a missing library is an error that names the fix, not a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep;
use ort::session::{builder::GraphOptimizationLevel, Session};

/// Environment variable naming the library file explicitly.
pub const ENV_DYLIB_PATH: &str = "ORT_DYLIB_PATH";
/// The library file name inside the pinned wheel.
pub const LIBRARY_FILE: &str = "libonnxruntime.so.1.32.0";
/// The project-local cache that `scripts/setup.sh` fills.
pub const PROJECT_CACHE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/onnxruntime");

/// Why ONNX Runtime could not be made ready.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` names a file that is not there.
    #[error("{ENV_DYLIB_PATH} is set to {0}, which does not exist")]
    EnvPathMissing(PathBuf),
    /// No library anywhere it was looked for.
    #[error(
        "ONNX Runtime library not found (looked at ${ENV_DYLIB_PATH}, {PROJECT_CACHE}, beside the executable, \
         and a Python `onnxruntime` install). Fix: run `scripts/setup.sh` (downloads the pinned onnxruntime==1.32.0 \
         wheel with pip and unpacks {LIBRARY_FILE}), or set {ENV_DYLIB_PATH}=/path/to/libonnxruntime.so"
    )]
    NotFound,
    /// The library was found but `ort` could not load or initialize it.
    #[error("cannot load ONNX Runtime from {path}: {detail}")]
    Load {
        /// The library file.
        path: PathBuf,
        /// What ort reported.
        detail: String,
    },
    /// ONNX Runtime refused to build a session (bad model, or an execution
    /// provider that cannot be registered).
    #[error("ONNX Runtime: {0}")]
    Session(String),
}

/// Where the library was found and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The library file.
    pub path: PathBuf,
    /// Which lookup rule found it, for the start-up log.
    pub via: &'static str,
}

/// Looks for the library: `ORT_DYLIB_PATH`, the project cache, beside the
/// executable, then a Python `onnxruntime` install.
pub fn locate() -> Result<Located, RuntimeError> {
    locate_from(std::env::var_os(ENV_DYLIB_PATH))
}

/// `locate` with the value of `ORT_DYLIB_PATH` passed in, so tests need not
/// touch the process environment.
fn locate_from(env_path: Option<std::ffi::OsString>) -> Result<Located, RuntimeError> {
    if let Some(path) = env_path.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(Located {
                path,
                via: ENV_DYLIB_PATH,
            })
        } else {
            Err(RuntimeError::EnvPathMissing(path))
        };
    }
    let found = |dir: &Path, via| find_in(dir).map(|path| Located { path, via });
    if let Some(hit) = found(Path::new(PROJECT_CACHE), "project cache") {
        return Ok(hit);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        if let Some(hit) = found(&dir, "beside the executable") {
            return Ok(hit);
        }
    }
    if let Some(dir) = python_onnxruntime_capi() {
        if let Some(hit) = found(&dir, "python onnxruntime") {
            return Ok(hit);
        }
    }
    Err(RuntimeError::NotFound)
}

/// `libonnxruntime.so.1.32.0`, else any `libonnxruntime.so*`, in `dir`.
fn find_in(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join(LIBRARY_FILE);
    if exact.is_file() {
        return Some(exact);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

/// `…/site-packages/onnxruntime/capi` of the first Python that imports it.
fn python_onnxruntime_capi() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(dir.trim()).join("capi"))
}

/// The process-wide ONNX Runtime environment, loaded once.
///
/// Loading twice in one process is not possible (the library stays mapped),
/// so every engine and test shares this one.
pub fn environment() -> Result<&'static Environment, RuntimeError> {
    static ENV: OnceLock<Result<Environment, RuntimeError>> = OnceLock::new();
    ENV.get_or_init(|| {
        let located = locate()?;
        let load_error = |detail: String| RuntimeError::Load {
            path: located.path.clone(),
            detail,
        };
        let env = ort::init_from(&located.path)
            .map_err(|e| load_error(e.to_string()))?
            .with_name("odin-sidecar")
            .with_telemetry(false)
            .build()
            .map_err(|e| load_error(e.to_string()))?;
        tracing::info!(path = %located.path.display(), via = located.via, "loaded ONNX Runtime");
        Ok(env)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// How to build one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Intra-op threads (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
    /// Whether ONNX Runtime optimizes the graph. Serving wants it; a probe
    /// run that reads intermediate tensors must see the graph as written.
    pub optimize: bool,
    /// Whether idle intra-op threads busy-wait (ONNX Runtime's default). On a
    /// shared machine a spinning thread competes with everything else.
    pub spinning: bool,
    /// Register the CUDA execution provider on this device; failing to
    /// register it is an error.
    pub cuda: Option<i32>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            intra_threads: 1,
            optimize: true,
            spinning: true,
            cuda: None,
        }
    }
}

/// Builds a session for the ONNX model `onnx` on the shared environment.
pub fn session(onnx: &[u8], options: &SessionOptions) -> Result<Session, RuntimeError> {
    let env = environment()?;
    fn failed(e: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Session(e.to_string())
    }
    let level = if options.optimize {
        GraphOptimizationLevel::Level3
    } else {
        GraphOptimizationLevel::Disable
    };
    let mut builder = Session::builder(env)
        .map_err(failed)?
        .with_optimization_level(level)
        .map_err(failed)?;
    if options.intra_threads > 0 {
        builder = builder
            .with_intra_threads(options.intra_threads)
            .map_err(failed)?;
    }
    if !options.spinning {
        builder = builder.with_intra_op_spinning(false).map_err(failed)?;
    }
    if let Some(device) = options.cuda {
        let cuda = ep::CUDA::default()
            .with_device_id(device)
            .build()
            .error_on_failure();
        builder = builder.with_execution_providers([cuda]).map_err(failed)?;
    }
    builder.commit_from_memory(onnx).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_path_wins_and_must_exist() {
        let missing = locate_from(Some("/nonexistent/libonnxruntime.so".into())).unwrap_err();
        assert!(matches!(missing, RuntimeError::EnvPathMissing(_)));
        assert!(missing.to_string().contains("ORT_DYLIB_PATH"));
        let this_file = PathBuf::from(file!()).canonicalize().or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(file!())
                .canonicalize()
        });
        let this_file = this_file.expect("source file exists");
        let found =
            locate_from(Some(this_file.clone().into())).expect("an existing file is taken as is");
        assert_eq!(
            found,
            Located {
                path: this_file,
                via: ENV_DYLIB_PATH
            }
        );
    }

    #[test]
    fn a_directory_yields_the_pinned_library_or_any_version() {
        let dir = std::env::temp_dir().join(format!("odin-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        assert_eq!(find_in(&dir), None);
        std::fs::write(dir.join("libonnxruntime.so.1.30.0"), b"").expect("write");
        assert_eq!(find_in(&dir), Some(dir.join("libonnxruntime.so.1.30.0")));
        std::fs::write(dir.join(LIBRARY_FILE), b"").expect("write");
        assert_eq!(find_in(&dir), Some(dir.join(LIBRARY_FILE)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn not_found_names_the_fix() {
        let message = RuntimeError::NotFound.to_string();
        assert!(
            message.contains("scripts/setup.sh") && message.contains("ORT_DYLIB_PATH"),
            "{message}"
        );
    }
}
