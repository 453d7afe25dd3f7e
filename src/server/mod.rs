//! The network surface: the gRPC services (`odin.v1.Detector`, KServe v2's
//! `inference.GRPCInferenceService`, health, reflection) behind one layered
//! stack, and the plain-HTTP endpoints for
//! scrapers and probes that cannot speak gRPC. `crate::app` binds the
//! listeners and runs them.

pub mod authority;
pub mod call;
pub mod conn;
pub mod detector;
pub mod health;
pub mod http;
pub mod inference;
pub mod receive;
pub mod stack;
pub mod tls;

pub use detector::DetectorService;
pub use health::Health;
pub use inference::InferenceService;
