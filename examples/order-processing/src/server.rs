//! The HTTP/1 front of the service: an accept loop with a connection limit, a
//! header-read timeout and an idle timeout, each logged (at warn) when it is hit.
//!
//! - **Connection limit.** At most `max_connections` connections are open at once; past
//!   that, new connections wait in the kernel's accept queue until one closes, instead
//!   of taking descriptors until `accept` fails with "too many open files". Keep it below
//!   the descriptor limit (`ulimit -n`) minus what the engine and the outgoing calls use.
//! - **Header-read timeout.** A connection has `header_read_timeout` to send a complete
//!   request head, counted from when the server starts waiting for one: right after the
//!   connection is accepted, and after each response on a kept-alive connection. So an
//!   idle socket, or one trickling its headers, holds its slot that long at most.
//! - **Idle timeout.** A connection on which no byte moves in either direction for
//!   `idle_timeout` is closed, whatever it is doing: a body that stops arriving, a
//!   client that stops reading its response.
//!
//! Under a flood the warn lines are throttled to one per kind every 10 s, each with the
//! running count; [`ConnStats`] has the exact counts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// The limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, at most.
    pub max_connections: usize,
    /// Time a connection has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Time without a byte in either direction after which a connection is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// 512 connections (half the usual 1,024-descriptor limit), 10 s to send the
    /// headers, 60 s idle.
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Checks that the limits make sense.
    ///
    /// # Errors
    ///
    /// An `InvalidInput` error if a limit is 0 or the connection limit is above 1,000,000.
    pub fn check(&self) -> io::Result<()> {
        let bad = |m: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, m.to_string()));
        if !(1..=1_000_000).contains(&self.max_connections) {
            return bad("the connection limit must be 1 to 1000000");
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return bad("the header-read and idle timeouts must be more than 0");
        }
        Ok(())
    }
}

/// What a listener's connections did, counted since it started.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Times the accept loop found every slot taken and had to wait for one.
    pub limit_reached: AtomicU64,
    /// Connections closed because they sent no complete request head in time.
    pub header_timeouts: AtomicU64,
    /// Kept-alive connections closed because no next request came in time (normal for
    /// pooling clients; logged at debug only).
    pub keep_alive_timeouts: AtomicU64,
    /// Connections closed because no byte moved for the idle timeout.
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// At most one log line per kind every 10 s.
#[derive(Debug)]
struct Throttle {
    last_ms: AtomicU64,
}

impl Throttle {
    const NEVER: u64 = u64::MAX;
    const EVERY_MS: u64 = 10_000;

    fn new() -> Self {
        Throttle {
            last_ms: AtomicU64::new(Self::NEVER),
        }
    }

    fn ready(&self, now_ms: u64) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != Self::NEVER && now_ms.saturating_sub(last) < Self::EVERY_MS {
            return false;
        }
        self.last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[derive(Debug)]
struct Shared {
    name: &'static str,
    limits: Limits,
    stats: Arc<ConnStats>,
    epoch: Instant,
    limit_log: Throttle,
    header_log: Throttle,
    idle_log: Throttle,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes, then stops
/// accepting, lets each open connection finish the request it is on (10 s at most),
/// and returns. `name` goes into the log lines (`public`, `admin`).
///
/// # Errors
///
/// If the limits do not pass [`Limits::check`].
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stats: Arc<ConnStats>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    limits.check()?;
    let shared = Arc::new(Shared {
        name,
        limits,
        stats,
        epoch: Instant::now(),
        limit_log: Throttle::new(),
        header_log: Throttle::new(),
        idle_log: Throttle::new(),
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let n = shared.stats.limit_reached.fetch_add(1, Ordering::Relaxed) + 1;
                if shared.limit_log.ready(shared.now_ms()) {
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        times = n,
                        "connection limit reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // the semaphore is never closed
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                // The client gave up before we accepted: nothing to do.
                Err(e) if is_connection_error(&e) => continue,
                // Out of descriptors or memory: wait instead of spinning.
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(
            shared.clone(),
            http.clone(),
            app.clone(),
            stream,
            peer,
            permit,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            open = ConnStats::get(&shared.stats.open),
            "connections still busy 10 s after shutdown began; leaving them"
        );
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    shared: Arc<Shared>,
    http: http1::Builder,
    app: Router,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _permit = permit;
    let stats = shared.stats.clone();
    stats.open.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let last = Arc::new(AtomicU64::new(shared.now_ms()));
    let requests = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked {
        inner: stream,
        last: last.clone(),
        epoch: shared.epoch,
    });
    let svc = {
        let requests = requests.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            requests.fetch_add(1, Ordering::Relaxed);
            app.clone().oneshot(req.map(axum::body::Body::new))
        })
    };
    let conn = http.serve_connection(io, svc);
    tokio::pin!(conn);
    let idle = shared.limits.idle_timeout;
    let mut draining = false;
    let ended = loop {
        let idle_at = shared.epoch + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            biased;
            r = conn.as_mut() => break Some(r),
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_at.into()) => {
                let quiet = shared.now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= u64::try_from(idle.as_millis()).unwrap_or(u64::MAX) {
                    break None;
                }
            }
        }
    };
    match ended {
        // Dropping the connection closes the socket.
        None => {
            let n = stats.idle_closed.fetch_add(1, Ordering::Relaxed) + 1;
            if shared.idle_log.ready(shared.now_ms()) {
                tracing::warn!(
                    listener = shared.name,
                    %peer,
                    idle_timeout = ?idle,
                    times = n,
                    "closed a connection on which nothing moved for the idle timeout"
                );
            }
        }
        Some(Err(e)) if e.is_timeout() => {
            if requests.load(Ordering::Relaxed) == 0 {
                let n = stats.header_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                if shared.header_log.ready(shared.now_ms()) {
                    tracing::warn!(
                        listener = shared.name,
                        %peer,
                        header_read_timeout = ?shared.limits.header_read_timeout,
                        times = n,
                        "closed a connection that sent no complete request head in time"
                    );
                }
            } else {
                stats.keep_alive_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = shared.name, %peer, "kept-alive connection closed: no next request in time");
            }
        }
        Some(Err(e)) => {
            tracing::debug!(listener = shared.name, %peer, error = %e, "connection ended with an error")
        }
        Some(Ok(())) => {}
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// A socket that notes when a byte last moved, for the idle timeout.
#[derive(Debug)]
struct Tracked {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Tracked {
    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The soft limit on open descriptors of this process (Linux), if it can be read.
pub fn descriptor_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
