//! Reliability of the serving edge (issue 10), against a real server on
//! loopback (in-process, or the real binary) with real clients: stream
//! semantics on malformed input, impossible input, the memory budget, field
//! caps, fair decoding, connection and HTTP/2 limits, deadlines, shutdown,
//! TLS, auth, Unix sockets, what GetModelInfo reveals, and property tests of
//! frame decoding.
//!
//! Tests that measure time or CPU take `harness::serial()`, so they never
//! share the machine's cores with each other.

// The helpers every integration test shares (HTTP probes, metrics, Detect
// streams, the binary's path), under the reliability harness.
#[path = "../common/mod.rs"]
mod common;
mod harness;

mod auth;
mod deadline;
mod fairness;
mod fields;
mod http2;
mod info;
mod input;
mod memory;
mod props;
mod shutdown;
mod stream;
mod tls;
mod uds;
