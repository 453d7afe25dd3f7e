//! The gRPC surface: the `odin.v1.Detector` service plus the standard health
//! and reflection services, assembled into one tonic router.

pub mod detector;

pub use detector::DetectorService;
