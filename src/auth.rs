//! The trust boundary: identities, the roles they hold, and the NATS permissions that make
//! nats-server itself enforce them (`docs/security.md`).
//!
//! An identity is a NATS nkey user. `warden auth` keeps a directory:
//! - `identities.toml`: the cluster's name and, per identity, its role and public key. No
//!   secrets: the server's users are rendered from it alone.
//! - `<identity>.nk`: the identity's nkey seed (mode 0600), for whoever connects as it.
//! - `warden-users.conf`: the nats-server `authorization` block, rewritten by every change.
//! - `nats-server.conf`: a server config that includes it, written once by `init`.
//!
//! Permissions come from `command::TABLE`: a client role may publish the commands its role
//! allows, each on `cmd.<command>` and `node.*.cmd.<command>`; a node may publish only under
//! `internal.<its id>` and on events, and subscribe only to what is addressed to it. Replies go
//! to per-identity inboxes (`_INBOX.<cluster>.<identity>`), which only that identity may
//! subscribe to and only nodes may answer on (`allow_responses`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::command::{Role, TABLE};
use crate::subjects::{Subjects, INTERNAL};

/// File of the identities' names, roles and public keys.
pub const IDENTITIES_FILE: &str = "identities.toml";
/// The rendered nats-server users, included by the server config.
pub const USERS_FILE: &str = "warden-users.conf";
/// The server config `init` writes.
pub const SERVER_FILE: &str = "nats-server.conf";
/// Extension of a seed file.
pub const SEED_EXT: &str = "nk";

/// The identities `init` writes besides the nodes, with their roles.
pub const CLIENT_IDENTITIES: [(&str, Role); 3] = [
    ("admin", Role::Admin),
    ("operator", Role::Operator),
    ("viewer", Role::Viewer),
];

/// Name of node `id`'s identity.
pub fn node_identity(id: u64) -> String {
    format!("node-{id}")
}

/// The node id of a node identity's name (`node-3` is 3).
pub fn node_of(name: &str) -> Option<u64> {
    let n = name.strip_prefix("node-")?;
    if n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|&id| id > 0)
}

/// The inbox prefix of identity `name` in `cluster`: only it may subscribe there.
pub fn inbox_prefix(cluster: &str, name: &str) -> String {
    format!("_INBOX.{cluster}.{name}")
}

/// An identity's name: a subject token, short and plain.
pub fn validate_identity_name(name: &str) -> anyhow::Result<()> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > 64 || !plain {
        bail!("identity names are 1 to 64 of [A-Za-z0-9_-]; got {name:?}");
    }
    if name.starts_with("node-") && node_of(name).is_none() {
        bail!("{name:?}: a node identity is node-<id>, with id a positive integer");
    }
    Ok(())
}

/// One identity as `identities.toml` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecord {
    pub name: String,
    pub role: Role,
    /// The nkey user's public key (`U...`).
    pub public_key: String,
}

/// The contents of `identities.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identities {
    pub cluster: String,
    #[serde(default, rename = "identity")]
    pub identities: Vec<IdentityRecord>,
}

