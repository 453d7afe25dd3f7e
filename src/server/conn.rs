//! Connections, before HTTP/2 sees them: accepting (backing off when accept
//! fails, e.g. out of file descriptors, instead of spinning), a limit on
//! open connections past which a new one is closed at once, TLS handshakes
//! off the accept loop with a deadline, and closing connections that stay
//! idle (no open call) or never start a call.
//!
//! Each connection carries a [`ConnInfo`] that tonic puts into every
//! request's extensions: its id (the client, for fair decoding) and the
//! count of calls open on it, kept by the stack's `CallTracker` layer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;

use super::authority::AuthorityFix;
use super::tls::TlsAcceptors;
use crate::telemetry::Metrics;

/// Connection limits and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnOptions {
    /// Open connections beyond which a new one is closed at once.
    pub max_connections: usize,
    /// A connection with no open call is closed after this long.
    pub idle_timeout: Duration,
    /// A new connection must finish its TLS handshake and open its first
    /// call within this time.
    pub handshake_timeout: Duration,
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket.
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Transport, Option<SocketAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, remote) = l.accept().await?;
                // Frames are latency-bound messages, not bulk data.
                let _ = stream.set_nodelay(true);
                Ok((Transport::Tcp(stream), Some(remote)))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Transport::Unix(AuthorityFix::new(stream)), None))
            }
        }
    }
}

/// Who a connection is, and how busy: put into every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Unique per connection in this process.
    pub id: u64,
    /// The peer's address (TCP only).
    pub remote: Option<SocketAddr>,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// Counts a call as open on this connection until the guard is dropped.
    pub fn call(&self) -> CallGuard {
        self.activity.open.fetch_add(1, Ordering::AcqRel);
        self.activity.called.store(1, Ordering::Release);
        CallGuard(Arc::clone(&self.activity))
    }
}

#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    // 1 once a call was opened: before that the handshake timeout applies.
    called: AtomicU64,
    // Nanoseconds after `epoch` at which the last call closed.
    idle_since: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }
}

/// An open call; see [`ConnInfo::call`].
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let since = u64::try_from(a.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since.store(since, Ordering::Release);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The byte stream under one connection.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A Unix domain socket, whose clients' `:authority` is made valid.
    Unix(AuthorityFix<UnixStream>),
}

/// One accepted connection: its transport, its slot under the connection
/// limit, and its idle timer.
#[derive(Debug)]
pub struct Conn {
    transport: Transport,
    info: ConnInfo,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    _slot: Slot,
}

/// A place under the connection limit, also counted in the metrics.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections on every listener until the returned stream is
/// dropped (tonic drops it when it stops serving, which closes the
/// listeners). The connection limit and the ids are shared; TLS, when
/// given, applies to TCP listeners only.
pub fn incoming(
    listeners: Vec<Listener>,
    options: ConnOptions,
    tls: Option<TlsAcceptors>,
    metrics: Arc<Metrics>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(options.max_connections.max(1))),
        ids: AtomicU64::new(1),
    });
    for listener in listeners {
        let tls = match listener {
            Listener::Tcp(_) => tls.clone(),
            Listener::Unix(_) => None,
        };
        tokio::spawn(accept_loop(
            listener,
            options,
            tls,
            Arc::clone(&metrics),
            Arc::clone(&shared),
            tx.clone(),
        ));
    }
    ReceiverStream::new(rx)
}

/// What the accept loops of one server share.
#[derive(Debug)]
struct Shared {
    slots: Arc<Semaphore>,
    ids: AtomicU64,
}

async fn accept_loop(
    listener: Listener,
    options: ConnOptions,
    tls: Option<TlsAcceptors>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    ready: mpsc::Sender<io::Result<Conn>>,
) {
    let (slots, ids) = (&shared.slots, &shared.ids);
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = ready.closed() => return,
        };
        let (transport, remote) = match accepted {
            Ok(accepted) => {
                backoff = MIN_BACKOFF;
                accepted
            }
            Err(e) => {
                // EMFILE and the like: retrying at once would spin a core
                // and starve the connections already open.
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?remote,
                "connection limit reached; closing a new connection"
            );
            drop(transport);
            continue;
        };
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            _permit: permit,
            metrics: Arc::clone(&metrics),
        };
        let info = ConnInfo {
            id: ids.fetch_add(1, Ordering::Relaxed),
            remote,
            activity: Arc::new(Activity {
                open: AtomicUsize::new(0),
                called: AtomicU64::new(0),
                idle_since: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        };
        let tls = tls.clone();
        let ready = ready.clone();
        // The handshake runs off the accept loop: a slow client must not
        // hold up everyone else's connections.
        tokio::spawn(async move {
            let transport = match (tls, transport) {
                (Some(tls), Transport::Tcp(tcp)) => {
                    let handshake = tls.current().accept(tcp);
                    match tokio::time::timeout(options.handshake_timeout, handshake).await {
                        Ok(Ok(stream)) => Transport::Tls(Box::new(stream)),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, ?remote, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(?remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                (_, transport) => transport,
            };
            let timer = Box::pin(tokio::time::sleep(options.handshake_timeout));
            let conn = Conn {
                transport,
                info,
                idle_timeout: options.idle_timeout,
                handshake_timeout: options.handshake_timeout,
                timer,
                _slot: slot,
            };
            let _ = ready.send(Ok(conn)).await;
        });
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Conn {
    /// Whether the connection has been without a call for too long. Arms
    /// the timer (so the task is woken when it runs out) while idle.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let activity = &self.info.activity;
        if activity.open.load(Ordering::Acquire) > 0 {
            return false;
        }
        let timeout = if activity.called.load(Ordering::Acquire) == 0 {
            self.handshake_timeout
        } else {
            self.idle_timeout
        };
        let deadline = tokio::time::Instant::from_std(activity.idle_since() + timeout);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idle_expired(cx) {
            // End of stream: hyper closes the connection.
            tracing::debug!(id = self.info.id, "closing an idle connection");
            return Poll::Ready(Ok(()));
        }
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The last call may have just closed: start the idle clock now.
        let _ = self.idle_expired(cx);
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
