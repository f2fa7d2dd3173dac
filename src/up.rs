//! `warden up`: a local development cluster on one machine, and [`LocalCluster`], the process
//! launcher it shares with `warden bench --local` and the integration tests.
//!
//! Every process it starts is owned by a handle that kills it on drop, so a failed run leaves
//! nothing behind.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::client::Client;

/// Where `warden up` keeps its cluster by default, relative to the working directory.
pub const DEFAULT_DIR: &str = ".warden/up";
/// The file in that directory that tells `warden ctl` how to reach the cluster.
const LOCAL_FILE: &str = "client.json";

/// How to reach the cluster `warden up` runs: read by `warden ctl` when no flag says otherwise.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Local {
    pub nats: String,
    pub cluster: String,
    /// The admin identity's seed file.
    pub auth: Option<PathBuf>,
}

impl Local {
    /// The cluster `warden up` runs from `dir`, if it runs one. Only a file of this user's
    /// that nobody else may write, naming a seed inside `dir`, is believed: `ctl` would
    /// otherwise sign in wherever a planted file points it, with a seed of its choosing.
    pub fn read(dir: &Path) -> Option<Local> {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join(LOCAL_FILE);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return None;
        }
        let local: Local = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        let inside = |p: &Path| {
            let dir = std::fs::canonicalize(dir).ok();
            let seed = std::fs::canonicalize(p).ok();
            matches!((dir, seed), (Some(d), Some(s)) if s.starts_with(&d))
        };
        match &local.auth {
            Some(seed) if !inside(seed) => None,
            _ => Some(local),
        }
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        crate::auth::write_atomic(&dir.join(LOCAL_FILE), &json, 0o600)
    }
}

/// Command-line arguments of `warden up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Use this NATS server instead of starting one. Run it with the config `warden up`
    /// writes (`<dir>/auth/nats-server.conf`), or pass --no-auth.
    #[arg(long)]
    pub nats: Option<String>,
    /// Directory for the nodes' data, logs and identities.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Cluster name.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Delete the data directory first.
    #[arg(long)]
    pub fresh: bool,
    /// Run without identities: anyone who reaches the NATS server can act as any node.
    #[arg(long)]
    pub no_auth: bool,
}

/// The nats-server arguments that load the config in identity directory `auth`.
pub fn auth_args(auth: &Path) -> Vec<String> {
    vec![
        "-c".into(),
        auth.join(crate::auth::SERVER_FILE)
            .to_string_lossy()
            .into_owned(),
    ]
}

/// A client connection as identity `name` of the identities in `auth` (none: anonymous).
pub async fn connect_as(
    url: &str,
    cluster: &str,
    auth: Option<&Path>,
    name: &str,
) -> anyhow::Result<Client> {
    let identity = match auth {
        Some(dir) => Some(crate::auth::Identity::load(
            &crate::auth::seed_path(dir, name),
            cluster,
            None,
        )?),
        None => None,
    };
    let cfg = crate::bus::NatsConfig {
        url: url.to_string(),
        identity,
        ..Default::default()
    };
    let (nc, violations) =
        crate::bus::connect_watched(&cfg, &format!("warden-{name}"), false).await?;
    Ok(Client::watched(nc, violations, cluster))
}

/// A `nats-server` child process.
pub struct NatsServer {
    child: Child,
    pub url: String,
}

impl NatsServer {
    /// Starts `nats-server` from PATH on a free loopback port, with JetStream (storing in
    /// `dir/jetstream`: the history) and `extra` arguments.
    pub async fn start(dir: &Path, extra: &[String]) -> anyhow::Result<NatsServer> {
        let mut args = vec![
            "-js".to_string(),
            "-sd".to_string(),
            dir.join("jetstream").to_string_lossy().into_owned(),
        ];
        args.extend_from_slice(extra);
        Self::start_on(dir, None, &args).await
    }

