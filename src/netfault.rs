//! Network faults on this machine, for the harnesses (`warden-chaos`, the integration tests,
//! `warden bench`): a TCP proxy that holds bytes, and a NATS cluster whose routes all run
//! through such proxies.
//!
//! A held link is a cut one as a dropped-packet network cuts it: nothing is read or written,
//! connections stay open, and bytes sent meanwhile wait in the kernel's buffers. It can be held
//! in both directions or in one. Only the peers' own pings notice it: nats-server pings routes
//! and clients every `ping_interval` (two minutes by default), so [`NatsMesh`] lets a test set it.
//!
//! In a [`NatsMesh`] of n servers, server i dials every server j > i through a proxy of that
//! pair and no server dials a lower one, so each pair's route is one connection through one
//! proxy, which [`NatsMesh::cut`] holds. Nothing may bypass the proxies: every server
//! advertises a route address on which nothing listens, so the addresses servers gossip to each
//! other (for implicit routes) lead nowhere, and `no_advertise` keeps the client URLs of the
//! other servers from the clients, which would otherwise reconnect around a node's own proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::up::NatsServer;

/// Which directions of a proxied link are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hold {
    /// Bytes from the client (who dialed the proxy) to the upstream.
    pub up: bool,
    /// Bytes from the upstream to the client.
    pub down: bool,
}

impl Hold {
    pub const OPEN: Hold = Hold {
        up: false,
        down: false,
    };
    pub const BOTH: Hold = Hold {
        up: true,
        down: true,
    };
}

/// A running proxy. Dropping it stops everything it started.
pub struct Proxy {
    pub port: u16,
    hold: watch::Sender<Hold>,
    _tasks: JoinSet<()>,
    alive: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (hold, hold_rx) = watch::channel(Hold::OPEN);
        let alive = Arc::new(AtomicBool::new(true));
        let mut tasks = JoinSet::new();
        let live = alive.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while live.load(Ordering::Relaxed) {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else {
                            // Out of descriptors, say: pause rather than spin.
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            continue;
                        };
                        let target = upstream.clone();
                        let rx = hold_rx.clone();
                        conns.spawn(async move {
                            // While held both ways a new connection gets silence too; held one
                            // way, it is made and its handshake is what goes unanswered.
                            let mut wait = rx.clone();
                            tokio::select! {
                                open = wait.wait_for(|h| *h != Hold::BOTH) => {
                                    if open.is_err() {
                                        return;
                                    }
                                }
                                // A caller that gives up meanwhile takes its connection along.
                                _ = closed(&client) => return,
                            }
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
            hold,
            _tasks: tasks,
            alive,
        })
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The URL a NATS client (or a route) uses to go through this proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// Partitions (true: both directions held) or heals (false) the link.
    pub fn set_blocked(&self, blocked: bool) {
        self.set_hold(if blocked { Hold::BOTH } else { Hold::OPEN });
    }

    /// Holds the given directions, and only those.
    pub fn set_hold(&self, hold: Hold) {
        let _ = self.hold.send(hold); // receivers live as long as the proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// Resolves once `client` has closed its end (checked every 250 ms, without reading).
async fn closed(client: &TcpStream) {
    let mut byte = [0u8; 1];
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let peeked = tokio::time::timeout(Duration::from_millis(1), client.peek(&mut byte)).await;
        if matches!(peeked, Ok(Ok(0)) | Ok(Err(_))) {
            return;
        }
    }
}

async fn pump_pair(client: TcpStream, server: TcpStream, hold: watch::Receiver<Hold>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, hold.clone(), |h| h.up) => {}
        _ = pump(sr, cw, hold, |h| h.down) => {}
    }
}

/// Copies `from` to `to` except while `held` says this direction is held.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: watch::Receiver<Hold>,
    held: fn(&Hold) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Silence while held: bytes wait in the kernel's buffers, as with a dead link.
        let now_held = held(&hold.borrow());
        if now_held && hold.wait_for(|h| !held(h)).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = hold.wait_for(held) => continue,
        };
        // A hold that starts mid-transfer keeps these bytes until it ends.
        let now_held = held(&hold.borrow());
        if now_held && hold.wait_for(|h| !held(h)).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A free loopback TCP port (bound then released; a harness-grade way to pick one).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free loopback TCP ports: all held until all are picked, so that the kernel
/// cannot hand the same one out twice. Another process may still take one before it is used:
/// whoever starts a server on it must be ready to pick again (`NatsMesh::start` is).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// One server of a mesh, restartable on the same ports.
struct MeshServer {
    server: Option<NatsServer>,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
}

/// What [`NatsMesh::start`] builds.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// How many servers.
    pub servers: usize,
    /// The NATS cluster's name.
    pub name: String,
    /// A nats-server config every server loads (the identities' `nats-server.conf`), if any.
    pub base_config: Option<PathBuf>,
    /// nats-server's `ping_interval` (and `ping_max` 2): how soon a silent route or client is
    /// noticed. Whole seconds; none keeps nats-server's two minutes.
    pub ping_interval: Option<Duration>,
}

/// A NATS cluster on loopback whose routes run through proxies the caller can hold.
pub struct NatsMesh {
    servers: Vec<MeshServer>,
    /// `(i, j)` with `i < j`: server i's route to server j.
    routes: BTreeMap<(usize, usize), Proxy>,
}

/// How [`NatsMesh::cut`] cuts the route between two servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteCut {
    /// Nothing crosses in either direction.
    Both,
    /// Bytes from the first server to the second are held; the other way still works.
    OneWay,
}

