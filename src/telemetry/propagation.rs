//! W3C trace context in and out: the caller's `traceparent`/`tracestate`
//! from gRPC metadata, or a frame's own fields, for long-lived streams whose
//! frames belong to different traces.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The caller's trace context from gRPC metadata; empty when absent.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// A frame's own trace context from its `traceparent`/`tracestate` fields.
pub fn from_fields(traceparent: &str, tracestate: &str) -> Context {
    TraceContextPropagator::new().extract(&FrameExtractor {
        traceparent,
        tracestate,
    })
}

/// Reads `traceparent`/`tracestate` from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Reads a frame's own `traceparent`/`tracestate` fields.
struct FrameExtractor<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for FrameExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    #[test]
    fn a_frame_traceparent_is_extracted() {
        let cx = from_fields(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        );
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
    }

    #[test]
    fn metadata_without_a_traceparent_gives_an_empty_context() {
        let cx = from_metadata(&tonic::metadata::MetadataMap::new());
        assert!(!cx.span().span_context().is_valid());
    }
}