/// What one identity may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The permissions of identity `name` with `role` in `cluster`.
pub fn permissions(cluster: &str, name: &str, role: Role) -> anyhow::Result<Permissions> {
    let s = Subjects::new(cluster);
    let inbox = format!("{}.>", inbox_prefix(cluster, name));
    let events = s.event_filter(">");
    if role == Role::Node {
        let id = node_of(name).with_context(|| format!("{name:?} is not a node identity"))?;
        let internal = s.internal_prefix();
        // No `allow_responses`: it would let a node publish on any reply subject of any
        // message it receives, chosen by whoever sent it, so also on another node's subjects.
        // A node answers peers on subjects that name it (`peers`), and clients in their
        // inboxes; it makes no request of its own to an inbox.
        let mut publish = vec![
            format!("{internal}.{id}.>"),
            s.any_replies(),
            events,
            format!("_INBOX.{cluster}.>"),
            s.history_all(),
        ];
        publish.extend(history_api(&s.history_stream()));
        return Ok(Permissions {
            publish,
            subscribe: vec![
                s.cmd_all(),
                s.node_cmd_all(id),
                s.agent_all(),
                format!("{internal}.*.{id}.>"),
                s.leader_queries(),
                // JetStream's answers (the history).
                inbox,
            ],
        });
    }
    let mut publish = Vec::new();
    for spec in TABLE.iter().filter(|c| role.allows(c.role)) {
        publish.push(s.cmd(spec.name));
        publish.push(s.node_cmd_any(spec.name));
    }
    let mut subscribe = vec![events, inbox];
    if role.allows(Role::Operator) {
        publish.push(s.agent("*", "call"));
        publish.push(s.agent("*", "cast"));
    }
    if role == Role::Admin {
        // `warden bench` against a running cluster answers its own reference requests, in
        // its own inbox.
        publish.push(s.bench_all());
        publish.push(format!("{}.>", inbox_prefix(cluster, name)));
        subscribe.push(s.bench_all());
    }
    Ok(Permissions { publish, subscribe })
}

/// The JetStream API requests a node makes for the history stream `stream`, and no others:
/// no node deletes or purges it, or touches another stream.
fn history_api(stream: &str) -> Vec<String> {
    [
        "$JS.API.INFO".to_string(),
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.CREATE.{stream}"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
    ]
    .into()
}

/// Checks that no client permission reaches the internal subjects: the boundary's invariant.
fn check_boundary(cluster: &str, perms: &Permissions) -> anyhow::Result<()> {
    let internal = format!("warden.{cluster}.{INTERNAL}");
    let wide = [format!("warden.{cluster}.>"), "warden.>".into(), ">".into()];
    for p in &perms.publish {
        if p.starts_with(&internal) || wide.contains(p) {
            bail!("a client permission {p:?} reaches the internal subjects");
        }
    }
    Ok(())
}

