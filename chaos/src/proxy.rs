//! A fault-injecting TCP proxy between one node and its NATS server. Blocking it is a
//! partition: both directions go silent (nothing is read or written, connections stay open),
//! exactly what a node sees when packets are dropped. A NATS server the harness restarts comes
//! back on its old port, so the upstream never changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running proxy. Dropping it stops everything it started.
pub struct Proxy {
    pub port: u16,
    blocked: watch::Sender<bool>,
    _tasks: JoinSet<()>,
    alive: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (blocked, blocked_rx) = watch::channel(false);
        let alive = Arc::new(AtomicBool::new(true));
        let mut tasks = JoinSet::new();
        let live = alive.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while live.load(Ordering::Relaxed) {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let target = upstream.clone();
                        let rx = blocked_rx.clone();
                        conns.spawn(async move {
                            // While blocked, a new connection gets silence too.
                            let mut rx2 = rx.clone();
                            let _ = rx2.wait_for(|b| !*b).await;
                            if let Ok(server) = TcpStream::connect(&target).await {
                                pump_pair(client, server, rx).await;
                            }
                        });
                    }
                }
            }
        });
        Ok(Proxy {
            port,
            blocked,
            _tasks: tasks,
            alive,
        })
    }

    /// The URL a node uses to reach NATS through this proxy.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Partitions (true) or heals (false) the link.
    pub fn set_blocked(&self, blocked: bool) {
        let _ = self.blocked.send(blocked); // receivers live as long as the proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

async fn pump_pair(client: TcpStream, server: TcpStream, blocked: watch::Receiver<bool>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, blocked.clone()) => {}
        _ = pump(sr, cw, blocked) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut blocked: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Silence while blocked: bytes wait in the kernel's buffers, as with a dead link.
        if *blocked.borrow() && blocked.wait_for(|b| !*b).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = blocked.wait_for(|b| *b) => continue,
        };
        // A block that starts mid-transfer holds these bytes until it heals.
        if *blocked.borrow() && blocked.wait_for(|b| !*b).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A free loopback TCP port (bound then released; a harness-grade way to pick one).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
