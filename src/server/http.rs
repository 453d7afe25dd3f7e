//! Plain HTTP on its own port, for what cannot speak gRPC: Prometheus
//! scrapes (`GET /metrics`) and HTTP probes (`GET /healthz`: the process is
//! up; `GET /readyz`: it takes work). Served with axum, already in the tree
//! through tonic; anything else gets 404.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::Health;
use crate::telemetry::{exposition, Gauges, Metrics};

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Reads the instantaneous gauges at each scrape.
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    /// The readiness switch.
    pub health: Health,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "only /metrics, /healthz and /readyz are served here\n",
            )
        })
        .with_state(endpoints);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let text = exposition::render(&endpoints.metrics, (endpoints.gauges)());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn ready(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    if endpoints.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