impl Identities {
    /// Reads `dir/identities.toml`.
    pub fn load(dir: &Path) -> anyhow::Result<Identities> {
        let path = dir.join(IDENTITIES_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {path:?} (written by `warden auth init`)"))?;
        let ids: Identities = toml::from_str(&text).with_context(|| format!("parse {path:?}"))?;
        crate::registry::validate_name("cluster", &ids.cluster)
            .map_err(|e| anyhow::anyhow!("{path:?}: {}", e.message))?;
        let mut names = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for r in &ids.identities {
            validate_identity_name(&r.name)?;
            let role = role_for(&r.name, Some(r.role)).with_context(|| format!("{path:?}"))?;
            if role != r.role {
                bail!("{path:?}: {} cannot have role {}", r.name, r.role.as_str());
            }
            if !r.public_key.starts_with('U')
                || nkeys::KeyPair::from_public_key(&r.public_key).is_err()
            {
                bail!("{path:?}: {} has no valid user public key", r.name);
            }
            if !names.insert(r.name.as_str()) || !keys.insert(r.public_key.as_str()) {
                bail!("{path:?}: identity {} or its key appears twice", r.name);
            }
        }
        Ok(ids)
    }

    fn get(&self, name: &str) -> Option<&IdentityRecord> {
        self.identities.iter().find(|r| r.name == name)
    }

    /// The nats-server `authorization` block for these identities.
    pub fn render_users(&self) -> anyhow::Result<String> {
        render_users(std::slice::from_ref(self))
    }
}

/// One nats-server `authorization` block for the identities of one or more clusters: several
/// Warden clusters can share a NATS server, each behind its own identities (a user's
/// permissions name its cluster's subjects only).
pub fn render_users(clusters: &[Identities]) -> anyhow::Result<String> {
    let mut out = String::new();
    let q = |s: &str| format!("{s:?}"); // names, keys and subjects need no escaping
    let list = |v: &[String]| v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let names: Vec<String> = clusters.iter().map(|c| q(&c.cluster)).collect();
    writeln!(
        out,
        "# The users of Warden cluster {}, written by `warden auth` from {IDENTITIES_FILE}.\n\
         # Do not edit: change identities with `warden auth add|rotate|revoke`, then reload\n\
         # nats-server (`nats-server --signal reload` or SIGHUP). An anonymous connection is\n\
         # refused.",
        names.join(", ")
    )?;
    writeln!(out, "authorization {{\n  users = [")?;
    for ids in clusters {
        for r in &ids.identities {
            let p = permissions(&ids.cluster, &r.name, r.role)?;
            if r.role != Role::Node {
                check_boundary(&ids.cluster, &p)?;
            }
            writeln!(out, "    # {} ({})", r.name, r.role.as_str())?;
            writeln!(out, "    {{")?;
            writeln!(out, "      nkey: {}", q(&r.public_key))?;
            writeln!(out, "      permissions: {{")?;
            writeln!(out, "        publish: {{ allow: [{}] }}", list(&p.publish))?;
            writeln!(
                out,
                "        subscribe: {{ allow: [{}] }}",
                list(&p.subscribe)
            )?;
            writeln!(out, "      }}\n    }}")?;
        }
    }
    writeln!(out, "  ]\n}}")?;
    Ok(out)
}

impl Identities {
    /// Writes `identities.toml` and `warden-users.conf` (each through a temporary file, so a
    /// reading server never sees half of one).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let users = self.render_users()?;
        let toml = toml::to_string_pretty(self)?;
        write_atomic(&dir.join(IDENTITIES_FILE), toml.as_bytes(), 0o644)?;
        write_atomic(&dir.join(USERS_FILE), users.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Creates identity `name` with a new key, writing its seed to `dir/<name>.nk`.
    fn create(&mut self, dir: &Path, name: &str, role: Role) -> anyhow::Result<()> {
        validate_identity_name(name)?;
        if self.get(name).is_some() {
            bail!("identity {name:?} exists already; `warden auth rotate` gives it a new key");
        }
        let public_key = write_new_seed(dir, name)?;
        self.identities.push(IdentityRecord {
            name: name.to_string(),
            role,
            public_key,
        });
        Ok(())
    }
}

/// The role of a new identity named `name`: nodes and the standard clients have theirs.
fn role_for(name: &str, asked: Option<Role>) -> anyhow::Result<Role> {
    let implied = if node_of(name).is_some() {
        Some(Role::Node)
    } else {
        CLIENT_IDENTITIES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
    };
    match (implied, asked) {
        (Some(r), None) => Ok(r),
        (Some(r), Some(a)) if r == a => Ok(r),
        (Some(r), Some(a)) => bail!(
            "{name:?} is a {} identity by its name; it cannot have role {}",
            r.as_str(),
            a.as_str()
        ),
        (None, Some(Role::Node)) => bail!("a node identity is named node-<id>"),
        (None, Some(a)) => Ok(a),
        (None, None) => bail!("say the role of {name:?} with --role viewer|operator|admin"),
    }
}

/// Generates a user nkey, writes its seed to `dir/<name>.nk` (0600) and returns its public key.
fn write_new_seed(dir: &Path, name: &str) -> anyhow::Result<String> {
    let kp = nkeys::KeyPair::new_user();
    let seed = kp
        .seed()
        .map_err(|e| anyhow::anyhow!("encode a seed: {e}"))?;
    write_atomic(&seed_path(dir, name), format!("{seed}\n").as_bytes(), 0o600)?;
    Ok(kp.public_key())
}

/// Where identity `name`'s seed lives in `dir`.
pub fn seed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{SEED_EXT}"))
}

/// Writes `path` whole or not at all, with `mode` from the first byte on: through a new
/// temporary file (created, never reused, so no earlier file's mode or a symlink applies),
/// then a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{path:?} has no file name"))?;
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("write {tmp:?}"))?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("write {path:?}"));
    }
    Ok(())
}

