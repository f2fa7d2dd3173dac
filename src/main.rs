//! The `warden` binary: parses the command line, installs tracing, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use warden::config::{parse_labels, NodeConfig};
use warden::limits;

/// jemalloc rather than glibc's malloc. Replaying a log of a million agents after a restart
/// spent about 40% of its time in the kernel zeroing pages glibc had just handed back and
/// asked for again, and glibc's fragmentation left a restarted node almost twice the size it
/// was before (ARCHITECTURE.md, "jemalloc").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "A distributed supervisor for long-running agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Node(NodeArgs),
    /// Send a command to a cluster and print the reply.
    Ctl(warden::ctl::CtlArgs),
    /// Start a local three-node cluster (and a nats-server) for development.
    Up(warden::up::UpArgs),
    /// Measure a running cluster through the NATS command path.
    Bench(warden::bench::BenchArgs),
    /// Write and change the identities NATS enforces (docs/security.md).
    #[command(subcommand)]
    Auth(warden::auth::AuthCmd),
}

/// Flags win over `WARDEN_*` environment variables, which win over the config file.
#[derive(Args)]
struct NodeArgs {
    /// This node's id (positive, unique, stable).
    #[arg(long, env = "WARDEN_ID")]
    id: Option<u64>,
    /// Cluster name [default: default].
    #[arg(long, env = "WARDEN_CLUSTER")]
    cluster: Option<String>,
    /// NATS URL(s), comma-separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "WARDEN_NATS")]
    nats: Option<String>,
    /// Directory of the node's data [default: ./data/<cluster>-<id>].
    #[arg(long, env = "WARDEN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Initialize a new cluster with this node (no effect on an initialized data dir).
    #[arg(long, env = "WARDEN_BOOTSTRAP")]
    bootstrap: bool,
    /// Node name [default: node-<id>].
    #[arg(long, env = "WARDEN_NAME")]
    name: Option<String>,
    /// Labels, as k=v,k2=v2.
    #[arg(long, env = "WARDEN_LABELS")]
    labels: Option<String>,
    /// Raft voters to keep: 1, 3 or 5 [default: 3].
    #[arg(long, env = "WARDEN_VOTERS_MAX")]
    voters_max: Option<usize>,
    /// TOML config file with the same keys (see config/node.example.toml).
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<PathBuf>,
    /// NATS token.
    #[arg(long, env = "WARDEN_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS user (with WARDEN_NATS_PASSWORD).
    #[arg(long, env = "WARDEN_NATS_USER")]
    nats_user: Option<String>,
    #[arg(long, env = "WARDEN_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS credentials file.
    #[arg(long, env = "WARDEN_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// This node's identity: its seed file from `warden auth` (node-<id>.nk).
    #[arg(long, env = "WARDEN_AUTH")]
    auth: Option<PathBuf>,
    /// Most time from SIGTERM to exit, in ms [default: 5000].
    #[arg(long, env = "WARDEN_STOP_TIMEOUT_MS")]
    stop_timeout_ms: Option<u64>,
    /// Serve Prometheus metrics at http://<addr>/metrics ([metrics] listen) [default: off].
    #[arg(long, env = "WARDEN_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

impl NodeArgs {
    fn resolve(self) -> anyhow::Result<NodeConfig> {
        let mut cfg = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = self.id {
            cfg.id = v;
        }
        if let Some(v) = self.cluster {
            cfg.cluster = v;
        }
        if let Some(v) = self.nats {
            cfg.nats.url = v;
        }
        if let Some(v) = self.data_dir {
            cfg.data_dir = v;
        }
        if self.bootstrap {
            cfg.bootstrap = true;
        }
        if let Some(v) = self.name {
            cfg.name = v;
        }
        if let Some(v) = self.labels {
            cfg.labels = parse_labels(&v)?;
        }
        if let Some(v) = self.voters_max {
            cfg.voters_max = v;
        }
        if let Some(v) = self.nats_token {
            cfg.nats.token = Some(v);
        }
        if let Some(v) = self.nats_user {
            cfg.nats.user = Some(v);
        }
        if let Some(v) = self.nats_password {
            cfg.nats.password = Some(v);
        }
        if let Some(v) = self.nats_creds {
            cfg.nats.creds_file = Some(v);
        }
        if let Some(v) = self.auth {
            cfg.auth = Some(v);
        }
        if let Some(v) = self.stop_timeout_ms {
            cfg.stop_timeout_ms = v;
        }
        if let Some(v) = self.metrics_listen {
            cfg.metrics.listen = Some(v);
        }
        if cfg.exec.shim.is_none() {
            // This very binary runs exec agents' shims (`warden exec-shim`): by the link to
            // the running executable, which holds even if the file is replaced or removed.
            cfg.exec.shim = Some(PathBuf::from("/proc/self/exe"));
        }
        cfg.finish()
    }
}

fn install_tracing() {
    // openraft logs every vote at INFO and every retry to a down peer at ERROR: keep it quiet
    // unless asked for with RUST_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,async_nats=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, not when the future is
/// first polled: a signal during start-up must stop what was started, not kill the process
/// and leave its children behind. With `backstop`, the process exits (status 1) that long
/// after the signal whatever it is doing: a stop has a bound even if one of its steps ignores
/// its own.
fn shutdown_signal(backstop: Option<Duration>) -> impl std::future::Future<Output = ()> {
    let signalled = signal_received();
    async move {
        signalled.await;
        if let Some(after) = backstop {
            // A thread, not a task: it must fire even if the runtime is stuck.
            let spawned = std::thread::Builder::new()
                .name("warden-stop-backstop".into())
                .spawn(move || {
                    std::thread::sleep(after);
                    eprintln!(
                        "error: the node did not stop within {after:?} of the signal; exiting"
                    );
                    std::process::exit(1);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the stop backstop");
            }
        }
    }
}

fn signal_received() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stopping only on Ctrl-C");
                let _ = tokio::signal::ctrl_c().await; // nothing better to do if this fails too
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Node(args) => {
            install_tracing();
            let cfg = args.resolve()?;
            let backstop = Duration::from_millis(cfg.stop_timeout_ms + limits::STOP_BACKSTOP_MS);
            warden::node::run(cfg, shutdown_signal(Some(backstop))).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ctl(args) => warden::ctl::run(args).await,
        Cmd::Up(args) => {
            install_tracing();
            warden::up::run(args, shutdown_signal(None)).await
        }
        Cmd::Bench(args) => warden::bench::run(args).await,
        Cmd::Auth(cmd) => {
            warden::auth::run(cmd)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    // An exec agent's shim is this binary too; it runs before any thread is started.
    warden::agent::exec_shim::run_if_invoked();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A task still blocked (a disk that hangs) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(limits::RUNTIME_SHUTDOWN_MS));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