    /// Starts `nats-server` on `port` (a free one when `None`), with `extra` arguments.
    pub async fn start_on(
        dir: &Path,
        port: Option<u16>,
        extra: &[String],
    ) -> anyhow::Result<NatsServer> {
        let bin = find_in_path("nats-server").ok_or_else(|| {
            anyhow::anyhow!(
                "nats-server is not on PATH. Install it (Debian/Ubuntu: `apt-get install \
                 nats-server`; macOS: `brew install nats-server`), or pass --nats <url> to use \
                 a server you run yourself"
            )
        })?;
        let ports_dir = dir.join("nats-ports");
        std::fs::create_dir_all(&ports_dir)?;
        let port = port.map_or("-1".to_string(), |p| p.to_string());
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port, "--ports_file_dir"])
            .arg(&ports_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join("nats-server.log"),
            )?))
            .kill_on_drop(true)
            .spawn()
            .context("start nats-server")?;
        let pid = child.id().context("nats-server exited at once")?;
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if let Some(u) = v["nats"][0].as_str() {
                        break u.to_string();
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not report its port within 10 s (see {dir:?}/nats-server.log)"
                );
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Its port taken, most often: say so now rather than after the deadline.
                let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
                let last = log.lines().rev().take(3).collect::<Vec<_>>();
                bail!("nats-server exited ({status}) before it listened: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(NatsServer { child, url })
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the server and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await; // already exited is fine
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A set of `warden node` child processes against one NATS URL, data under one directory.
pub struct LocalCluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub nats_url: String,
    pub cluster: String,
    /// Extra `--config` file contents written for every node (TOML), if any.
    pub config_toml: Option<String>,
    /// NATS URL of individual nodes, when not `nats_url` (a proxy per node, say).
    pub node_nats: BTreeMap<u64, String>,
    /// The identity directory (`warden auth`): node `id` connects as `node-<id>`. Without
    /// one, nodes connect anonymously.
    pub auth: Option<PathBuf>,
    /// Extra environment variables of individual nodes (a test's failpoint, say).
    pub node_env: BTreeMap<u64, Vec<(String, String)>>,
    /// Where individual nodes serve their metrics (`--metrics-listen`), if they do.
    pub node_metrics: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, Child>,
}

impl LocalCluster {
    /// A launcher; no process is started yet.
    pub fn new(bin: PathBuf, dir: PathBuf, nats_url: String, cluster: &str) -> LocalCluster {
        LocalCluster {
            bin,
            dir,
            nats_url,
            cluster: cluster.to_string(),
            config_toml: None,
            node_nats: BTreeMap::new(),
            auth: None,
            node_env: BTreeMap::new(),
            node_metrics: BTreeMap::new(),
            nodes: BTreeMap::new(),
        }
    }

    /// Data directory of node `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Starts node `id` (bootstrapping when `bootstrap`), logging to `node-<id>.log`.
    pub async fn start_node(&mut self, id: u64, bootstrap: bool) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))?;
        let nats = self.node_nats.get(&id).unwrap_or(&self.nats_url);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .args([
                "--id",
                &id.to_string(),
                "--cluster",
                &self.cluster,
                "--nats",
                nats,
            ])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--labels", &format!("zone=local-{}", (id - 1) % 3 + 1)]);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        if let Some(dir) = &self.auth {
            let seed = crate::auth::seed_path(dir, &crate::auth::node_identity(id));
            cmd.arg("--auth").arg(seed);
        }
        if let Some(addr) = self.node_metrics.get(&id) {
            cmd.args(["--metrics-listen", addr]);
        }
        if let Some(toml) = &self.config_toml {
            let path = self.dir.join(format!("node-{id}.toml"));
            std::fs::write(&path, toml)?;
            cmd.arg("--config").arg(path);
        }
        for var in [
            "WARDEN_ID",
            "WARDEN_CONFIG",
            "WARDEN_BOOTSTRAP",
            "WARDEN_DATA_DIR",
            "WARDEN_AUTH",
            "WARDEN_STOP_TIMEOUT_MS",
            "WARDEN_METRICS_LISTEN",
            crate::faults::LOG_WRITES_ENV,
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in self.node_env.get(&id).into_iter().flatten() {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {:?}", self.bin))?;
        self.nodes.insert(id, child);
        Ok(())
    }

    /// Process id of node `id`, if running.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).and_then(|c| c.id())
    }

    /// Waits up to `within` for node `id` to exit by itself; its exit status if it did.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.nodes.get_mut(&id)?;
        let status = tokio::time::timeout(within, child.wait())
            .await
            .ok()?
            .ok()?;
        self.nodes.remove(&id);
        Some(status)
    }

    /// SIGKILLs node `id` and waits for it.
    pub async fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes.remove(&id) {
            let _ = c.kill().await; // an exited child is fine
        }
    }

    /// SIGTERMs node `id` and waits up to `grace` for it to exit, then kills it. Returns
    /// whether it exited by itself with success.
    pub async fn stop(&mut self, id: u64, grace: Duration) -> bool {
        let Some(mut c) = self.nodes.remove(&id) else {
            return false;
        };
        if let Some(pid) = c.id() {
            signal(pid, libc::SIGTERM);
        }
        match tokio::time::timeout(grace, c.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = c.kill().await;
                false
            }
        }
    }

    /// Stops every node with SIGTERM, in parallel.
    pub async fn stop_all(&mut self, grace: Duration) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in &ids {
            if let Some(pid) = self.pid(*id) {
                signal(pid, libc::SIGTERM);
            }
        }
        for id in ids {
            self.stop(id, grace).await;
        }
    }

    /// Waits until `cluster_status` shows `n` nodes up with a leader; returns the status.
    pub async fn wait_ready(
        &self,
        client: &Client,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Value> {
        wait_ready(client, n, within).await
    }
}

