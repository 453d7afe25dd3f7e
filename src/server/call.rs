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

/// The call's deadline, from its `grpc-timeout` header (the gRPC spec's
/// "TimeoutValue TimeoutUnit": at most 8 digits, then H, M, S, m, u or n).
/// An unreadable header is ignored, as if absent.
pub fn deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    received.checked_add(parse_timeout(value)?)
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
