//! Pushes the metrics over OTLP/gRPC to the collector the spans go to, when
//! `--otlp` is on: the same registry `/metrics` renders, converted to OTLP
//! (cumulative sums, gauges and explicit-bucket histograms) every interval.
//!
//! The exporter is a plain tonic client of the official
//! `MetricsService`, not the OpenTelemetry metrics SDK: the registry already
//! aggregates, so all that is left is one message per interval.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::metrics::{Family, Kind, Value};
use super::{Gauges, Metrics};

/// Default push interval (`OTEL_METRIC_EXPORT_INTERVAL`, 60 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Longest one push may take (`OTEL_METRIC_EXPORT_TIMEOUT`, 30 s).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how often to push.
#[derive(Debug, Clone)]
pub struct Push {
    /// The collector's OTLP/gRPC endpoint (`http://host:4317`).
    pub endpoint: String,
    /// Time between pushes.
    pub interval: Duration,
    /// Resource attributes (service.name, ...).
    pub resource: Vec<(String, String)>,
}

/// Pushes `metrics` every interval until `gauges` returns `None`. A failed
/// push is logged at debug level and retried at the next tick: the values
/// are cumulative, so nothing is lost but resolution.
pub async fn run<G>(push: Push, metrics: Arc<Metrics>, gauges: G)
where
    G: Fn() -> Option<Gauges> + Send + 'static,
{
    let channel = match tonic::transport::Endpoint::from_shared(push.endpoint.clone()) {
        Ok(endpoint) => endpoint.timeout(TIMEOUT).connect_lazy(),
        Err(e) => {
            tracing::warn!(endpoint = %push.endpoint, error = %e, "bad OTLP metrics endpoint; not pushing metrics");
            return;
        }
    };
    let mut client = MetricsServiceClient::new(channel);
    let start = unix_nanos(SystemTime::now());
    let resource = Resource {
        attributes: push.resource.iter().map(|(k, v)| string_kv(k, v)).collect(),
        ..Resource::default()
    };
    let mut ticks = tokio::time::interval(push.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(gauges) = gauges() else { return };
        let request = request(&metrics.families(gauges), &resource, start);
        if let Err(status) = client.export(request).await {
            tracing::debug!(%status, "OTLP metrics push failed");
        }
    }
}

/// One export request of every family, cumulative since `start`.
pub fn request(
    families: &[Family],
    resource: &Resource,
    start: u64,
) -> ExportMetricsServiceRequest {
    let now = unix_nanos(SystemTime::now());
    let cumulative = AggregationTemporality::Cumulative as i32;
    let metrics = families
        .iter()
        .map(|family| {
            let numbers = || {
                family
                    .points
                    .iter()
                    .filter_map(|p| match &p.value {
                        Value::Int(v) => Some(NumberDataPoint {
                            attributes: attributes(&p.labels),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            value: Some(number_data_point::Value::AsInt(*v as i64)),
                            ..NumberDataPoint::default()
                        }),
                        Value::Histogram(_) => None,
                    })
                    .collect()
            };
            let data = match family.kind {
                Kind::Counter => metric::Data::Sum(Sum {
                    data_points: numbers(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Kind::Gauge => metric::Data::Gauge(Gauge {
                    data_points: numbers(),
                }),
                Kind::Histogram => metric::Data::Histogram(Histogram {
                    data_points: family
                        .points
                        .iter()
                        .filter_map(|p| match &p.value {
                            Value::Histogram(h) => Some(HistogramDataPoint {
                                attributes: attributes(&p.labels),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.buckets.clone(),
                                explicit_bounds: h.bounds.to_vec(),
                                ..HistogramDataPoint::default()
                            }),
                            Value::Int(_) => None,
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
            };
            Metric {
                name: family.name.to_string(),
                description: family.help.to_string(),
                unit: family.unit.to_string(),
                data: Some(data),
                ..Metric::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "odin-sidecar".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

fn attributes(labels: &[(&'static str, String)]) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| string_kv(k, v)).collect()
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..KeyValue::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Outcome, Rpc};

    #[test]
    fn every_family_becomes_one_otlp_metric() {
        let m = Metrics::default();
        m.frame(Rpc::Detect, Duration::from_millis(3), Outcome::Out, None);
        let families = m.families(Gauges::default());
        let request = request(&families, &Resource::default(), 1);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(metrics.len(), families.len());
        let rpc = metrics
            .iter()
            .find(|m| m.name == "rpc.server.duration")
            .expect("rpc.server.duration");
        assert_eq!(rpc.unit, "s");
        let Some(metric::Data::Histogram(h)) = &rpc.data else {
            panic!("histogram")
        };
        assert_eq!(h.data_points[0].count, 1);
        assert_eq!(
            h.data_points[0].bucket_counts.len(),
            h.data_points[0].explicit_bounds.len() + 1
        );
    }
}