impl NatsMesh {
    /// Starts the servers (indexes 0..n) and their route proxies in `dir`. Returns once every
    /// server listens; the routes connect on their own shortly after (see `wait_routes`).
    /// A port picked for a server may be taken by another process before the server binds
    /// it (outgoing connections draw from the same range): the whole mesh is then started
    /// again on new ports, three times at most.
    pub async fn start(dir: &Path, cfg: &MeshConfig) -> anyhow::Result<NatsMesh> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(dir, cfg).await {
                Ok(mesh) => return Ok(mesh),
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "the NATS mesh did not start; new ports");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(dir: &Path, cfg: &MeshConfig) -> anyhow::Result<NatsMesh> {
        let n = cfg.servers;
        let picked = free_ports(2 * n + n)?;
        let ports: Vec<u16> = picked[..n].to_vec();
        let listens: Vec<u16> = picked[n..2 * n].to_vec();
        let nowheres: Vec<u16> = picked[2 * n..].to_vec();
        let mut routes = BTreeMap::new();
        for i in 0..n {
            for (j, listen) in listens.iter().enumerate().skip(i + 1) {
                let proxy = Proxy::start(format!("127.0.0.1:{listen}")).await?;
                routes.insert((i, j), proxy);
            }
        }
        let conf = mesh_config(dir, cfg)?;
        let mut servers = Vec::new();
        for i in 0..n {
            let sdir = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&sdir).with_context(|| format!("create {sdir:?}"))?;
            let mut args = vec![
                "-c".to_string(),
                conf.to_string_lossy().into_owned(),
                "-n".into(),
                format!("{}-{i}", cfg.name),
            ];
            if n > 1 {
                let dials: Vec<String> = (i + 1..n).map(|j| routes[&(i, j)].url()).collect();
                // Gossiped route addresses lead nowhere: only the proxies connect servers.
                let nowhere = nowheres[i];
                args.extend([
                    "--cluster_name".into(),
                    cfg.name.clone(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", listens[i]),
                    "--cluster_advertise".into(),
                    format!("127.0.0.1:{nowhere}"),
                    "--no_advertise=true".into(),
                ]);
                if !dials.is_empty() {
                    args.extend(["--routes".into(), dials.join(",")]);
                }
            }
            let server = NatsServer::start_on(&sdir, Some(ports[i]), &args).await?;
            servers.push(MeshServer {
                server: Some(server),
                dir: sdir,
                port: ports[i],
                args,
            });
        }
        Ok(NatsMesh { servers, routes })
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The client URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].port)
    }

    /// Every server's client URL, comma-separated.
    pub fn urls(&self) -> String {
        (0..self.servers.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The proxy of the route between `a` and `b`, and whether `a` is its dialing side.
    fn route(&self, a: usize, b: usize) -> (&Proxy, bool) {
        if a < b {
            (&self.routes[&(a, b)], true)
        } else {
            (&self.routes[&(b, a)], false)
        }
    }

    /// Cuts the route between servers `a` and `b`: both ways, or only what `a` sends to `b`.
    pub fn cut(&self, a: usize, b: usize, how: RouteCut) {
        let (proxy, a_dials) = self.route(a, b);
        proxy.set_hold(match how {
            RouteCut::Both => Hold::BOTH,
            RouteCut::OneWay if a_dials => Hold {
                up: true,
                down: false,
            },
            RouteCut::OneWay => Hold {
                up: false,
                down: true,
            },
        });
    }

    /// Heals the route between `a` and `b`.
    pub fn heal(&self, a: usize, b: usize) {
        self.route(a, b).0.set_hold(Hold::OPEN);
    }

    /// Heals every route.
    pub fn heal_all(&self) {
        for proxy in self.routes.values() {
            proxy.set_hold(Hold::OPEN);
        }
    }

    /// Kills server `i` (its port and routes stay reserved for `restart`).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.servers[i].server.take() {
            s.kill().await;
        }
    }

    /// Starts server `i` again on its old ports, if it is not running.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let s = &mut self.servers[i];
        if s.server.is_none() {
            s.server = Some(NatsServer::start_on(&s.dir, Some(s.port), &s.args).await?);
        }
        Ok(())
    }

    /// Whether server `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].server.is_some()
    }

    /// Waits until every server has a route to every other (nats-server's monitoring is not
    /// on, so this asks the servers' logs), or `within` passes.
    pub async fn wait_routes(&self, within: Duration) -> anyhow::Result<()> {
        let n = self.servers.len();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut all = true;
            for s in &self.servers {
                let log =
                    std::fs::read_to_string(s.dir.join("nats-server.log")).unwrap_or_default();
                let up = log.matches("Route connection created").count();
                let down = log.matches("Route connection closed").count();
                all &= up.saturating_sub(down) >= n - 1;
            }
            if all {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the NATS routes did not all connect within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Writes the config every mesh server loads: the base config included, and the ping
/// interval. nats-server includes only relative paths, so it goes beside the base config.
fn mesh_config(dir: &Path, cfg: &MeshConfig) -> anyhow::Result<PathBuf> {
    let (at, mut text) = match &cfg.base_config {
        Some(base) => {
            let name = base
                .file_name()
                .context("the base config has no file name")?
                .to_string_lossy();
            let at = base
                .parent()
                .context("the base config has no directory")?
                .join(format!("mesh-{}.conf", cfg.name));
            (at, format!("include {name:?}\n"))
        }
        None => (dir.join(format!("mesh-{}.conf", cfg.name)), String::new()),
    };
    if let Some(ping) = cfg.ping_interval {
        let secs = ping.as_secs().max(1);
        text.push_str(&format!("ping_interval: \"{secs}s\"\nping_max: 2\n"));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {dir:?}"))?;
    std::fs::write(&at, text).with_context(|| format!("write {at:?}"))?;
    Ok(at)
}