/// Waits until `cluster_status` shows `n` nodes up with a leader; returns the status.
pub async fn wait_ready(client: &Client, n: usize, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        match client.call("cluster_status", &json!({})).await {
            Ok(v) => {
                let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
                let up = nodes.iter().filter(|n| n["status"] == "up").count();
                if up >= n && v["leader"].is_u64() {
                    return Ok(v);
                }
                // Which nodes are not up, and why, for whoever reads the error.
                let others: Vec<String> = nodes
                    .iter()
                    .filter(|n| n["status"] != "up")
                    .map(|n| {
                        format!(
                            "node {} {} (last contact {} ms ago)",
                            n["id"], n["status"], n["last_contact_ms"]
                        )
                    })
                    .collect();
                last = format!(
                    "{up} of {n} nodes up, leader {}; {}",
                    v["leader"],
                    others.join(", ")
                );
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("the cluster did not become ready within {within:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `warden up` until `shutdown` resolves.
pub async fn run(args: UpArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<ExitCode> {
    if args.fresh && args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("remove {:?}", args.dir))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    // Identities: made once, kept across runs (like the data), extended if --nodes grew.
    let auth = (!args.no_auth).then(|| args.dir.join("auth"));
    if let Some(dir) = &auth {
        crate::auth::ensure(dir, &args.cluster, args.nodes)?;
    }
    let mut nats = None;
    let mut cluster = None;
    tokio::pin!(shutdown);
    // Everything started is stopped on the way out, also when a signal comes during start-up.
    let started = tokio::select! {
        r = start(&args, auth.as_deref(), &mut nats, &mut cluster) => Some(r),
        _ = &mut shutdown => None,
    };
    if let Some(Err(e)) = &started {
        eprintln!("error: {e:#}");
    }
    if matches!(started, Some(Ok(()))) {
        shutdown.await;
    }
    println!("stopping...");
    let _ = std::fs::remove_file(args.dir.join(LOCAL_FILE)); // ctl no longer finds it
    if let Some(cluster) = &mut cluster {
        cluster.stop_all(Duration::from_secs(10)).await;
    }
    if let Some(mut n) = nats {
        n.kill().await;
    }
    println!("stopped");
    Ok(match started {
        Some(Err(_)) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Starts NATS (unless given one) and the nodes, waits for the cluster, runs the demo and says
/// how to reach it. What it starts goes into `nats` and `cluster`, so that the caller stops it
/// whatever happens here.
async fn start(
    args: &UpArgs,
    auth: Option<&Path>,
    nats: &mut Option<NatsServer>,
    cluster: &mut Option<LocalCluster>,
) -> anyhow::Result<()> {
    let url = match &args.nats {
        Some(u) => u.clone(),
        None => {
            let extra = auth.map(auth_args).unwrap_or_default();
            let server = NatsServer::start(&args.dir, &extra).await?;
            let url = server.url.clone();
            *nats = Some(server);
            url
        }
    };
    let bin = std::env::current_exe().context("find the warden binary")?;
    let cluster = cluster.insert(LocalCluster::new(
        bin,
        args.dir.clone(),
        url.clone(),
        &args.cluster,
    ));
    cluster.auth = auth.map(Path::to_path_buf);
    for id in 1..=args.nodes {
        let port = crate::netfault::free_port()?;
        cluster.node_metrics.insert(id, format!("127.0.0.1:{port}"));
    }
    let initialized = cluster.data_dir(1).exists();
    for id in 1..=args.nodes {
        cluster.start_node(id, id == 1 && !initialized).await?;
    }
    let client = connect_as(&url, &args.cluster, auth, "admin").await?;
    let status = cluster
        .wait_ready(&client, args.nodes as usize, Duration::from_secs(60))
        .await?;
    let admin = match auth {
        Some(dir) => Some(std::fs::canonicalize(crate::auth::seed_path(dir, "admin"))?),
        None => None,
    };
    Local {
        nats: url.clone(),
        cluster: args.cluster.clone(),
        auth: admin.clone(),
    }
    .write(&args.dir)?;
    let story = demo(&client).await;
    let tree = client.call("get_supervision_tree", &json!({})).await.ok();

    let security = match &admin {
        Some(path) => format!(
            "identities in {:?} (`warden ctl` uses the admin's, {path:?})",
            args.dir.join("auth")
        ),
        None => "no identities: anyone on that NATS server can act as any node".into(),
    };
    println!(
        "\nWarden cluster {:?} is up: {} nodes, NATS at {url}, {security}\n",
        args.cluster, args.nodes
    );
    print!("{}", crate::ctl::render("cluster_status", &status));
    if let Some(tree) = tree {
        println!("\nSupervision tree:");
        print!("{}", crate::ctl::render("get_supervision_tree", &tree));
    }
    if let Some(story) = story {
        println!("\n{story}");
    }
    println!("\nPrometheus metrics, one listener per node:");
    for (id, addr) in &cluster.node_metrics {
        println!("  node {id}: http://{addr}/metrics");
    }
    println!("\nTalk to it from another terminal, in this directory:");
    println!("  warden ctl status");
    println!("  warden ctl create_supervisor name=web strategy=one_for_all");
    println!("  warden ctl tree");
    println!("  warden ctl call hits op=add n=1");
    println!("  warden ctl call hits op=crash");
    println!("  warden ctl history hits        (its lifecycle, from JetStream)");
    println!("  warden ctl watch");
    println!("Logs and data: {:?}. Ctrl-C stops everything.", args.dir);
    Ok(())
}

/// A small tree so a new user sees agents, a crash and a restart. Creating it twice is
/// harmless: every create carries a fixed request id, and names clash harmlessly after that.
/// Returns a line describing the crash and restart, when it could show one.
async fn demo(client: &Client) -> Option<String> {
    for (name, parent, strategy) in [
        ("demo", "root", "one_for_one"),
        ("demo-workers", "demo", "one_for_all"),
        ("demo-pipeline", "demo", "rest_for_one"),
    ] {
        let body = json!({"name": name, "parent": parent, "strategy": strategy,
                          "max_restarts": 5, "max_seconds": 10,
                          "request_id": format!("up-demo-{name}")});
        if let Err(e) = client.call("create_supervisor", &body).await {
            tracing::debug!(error = %e, "demo supervisor");
        }
    }
    for (name, sup, kind, config) in [
        ("hits", "demo-workers", "counter", json!({"durable": true})),
        ("greeter", "demo-workers", "echo", json!(null)),
        ("stage-1", "demo-pipeline", "counter", json!(null)),
        ("stage-2", "demo-pipeline", "counter", json!(null)),
    ] {
        let body = json!({"name": name, "supervisor": sup, "kind": kind, "config": config,
                          "request_id": format!("up-demo-{name}")});
        if let Err(e) = client.call("spawn_agent", &body).await {
            tracing::debug!(error = %e, "demo agent");
        }
    }
    // Count three hits, crash the counter, and show that its supervisor brought it back with
    // its checkpointed value.
    let call = |body: serde_json::Value| {
        let nats = client.nats.clone();
        let subject = client.subjects.agent("hits", "call");
        async move {
            for _ in 0..100 {
                let payload = serde_json::to_vec(&body).ok()?.into();
                let r = crate::bus::request(
                    &nats,
                    subject.clone(),
                    None,
                    payload,
                    Duration::from_secs(2),
                )
                .await;
                if let Ok(r) = r {
                    let env = crate::protocol::Envelope::decode(&r.payload).ok()?;
                    match env.into_result() {
                        Ok(v) => return Some(Ok(v)),
                        Err(e) if e.code == crate::protocol::ErrorCode::Unavailable => {}
                        Err(e) => return Some(Err(e)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    };
    for _ in 0..3 {
        call(json!({"op": "add", "n": 1})).await?.ok()?;
    }
    // The crash's own answer is an error by design (`internal`: the agent crashed).
    let _crashed = call(json!({"op": "crash"})).await?;
    let value = call(json!({"op": "get"})).await?.ok()?;
    let agent = client
        .call("get_agent", &json!({"agent": "hits"}))
        .await
        .ok()?;
    Some(format!(
        "Demo: counted 3 hits on agent `hits`, crashed it on purpose; its one_for_all supervisor \
         restarted it and its sibling `greeter` (restarts: {}), and it resumed from its checkpoint \
         at {}.",
        agent["restarts"], value["value"]
    ))
}