/// The server config `init` writes into `dir`: NATS on `port`, the users included, TLS if
/// asked (nats-server reads certificate paths from its working directory, unlike includes,
/// so they are absolute).
fn server_config(dir: &Path, cluster: &str, port: u16, tls: bool) -> anyhow::Result<String> {
    let mut out = format!(
        "# nats-server config for Warden cluster {cluster:?}, written by `warden auth init`.\n\
         # Run: nats-server -c {SERVER_FILE}   (command-line flags override what is here)\n\
         # The users are in {USERS_FILE}; `warden auth add|rotate|revoke` rewrite it, and\n\
         # `nats-server --signal reload` (or SIGHUP) applies it without a restart.\n\
         port: {port}\n\
         include \"{USERS_FILE}\"\n"
    );
    if tls {
        let dir = std::fs::canonicalize(dir).with_context(|| format!("resolve {dir:?}"))?;
        let _ = writeln!(
            out,
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n}}",
            dir.join(crate::tls::SERVER_CERT_FILE),
            dir.join(crate::tls::SERVER_KEY_FILE)
        );
    }
    Ok(out)
}

/// `warden auth`: writes and changes a cluster's identities.
#[derive(clap::Subcommand, Debug)]
pub enum AuthCmd {
    /// Writes a new directory of identities: node-1..node-N, admin, operator and viewer, with
    /// nats-server.conf and warden-users.conf.
    Init {
        /// The directory to write; it must not hold identities yet.
        #[arg(long)]
        out: PathBuf,
        /// Number of node identities.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Cluster name.
        #[arg(long, default_value = "default")]
        cluster: String,
        /// The port nats-server.conf sets.
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// Also write a CA and certificates, and turn TLS on in nats-server.conf.
        #[arg(long)]
        tls: bool,
        /// Do nothing if DIR holds identities already (for a container's first start).
        #[arg(long)]
        if_absent: bool,
    },
    /// Adds one identity (node-<id>, admin, operator, viewer, or any name with --role).
    Add {
        /// The identity directory `init` wrote.
        #[arg(long)]
        out: PathBuf,
        /// The new identity's name.
        name: String,
        /// The role of an identity whose name does not imply one.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
    },
    /// Gives an identity a new key; the old one stops working at the server's next reload.
    Rotate {
        /// The identity directory `init` wrote.
        #[arg(long)]
        out: PathBuf,
        /// The identity's name.
        name: String,
    },
    /// Removes an identity and its seed; its connections are closed at the server's next
    /// reload.
    Revoke {
        /// The identity directory `init` wrote.
        #[arg(long)]
        out: PathBuf,
        /// The identity's name.
        name: String,
    },
    /// Lists the identities with their roles, public keys and inbox prefixes.
    List {
        /// The identity directory `init` wrote.
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "viewer" => Ok(Role::Viewer),
        "operator" => Ok(Role::Operator),
        "admin" => Ok(Role::Admin),
        _ => Err(format!("{s:?}: the roles are viewer, operator and admin")),
    }
}

