//! What every protocol service reads off an incoming call before handing
//! its frames to the pipeline: who is calling (trace context, client
//! connection) and until when the answer is wanted (`grpc-timeout`).

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::Request;

use super::conn::ConnInfo;
use crate::pipeline::{Caller, ClientId};
use crate::telemetry::{Rpc, Telemetry};

/// The caller of `request`, which came on `rpc`.
pub fn caller<T>(request: &Request<T>, rpc: Rpc, telemetry: &Telemetry) -> Caller {
    Caller {
        parent: telemetry.caller_context(request.metadata()),
        rpc,
        // Calls that did not come through our listeners (tests serving a
        // bare tonic router) share one client id.
        client: request
            .extensions()
            .get::<ConnInfo>()
            .map_or(ClientId::default(), |c| ClientId(c.id)),
    }
}

/// When `request`'s headers arrived at the server stack; now, for a call
/// that did not come through it.
pub fn arrived<T>(request: &Request<T>) -> Instant {
    request
        .extensions()
        .get::<super::stack::Arrived>()
        .map_or_else(Instant::now, |a| a.0)
}

/// The call's deadline, from its `grpc-timeout` header (the gRPC spec's
/// "TimeoutValue TimeoutUnit": at most 8 digits, then H, M, S, m, u or n).
/// An unreadable header is ignored, as if absent.
pub fn deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    received.checked_add(parse_timeout(value)?)
}

/// How much earlier than its deadline a unary call is answered
/// DEADLINE_EXCEEDED: tonic's own timer fires at the deadline itself and
/// would answer CANCELLED instead.
const AHEAD: Duration = Duration::from_millis(2);

/// When a unary call must be answered: the sooner of its `grpc-timeout`
/// and the server's `limit` (`--request-timeout-s`), a moment early.
pub fn unary_deadline(
    metadata: &MetadataMap,
    received: Instant,
    limit: Option<Duration>,
) -> Option<Instant> {
    let client = deadline(metadata, received);
    let server = limit.and_then(|l| received.checked_add(l));
    let sooner = match (client, server) {
        (Some(c), Some(s)) => Some(c.min(s)),
        (c, s) => c.or(s),
    }?;
    Some(sooner.checked_sub(AHEAD).unwrap_or(received))
}

/// Runs `work` until `deadline`; past it the call gets DEADLINE_EXCEEDED
/// and `work` is dropped (a frame not yet computed never will be).
pub async fn within<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, tonic::Status> {
    match deadline {
        None => Ok(work.await),
        Some(at) => tokio::time::timeout_at(at.into(), work).await.map_err(|_| {
            tonic::Status::deadline_exceeded(
                "the call's deadline passed before its frames were judged",
            )
        }),
    }
}

fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "10", "10x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_unary_deadline_is_the_sooner_of_client_and_server_a_moment_early() {
        let mut metadata = MetadataMap::new();
        let now = Instant::now();
        assert_eq!(unary_deadline(&metadata, now, None), None);
        let second = Duration::from_secs(1);
        assert_eq!(
            unary_deadline(&metadata, now, Some(second)),
            Some(now + second - AHEAD)
        );
        metadata.insert("grpc-timeout", "100m".parse().expect("ascii"));
        assert_eq!(
            unary_deadline(&metadata, now, Some(second)),
            Some(now + Duration::from_millis(100) - AHEAD)
        );
    }

    #[test]
    fn the_deadline_counts_from_when_the_call_was_received() {
        let mut metadata = MetadataMap::new();
        let now = Instant::now();
        assert_eq!(deadline(&metadata, now), None);
        metadata.insert("grpc-timeout", "100m".parse().expect("ascii"));
        assert_eq!(
            deadline(&metadata, now),
            Some(now + Duration::from_millis(100))
        );
    }
}
