//! The wire protocols, each one edge module that converts between its
//! generated types and the core's own (`crate::domain`). Nothing behind
//! the edge sees a generated type.

pub mod codec;
pub mod odin_v1;