/// Runs `warden auth`, printing what it did.
pub fn run(cmd: AuthCmd) -> anyhow::Result<()> {
    match cmd {
        AuthCmd::Init {
            out,
            nodes,
            cluster,
            port,
            tls,
            if_absent,
        } => {
            if if_absent && out.join(IDENTITIES_FILE).exists() {
                println!("{out:?} holds identities already; nothing to do");
                return Ok(());
            }
            init(&out, &cluster, nodes, port, tls)?;
            println!(
                "Wrote {} identities for cluster {cluster:?} to {out:?}.\n\
                 Start NATS with:   nats-server -c {:?}\n\
                 A node connects with --auth {:?}, a client with --auth {:?}.\n\
                 Keep the .nk files secret: each one is an identity.",
                nodes + CLIENT_IDENTITIES.len() as u64,
                out.join(SERVER_FILE),
                seed_path(&out, &node_identity(1)),
                seed_path(&out, "admin"),
            );
        }
        AuthCmd::Add { out, name, role } => {
            let mut ids = Identities::load(&out)?;
            let role = role_for(&name, role)?;
            ids.create(&out, &name, role)?;
            ids.save(&out)?;
            println!(
                "Added {name} ({}); its seed is {:?}. Reload nats-server to apply.",
                role.as_str(),
                seed_path(&out, &name)
            );
        }
        AuthCmd::Rotate { out, name } => {
            let mut ids = Identities::load(&out)?;
            let idx = ids
                .identities
                .iter()
                .position(|r| r.name == name)
                .with_context(|| format!("no identity {name:?} in {out:?}"))?;
            ids.identities[idx].public_key = write_new_seed(&out, &name)?;
            ids.save(&out)?;
            println!(
                "Gave {name} a new key in {:?}. Reload nats-server: from then on only the new \
                 seed connects; hand it to {name} first.",
                seed_path(&out, &name)
            );
        }
        AuthCmd::Revoke { out, name } => {
            let mut ids = Identities::load(&out)?;
            let before = ids.identities.len();
            ids.identities.retain(|r| r.name != name);
            if ids.identities.len() == before {
                bail!("no identity {name:?} in {out:?}");
            }
            ids.save(&out)?;
            let seed = seed_path(&out, &name);
            if seed.exists() {
                std::fs::remove_file(&seed).with_context(|| format!("remove {seed:?}"))?;
            }
            println!("Revoked {name}. Reload nats-server to close its connections.");
        }
        AuthCmd::List { out } => {
            let ids = Identities::load(&out)?;
            println!("cluster {:?}", ids.cluster);
            for r in &ids.identities {
                println!(
                    "{:<12} {:<9} {}  inbox {}",
                    r.name,
                    r.role.as_str(),
                    r.public_key,
                    inbox_prefix(&ids.cluster, &r.name)
                );
            }
        }
    }
    Ok(())
}

