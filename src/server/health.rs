//! Whether the sidecar takes work: one switch that both the gRPC health
//! service (`grpc.health.v1`, for Kubernetes gRPC probes and load
//! balancers), KServe's `ServerReady`/`ModelReady` and the plain-HTTP
//! `/readyz` report, so they never disagree.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// The gRPC service names whose status is reported; "" is the whole server.
const SERVICES: [&str; 3] = ["", "odin.v1.Detector", "inference.GRPCInferenceService"];

/// The readiness switch. Cheap to clone. `/readyz` says not ready until
/// [`Health::serving`] is called; the gRPC service only starts listening
/// after that, so it never answers SERVING early.
#[derive(Debug, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    reporter: HealthReporter,
}

impl Health {
    /// A switch, and the gRPC health service that reports it.
    pub fn new() -> (Health, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let health = Health {
            ready: Arc::new(AtomicBool::new(false)),
            reporter,
        };
        (health, service)
    }

    /// Whether new work is taken.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Takes work: the model is loaded and warmed up.
    pub async fn serving(&self) {
        self.set(true).await;
    }

    /// Stops taking work: shutting down (load balancers move away first).
    pub async fn not_serving(&self) {
        self.set(false).await;
    }

    async fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

#[cfg(test)]
mod tests;
