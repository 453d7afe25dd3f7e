//! The wire protocols (`odin_v1`, and `kserve_v2` for KServe v2 / Open
//! Inference Protocol clients), each one edge module that converts between its
//! generated types and the core's own (`crate::domain`). Nothing behind
//! the edge sees a generated type.

pub mod codec;
pub mod kserve_v2;
pub mod odin_v1;
