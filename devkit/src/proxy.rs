//! A TCP proxy for fault injection: it can silently cut a link (while cut it
//! neither forwards nor closes anything, so both ends see a hung connection
//! and no RST, as in a network partition), slow it down to a number of
//! bytes per second in each direction (a congested or long-distance link),
//! delay everything it forwards by a fixed time (a distant link), and close
//! every connection at once, dropping what it holds (a server that died).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy from a local port to `upstream`.
pub struct Proxy {
    port: u16,
    open: Arc<watch::Sender<bool>>,
    /// Bytes per second in each direction; 0 means unlimited.
    rate: Arc<AtomicU64>,
    /// Microseconds every chunk is held before it is forwarded.
    delay: Arc<AtomicU64>,
    /// Bumped to close every open connection.
    generation: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

/// What every forwarding direction shares.
#[derive(Clone)]
struct Link {
    open: watch::Receiver<bool>,
    rate: Arc<AtomicU64>,
    delay: Arc<AtomicU64>,
    generation: watch::Receiver<u64>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, _) = watch::channel(true);
        let open = Arc::new(open);
        let rate = Arc::new(AtomicU64::new(0));
        let delay = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0u64);
        let generation = Arc::new(generation);
        let accept_open = open.clone();
        let accept_rate = rate.clone();
        let accept_delay = delay.clone();
        let accept_generation = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let mut generation = accept_generation.subscribe();
                generation.mark_unchanged();
                let link = Link {
                    open: accept_open.subscribe(),
                    rate: accept_rate.clone(),
                    delay: accept_delay.clone(),
                    generation,
                };
                tokio::spawn(async move {
                    let mut gate = link.open.clone();
                    // New connections hang too while the link is cut.
                    if gate.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut reset = link.generation.clone();
                    // A reset drops both directions, and so both sockets.
                    tokio::select! {
                        _ = async { tokio::join!(pipe(cr, sw, link.clone()), pipe(sr, cw, link)) } => {},
                        _ = reset.changed() => {},
                    }
                });
            }
        });
        Ok(Proxy {
            port,
            open,
            rate,
            delay,
            generation,
            task,
        })
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, for URLs and `PUBSUB_EMULATOR_HOST`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions without closing anything.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }

    /// Holds everything it forwards for `delay` in each direction (`None`:
    /// forwards at once). Applies to open connections too.
    pub fn delay(&self, delay: Option<Duration>) {
        let micros = delay.map_or(0, |d| d.as_micros() as u64);
        self.delay.store(micros, Ordering::SeqCst);
    }

    /// Closes every open connection, dropping whatever it holds; new
    /// connections are accepted as before (and hang while the link is cut).
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards at most `bytes_per_second` in each direction (`None`: as fast
    /// as possible). Applies to open connections too.
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.rate
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: Link,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While cut, stop reading: the sender's window fills and it blocks.
        if link.open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let rate = link.rate.load(Ordering::SeqCst);
        // Throttled links move small chunks, so the pace is even.
        let chunk = if rate == 0 {
            buf.len()
        } else {
            (rate as usize / 20).clamp(1024, buf.len())
        };
        let n = tokio::select! {
            n = from.read(&mut buf[..chunk]) => n,
            _ = link.open.wait_for(|o| !*o) => continue,
        };
        let n = match n {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        let delay = link.delay.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        // Data read just before a cut is held until the link heals.
        if link.open.wait_for(|o| *o).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