/// Writes a new identity directory.
pub fn init(dir: &Path, cluster: &str, nodes: u64, port: u16, tls: bool) -> anyhow::Result<()> {
    crate::registry::validate_name("cluster", cluster).map_err(|e| anyhow::anyhow!(e.message))?;
    if nodes == 0 || nodes > 1_000 {
        bail!("--nodes is 1 to 1000");
    }
    if dir.join(IDENTITIES_FILE).exists() {
        bail!(
            "{dir:?} holds identities already; add one with `warden auth add`, or choose \
             another directory"
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {dir:?}"))?;
    let mut ids = Identities {
        cluster: cluster.to_string(),
        identities: Vec::new(),
    };
    for id in 1..=nodes {
        ids.create(dir, &node_identity(id), Role::Node)?;
    }
    for (name, role) in CLIENT_IDENTITIES {
        ids.create(dir, name, role)?;
    }
    ids.save(dir)?;
    if tls {
        crate::tls::write_certificates(dir)?;
    }
    write_atomic(
        &dir.join(SERVER_FILE),
        server_config(dir, cluster, port, tls)?.as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Makes sure `dir` holds identities for `cluster` with at least nodes 1..=`nodes`: writes a
/// new directory, or adds the node identities missing from an existing one. Returns whether
/// it changed anything (a running server then needs a reload).
pub fn ensure(dir: &Path, cluster: &str, nodes: u64) -> anyhow::Result<bool> {
    if !dir.join(IDENTITIES_FILE).exists() {
        init(dir, cluster, nodes, 4222, false)?;
        return Ok(true);
    }
    let mut ids = Identities::load(dir)?;
    if ids.cluster != cluster {
        bail!(
            "{dir:?} holds the identities of cluster {:?}, not {cluster:?}",
            ids.cluster
        );
    }
    let mut changed = false;
    for id in 1..=nodes {
        let name = node_identity(id);
        if ids.get(&name).is_none() {
            ids.create(dir, &name, Role::Node)?;
            changed = true;
        }
    }
    if changed {
        ids.save(dir)?;
    }
    Ok(changed)
}

/// The identity a connection uses: its name, its seed and its inbox prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    seed: String,
    pub inbox_prefix: String,
    /// The file it was read from.
    pub path: PathBuf,
    /// The CA next to the seed, when `warden auth init --tls` wrote one.
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a seed file. The identity's name is the file's name without `.nk`; `as_name`
    /// overrides it (a node is `node-<id>` whatever its file is called).
    pub fn load(path: &Path, cluster: &str, as_name: Option<&str>) -> anyhow::Result<Identity> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {path:?}"))?;
        // A seed file holds the seed; tolerate comments and blank lines around it.
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .with_context(|| format!("{path:?} holds no user nkey seed (a line `SU...`)"))?;
        nkeys::KeyPair::from_seed(seed)
            .map_err(|e| anyhow::anyhow!("{path:?} holds no valid user nkey seed: {e}"))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("{path:?} has no file name"))?;
        let name = as_name.unwrap_or(stem).to_string();
        validate_identity_name(&name)?;
        let ca = path.parent().map(|d| d.join(crate::tls::CA_FILE));
        Ok(Identity {
            inbox_prefix: inbox_prefix(cluster, &name),
            name,
            seed: seed.to_string(),
            path: path.to_path_buf(),
            ca: ca.filter(|p| p.exists()),
        })
    }

    /// Signs a server's connection nonce with the seed in the identity's file, read now (a
    /// rotated seed put in its place is used from the next connection on); with the seed
    /// read at start if the file is gone or broken.
    pub fn sign(&self, nonce: &[u8]) -> Result<async_nats::Auth, async_nats::AuthError> {
        let fresh = std::fs::read_to_string(&self.path).ok().and_then(|text| {
            let seed = text.lines().map(str::trim).find(|l| l.starts_with("SU"))?;
            nkeys::KeyPair::from_seed(seed).ok()
        });
        let key = match fresh {
            Some(k) => k,
            None => nkeys::KeyPair::from_seed(&self.seed)
                .map_err(|e| async_nats::AuthError::new(format!("bad seed: {e}")))?,
        };
        let signature = key
            .sign(nonce)
            .map_err(|e| async_nats::AuthError::new(format!("cannot sign: {e}")))?;
        let mut auth = async_nats::Auth::new();
        auth.nkey = Some(key.public_key());
        auth.signature = Some(signature);
        Ok(auth)
    }

    /// Its public key.
    pub fn public_key(&self) -> String {
        nkeys::KeyPair::from_seed(&self.seed)
            .map(|k| k.public_key())
            .unwrap_or_default()
    }
}

/// The markdown table of every command, who may publish it and who answers it, for
/// docs/security.md (a test keeps the two equal). Subjects are under `warden.<cluster>.`.
pub fn command_table() -> String {
    use crate::command::Route;
    let mut out =
        String::from("| command | who may send it | subjects | who answers |\n|---|---|---|---|\n");
    for spec in TABLE.iter() {
        let (who, subjects) = match spec.role {
            // Heartbeats travel alone, never batched behind writes.
            Role::Node if spec.route == Route::Read => (
                "the node it speaks for".to_string(),
                format!("`internal.<node>.<leader>.own.{}`", spec.name),
            ),
            Role::Node => (
                "the node it speaks for".to_string(),
                format!(
                    "`internal.<node>.<leader>.own.{}`, or in the node's forward batches",
                    spec.name
                ),
            ),
            role => {
                let roles: Vec<&str> = CLIENT_IDENTITIES
                    .iter()
                    .rev()
                    .filter(|(_, r)| r.allows(role))
                    .map(|(_, r)| r.as_str())
                    .collect();
                (
                    roles.join(", "),
                    format!("`cmd.{0}`, `node.<id>.cmd.{0}`", spec.name),
                )
            }
        };
        let answers = match (spec.role, spec.route) {
            (Role::Node, _) => "the leader, only if the body speaks for the sender alone",
            (_, Route::Local) => "the node that receives it",
            (_, Route::Read) => "any node; the leader reads",
            (_, Route::Write) => "any node; the leader writes",
            (_, Route::Membership) => "any node; the leader changes the membership",
            (_, Route::Wait) => "the node that receives it, from its copy of the registry",
            (_, Route::History) => "the node that receives it, from the history stream",
            (_, Route::Figures) => {
                "the nodes that run the agents, asked by the node that receives it"
            }
        };
        let _ = writeln!(out, "| `{}` | {who} | {subjects} | {answers} |", spec.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: no client role can publish on the internal prefix, and each role's commands are
    /// exactly those its row allows.
    #[test]
    fn client_roles_never_reach_internal_subjects() {
        for (name, role) in CLIENT_IDENTITIES {
            let p = permissions("prod", name, role).unwrap();
            check_boundary("prod", &p).unwrap();
            assert!(!p.publish.iter().any(|s| s.contains("internal")), "{p:?}");
            let allowed = |c: &str| p.publish.contains(&format!("warden.prod.cmd.{c}"));
            assert!(allowed("cluster_status"));
            assert_eq!(allowed("spawn_agent"), role != Role::Viewer, "{name}");
            assert_eq!(allowed("export_state"), role != Role::Viewer, "{name}");
            assert_eq!(allowed("join"), role == Role::Admin, "{name}");
            assert_eq!(allowed("import_state"), role == Role::Admin, "{name}");
            assert!(!allowed("heartbeat"), "{name}");
            assert!(p.subscribe.contains(&format!("_INBOX.prod.{name}.>")));
        }
    }

    /// Goal: a node publishes only as itself and subscribes only to what is addressed to it.
    #[test]
    fn a_node_speaks_and_listens_only_as_itself() {
        let p = permissions("prod", "node-2", Role::Node).unwrap();
        // Under `internal`, only as itself, and answers to leader queries (which carry no
        // authority); replies to clients in their inboxes; no `allow_responses` anywhere.
        assert_eq!(
            p.publish[..5],
            [
                "warden.prod.internal.2.>",
                "warden.prod.internal.any.*.reply.*",
                "warden.prod.evt.>",
                "_INBOX.prod.>",
                "warden.prod.hist.>",
            ]
        );
        // JetStream only for its history stream, and never to delete or purge it.
        let js: Vec<_> = p.publish.iter().filter(|s| s.starts_with("$JS")).collect();
        assert!(js
            .iter()
            .all(|s| *s == "$JS.API.INFO" || s.contains(".warden-prod-history")));
        assert!(!js
            .iter()
            .any(|s| s.contains("DELETE.warden-prod-history") && !s.contains("CONSUMER")));
        assert!(!js.iter().any(|s| s.contains("PURGE")));
        assert!(p.subscribe.contains(&"_INBOX.prod.node-2.>".to_string()));
        assert!(p
            .subscribe
            .contains(&"warden.prod.internal.*.2.>".to_string()));
        assert!(!p.subscribe.iter().any(|s| s.contains(".3.")), "{p:?}");
        assert!(permissions("prod", "admin", Role::Node).is_err());
    }

    /// Goal: docs/security.md shows the command table as the code enforces it.
    #[test]
    fn the_security_doc_carries_the_command_table() {
        let doc = include_str!("../docs/security.md");
        let table = command_table();
        assert!(
            doc.contains(&table),
            "docs/security.md must contain this table:\n{table}"
        );
    }

    #[test]
    fn identity_names_and_roles() {
        assert_eq!(node_of("node-12"), Some(12));
        assert_eq!(node_of("node-012"), None);
        assert_eq!(node_of("node-0"), None);
        assert!(validate_identity_name("node-x").is_err());
        assert!(validate_identity_name("a.b").is_err());
        assert_eq!(role_for("node-4", None).unwrap(), Role::Node);
        assert_eq!(role_for("admin", None).unwrap(), Role::Admin);
        assert!(role_for("admin", Some(Role::Viewer)).is_err());
        assert!(role_for("alice", None).is_err());
        assert_eq!(
            role_for("alice", Some(Role::Operator)).unwrap(),
            Role::Operator
        );
    }
}
