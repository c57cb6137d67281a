//! The listener's limits, against the order service on 127.0.0.1 and raw sockets; the
//! log lines are read back from a process-wide subscriber, each test by its listener's
//! name.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::{ConnStats, Limits};
use crate::service_tests::{fixture, serve_public};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The warn lines of `listener`, from the subscriber installed on first use.
fn warnings(listener: &str) -> Vec<String> {
    static LOGS: OnceLock<Buffer> = OnceLock::new();
    let logs = LOGS.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buffer
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let tag = format!("listener=\"{listener}\"");
    text.lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_string)
        .collect()
}

fn n(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Waits (polling) until `cond` holds; fails after 20 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads until the server closes the socket; returns what it sent first.
async fn closed_by_server(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("the server never closed the socket")
        .expect("a clean close, not a reset");
    got
}

fn counts(s: &ConnStats) -> [u64; 5] {
    [
        n(&s.accepted),
        n(&s.header_timeouts),
        n(&s.keep_alive_timeouts),
        n(&s.idle_closed),
        n(&s.open),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_the_limit_wait_are_timed_out_and_a_new_client_gets_in() {
    let _ = warnings("");
    let f = fixture().await;
    let svc = f.service(vec![f.providers.secrets.webhook_secret.clone()]);
    let limits = Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
    };
    let (base, stats) = serve_public(svc, "t-limit", limits).await;
    let addr = base.trim_start_matches("http://").to_string();

    // Three sockets that never send a byte: two take the slots, one waits.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    until("two are accepted and the limit is hit", || {
        n(&stats.accepted) == 2 && n(&stats.limit_reached) >= 1
    })
    .await;

    // A real client behind them gets its answer once the idle ones are timed out.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "{base}/orders/01a211da-b34b-7c63-a822-20fc30493cca"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        n(&stats.header_timeouts) >= 2,
        "it got a slot only after two idle sockets were closed"
    );
    for s in &mut idle {
        assert_eq!(closed_by_server(s).await, b"", "closed without an answer");
    }
    until("the client's connection is closed", || n(&stats.open) == 0).await;
    // accepted, header timeouts, keep-alive timeouts, idle closes, open
    assert_eq!(counts(&stats), [4, 3, 0, 0, 0]);

    let lines = warnings("t-limit");
    let limit: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("connection limit reached: new connections wait until one closes"))
        .collect();
    assert_eq!(limit.len(), 1, "throttled to one line: {lines:#?}");
    assert!(
        limit[0].contains(" WARN ") && limit[0].contains("max_connections=2 times=1"),
        "{}",
        limit[0]
    );
    let timeouts: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("closed a connection that sent no complete request head in time"))
        .collect();
    assert_eq!(timeouts.len(), 1, "throttled to one line: {lines:#?}");
    // The two idle sockets time out together: the line counts the first alone, or both
    // when the second closed before the line was written (a loaded machine).
    assert!(
        timeouts[0].contains("header_read_timeout=300ms times=1")
            || timeouts[0].contains("header_read_timeout=300ms times=2"),
        "{}",
        timeouts[0]
    );
    assert_eq!(lines.len(), 2, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_hits_the_idle_timeout_and_trickled_headers_the_header_timeout() {
    let _ = warnings("");
    let f = fixture().await;
    let svc = f.service(vec![f.providers.secrets.webhook_secret.clone()]);
    let limits = Limits {
        max_connections: 8,
        header_read_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(300),
    };
    let (base, stats) = serve_public(svc, "t-idle", limits).await;
    let addr = base.trim_start_matches("http://").to_string();

    // Complete headers, then 10 of the 100 body bytes announced, then nothing.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              idempotency-key: k\r\ncontent-length: 100\r\n\r\n{\"customer",
        )
        .await
        .unwrap();
    assert_eq!(closed_by_server(&mut stalled).await, b"");
    assert_eq!(counts(&stats), [1, 0, 0, 1, 0]);

    // Headers one byte every 50 ms: never idle for 300 ms, but never complete in 800.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = trickle.split();
    let head = b"GET /orders/01a211da-b34b-7c63-a822-20fc30493cca HTTP/1.1\r\nhost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let send = async {
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the whole head was sent: the header timeout never fired");
    };
    let mut got = Vec::new();
    tokio::select! {
        read = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got)) => {
            read.expect("the server never closed the socket").unwrap();
        }
        () = send => {}
    }
    assert_eq!(got, b"", "closed without an answer");
    until("the connection is counted", || n(&stats.open) == 0).await;
    assert_eq!(counts(&stats), [2, 1, 0, 1, 0]);

    let lines = warnings("t-idle");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains("closed a connection on which nothing moved for the idle timeout")
            && lines[0].contains("idle_timeout=300ms times=1"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("closed a connection that sent no complete request head in time")
            && lines[1].contains("header_read_timeout=800ms times=1"),
        "{lines:#?}"
    );
}

#[test]
fn limits_that_cannot_work_are_refused() {
    let ok = Limits::default();
    assert_eq!(ok.max_connections, 512);
    assert!(ok.check().is_ok());
    for bad in [
        Limits {
            max_connections: 0,
            ..ok
        },
        Limits {
            max_connections: 1_000_001,
            ..ok
        },
        Limits {
            header_read_timeout: Duration::ZERO,
            ..ok
        },
        Limits {
            idle_timeout: Duration::ZERO,
            ..ok
        },
    ] {
        assert_eq!(
            bad.check().unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput,
            "{bad:?}"
        );
    }
}
