//! NATS plumbing: connecting with the configured credentials, and requests that always carry
//! an explicit timeout and classify their failures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use async_nats::{Client, ConnectOptions, HeaderMap, RequestErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::limits;

/// How to reach NATS and authenticate. Every key is optional in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas.
    pub url: String,
    /// A `.creds` file (JWT and nkey seed) for decentralized auth.
    pub creds_file: Option<PathBuf>,
    /// A token for token auth.
    pub token: Option<String>,
    /// User and password auth.
    pub user: Option<String>,
    pub password: Option<String>,
    /// An nkey seed (`SU...`) for nkey auth.
    pub nkey_seed: Option<String>,
    /// Require TLS even when the URL says `nats://`.
    pub tls_required: bool,
    /// PEM file of extra root certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Interval of client pings, in ms: a dead connection is noticed after two missed pings.
    pub ping_interval_ms: u64,
    /// Timeout of one connection attempt, in ms.
    pub connect_timeout_ms: u64,
    /// A Warden identity (`warden auth`): its nkey, and its own inbox prefix. Set from the
    /// node's `auth` key or `--auth`, never read from this section.
    #[serde(skip)]
    pub identity: Option<crate::auth::Identity>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            creds_file: None,
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            ping_interval_ms: 2_000,
            connect_timeout_ms: 2_000,
            identity: None,
        }
    }
}

impl NatsConfig {
    /// Whether the connection presents any credential at all.
    pub fn has_credentials(&self) -> bool {
        self.identity.is_some()
            || self.creds_file.is_some()
            || self.token.is_some()
            || self.user.is_some()
            || self.nkey_seed.is_some()
    }
}

/// The permission violations NATS reported on one connection. async-nats reports them as
/// connection events, not on the request (which just times out): whoever sends can watch
/// this to turn them into a clear `forbidden` at once.
#[derive(Clone)]
pub struct Violations(
    tokio::sync::broadcast::Sender<Violation>,
    /// Times a subscription of the connection overflowed (NATS dropped its messages).
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);

/// One refusal by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A publish refused (else a subscription).
    pub publish: bool,
    /// The subject refused.
    pub subject: String,
    /// The server's words.
    pub message: String,
}

impl Violation {
    /// Reads a server error; `None` unless it is a permissions violation.
    pub fn parse(message: &str) -> Option<Violation> {
        let lower = message.to_ascii_lowercase();
        if !lower.starts_with("permissions violation") {
            return None;
        }
        let subject = message.split('"').nth(1).unwrap_or_default().to_string();
        Some(Violation {
            publish: lower.contains("for publish"),
            subject,
            message: message.to_string(),
        })
    }
}

impl Violations {
    fn new() -> Violations {
        Violations(
            tokio::sync::broadcast::channel(limits::VIOLATION_QUEUE).0,
            Default::default(),
        )
    }

    /// Counts the times a subscription of the connection overflowed.
    pub fn slow_consumers(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.1.clone()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Violation> {
        self.0.subscribe()
    }
}

/// Waits for a violation that concerns a request to `subject`: its publish, or any
/// subscription (the reply inbox's). Pending forever when there is none.
pub async fn refused(
    rx: Option<&mut tokio::sync::broadcast::Receiver<Violation>>,
    subject: &str,
) -> Violation {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(v) if !v.publish || v.subject == subject => return v,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return std::future::pending().await
            }
        }
    }
}

/// Connects to NATS. With `retry`, the first connection is retried until it succeeds (nodes
/// start before or after their server); without, a failure is reported at once (`ctl`).
pub async fn connect(cfg: &NatsConfig, name: &str, retry: bool) -> anyhow::Result<Client> {
    Ok(connect_watched(cfg, name, retry).await?.0)
}

/// Connects like `connect`, and also returns the connection's permission violations.
pub async fn connect_watched(
    cfg: &NatsConfig,
    name: &str,
    retry: bool,
) -> anyhow::Result<(Client, Violations)> {
    let violations = Violations::new();
    let tx = violations.0.clone();
    let slow = violations.1.clone();
    let opts = match &cfg.identity {
        // The seed file is read again at every (re)connection, so that a node whose key was
        // rotated (new seed in place, then a server reload) reconnects with the new key.
        Some(id) => {
            let prefix = id.inbox_prefix.clone();
            let id = id.clone();
            ConnectOptions::with_auth_callback(move |nonce| {
                let id = id.clone();
                async move { id.sign(&nonce) }
            })
            .custom_inbox_prefix(prefix)
        }
        None => ConnectOptions::new(),
    };
    let mut opts = opts
        .name(name)
        .ping_interval(Duration::from_millis(cfg.ping_interval_ms))
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .subscription_capacity(limits::SUBSCRIPTION_CAPACITY)
        .event_callback(move |ev| {
            let tx = tx.clone();
            let slow = slow.clone();
            async move {
                match ev {
                    async_nats::Event::SlowConsumer(sid) => {
                        slow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(sid, "NATS subscription overflowed: messages were dropped")
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::ServerError(async_nats::ServerError::Other(e)) => {
                        match Violation::parse(&e) {
                            Some(v) => {
                                tracing::warn!(error = %e, "NATS refused this identity");
                                let _ = tx.send(v); // nobody may be watching
                            }
                            None => tracing::warn!(error = %e, "NATS server error"),
                        }
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::error!(error = %e, "NATS server error")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    if retry {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .with_context(|| format!("read {path:?}"))?;
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    match (&cfg.user, &cfg.password) {
        (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
        (None, None) => {}
        _ => anyhow::bail!("nats.user and nats.password go together"),
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.clone());
    }
    if let Some(id) = &cfg.identity {
        if let Some(ca) = &id.ca {
            // `warden auth init --tls` wrote a CA next to the seed: the server is TLS only.
            opts = opts.require_tls(true).add_root_certificates(ca.clone());
        }
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(c), Some(k)) => opts = opts.add_client_certificate(c.clone(), k.clone()),
        (None, None) => {}
        _ => anyhow::bail!("nats.tls_cert_file and nats.tls_key_file go together"),
    }
    let servers: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("bad NATS URL {s:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let client = opts
        .connect(servers)
        .await
        .with_context(|| format!("connect to NATS at {}", cfg.url))?;
    Ok((client, violations))
}

/// Why a request failed, classified at the transport edge.
#[derive(Debug, Clone)]
pub enum RequestFailure {
    /// Nobody subscribes to the subject: the peer is down or not started. Answered by the
    /// server in well under a millisecond, so it is safe to treat as "unreachable" and retry.
    NoResponders,
    /// No reply within the deadline: the peer may or may not have acted.
    TimedOut,
    /// The connection failed or the request could not be sent.
    Other(String),
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestFailure::NoResponders => write!(f, "no responders"),
            RequestFailure::TimedOut => write!(f, "timed out"),
            RequestFailure::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RequestFailure {}

/// A reply: its headers and body.
pub struct Reply {
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// Sends a request with an explicit timeout. Never relies on the client's default.
pub async fn request(
    client: &Client,
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
    timeout: Duration,
) -> Result<Reply, RequestFailure> {
    let mut req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(timeout));
    if let Some(h) = headers {
        req = req.headers(h);
    }
    match client.send_request(subject, req).await {
        Ok(msg) => Ok(Reply {
            headers: msg.headers,
            payload: msg.payload,
        }),
        Err(e) => Err(match e.kind() {
            RequestErrorKind::NoResponders => RequestFailure::NoResponders,
            RequestErrorKind::TimedOut => RequestFailure::TimedOut,
            _ => RequestFailure::Other(e.to_string()),
        }),
    }
}
