//! Where Redis is, for every command: one server (`--redis-url`), a Redis
//! Cluster (`--redis-cluster`) or the primary of a Redis Sentinel deployment
//! (`--redis-sentinel` with `--sentinel-master`, for the commands that take
//! [`RedisArgs`]), and the servers behind it.
//!
//! A [`RedisTarget`] builds [`RedisStore`]s (`RedisStore::builder`,
//! `RedisStore::cluster_builder` or `RedisStore::sentinel_builder`) and, for
//! commands about a server rather than a key (`INFO`, `CLIENT …`), lists the
//! servers to send them to: the server itself, every master of the cluster
//! (from `CLUSTER NODES`), or the primary the sentinels name, each reached by
//! a plain connection of its own.
//!
//! URLs may hold a password, so they never show in a `Debug`, a message or a
//! child process's command line: [`SecretUrl`] redacts itself, and the lab
//! hands URLs to its child processes through their environment
//! ([`RedisTarget::child_env`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{RedisStore, RedisStoreBuilder};
use cachet_redis::RedisConnection;
pub(crate) use cachet_redis::redact_url;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};

/// The variable that gives `--redis-url`.
pub(crate) const REDIS_URL_ENV: &str = "CACHET_REDIS_URL";
/// The variable that gives `--redis-cluster`.
pub(crate) const REDIS_CLUSTER_ENV: &str = "CACHET_REDIS_CLUSTER";
/// The variable that gives `--redis-sentinel`.
pub(crate) const REDIS_SENTINEL_ENV: &str = "CACHET_REDIS_SENTINEL";
/// The variable that gives `--sentinel-master`.
pub(crate) const SENTINEL_MASTER_ENV: &str = "CACHET_SENTINEL_MASTER";
/// The variable that gives `--sentinel-db`.
pub(crate) const SENTINEL_DB_ENV: &str = "CACHET_SENTINEL_DB";
/// The variable that gives `--sentinel-node-user`.
pub(crate) const SENTINEL_NODE_USER_ENV: &str = "CACHET_SENTINEL_NODE_USER";
/// The variable that gives `--sentinel-node-password`.
pub(crate) const SENTINEL_NODE_PASSWORD_ENV: &str = "CACHET_SENTINEL_NODE_PASSWORD";
/// The variable that gives `--database-url`.
pub(crate) const DATABASE_URL_ENV: &str = "DATABASE_URL";

/// A URL from the command line or the environment, which may hold a
/// password: its `Debug` shows it redacted.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SecretUrl(String);

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SecretUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

/// A password from the command line or the environment: its `Debug` shows
/// `***`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The ACL user and password for the data nodes of a Sentinel target
/// (`--sentinel-node-user`, `--sentinel-node-password`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeAuth {
    /// Empty: the default user.
    user: String,
    password: Secret,
}

/// Variables to set (or, `None`, to remove) in a child process's
/// environment. Its `Debug` shows the names only.
#[derive(Clone, Default)]
pub(crate) struct ChildEnv(pub(crate) Vec<(&'static str, Option<String>)>);

impl fmt::Debug for ChildEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl ChildEnv {
    /// Both sets of variables.
    pub(crate) fn and(mut self, other: &ChildEnv) -> Self {
        self.0.extend(other.0.iter().cloned());
        self
    }
}

/// TLS settings for a `rediss://` Redis: `--redis-ca`, `--redis-cert`,
/// `--redis-key`.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct RedisTlsArgs {
    /// CA certificate(s), PEM, to verify a rediss:// server's certificate with
    /// [default: the system's root certificates]
    #[arg(long, value_name = "FILE", env = "CACHET_REDIS_CA")]
    pub(crate) redis_ca: Option<PathBuf>,
    /// Client certificate, PEM, for a Redis that requires mutual TLS (with
    /// --redis-key)
    #[arg(
        long,
        value_name = "FILE",
        env = "CACHET_REDIS_CERT",
        requires = "redis_key"
    )]
    pub(crate) redis_cert: Option<PathBuf>,
    /// The private key, PEM, of --redis-cert
    #[arg(
        long,
        value_name = "FILE",
        env = "CACHET_REDIS_KEY",
        requires = "redis_cert"
    )]
    pub(crate) redis_key: Option<PathBuf>,
}

/// A client certificate chain and its private key, PEM.
type ClientPem = (Arc<[u8]>, Arc<[u8]>);

/// [`RedisTlsArgs`] with the files read.
#[derive(Clone, Default)]
struct Tls {
    args: RedisTlsArgs,
    ca: Option<Arc<[u8]>>,
    client: Option<ClientPem>,
}

impl Tls {
    fn load(args: &RedisTlsArgs) -> Result<Self> {
        let read = |flag: &str, path: &Path| -> Result<Arc<[u8]>> {
            std::fs::read(path)
                .map(Arc::from)
                .with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let ca = args
            .redis_ca
            .as_deref()
            .map(|p| {
                let pem = read("--redis-ca", p)?;
                if !holds_pem_certificate(&pem) {
                    bail!(
                        "--redis-ca {} holds no PEM certificate (no `-----BEGIN CERTIFICATE-----` \
                         block): give the CA certificate(s) to verify the server with",
                        p.display()
                    );
                }
                Ok(pem)
            })
            .transpose()?;
        let client = match (&args.redis_cert, &args.redis_key) {
            (Some(cert), Some(key)) => {
                Some((read("--redis-cert", cert)?, read("--redis-key", key)?))
            }
            (None, None) => None,
            _ => bail!("give --redis-cert and --redis-key together"),
        };
        Ok(Self {
            args: args.clone(),
            ca,
            client,
        })
    }

    fn apply(&self, mut builder: RedisStoreBuilder) -> RedisStoreBuilder {
        if let Some(ca) = &self.ca {
            builder = builder.tls_ca_pem(ca.to_vec());
        }
        if let Some((cert, key)) = &self.client {
            builder = builder.tls_client_cert_pem(cert.to_vec(), key.to_vec());
        }
        builder
    }

    fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// A plain client for `url` with these settings.
    fn client(&self, url: &str) -> Result<redis::Client> {
        let shown = no_fragment(url)?;
        match self.certificates() {
            None => redis::Client::open(url).with_context(|| format!("invalid Redis URL {shown}")),
            Some(certs) => redis::Client::build_with_tls(url, certs)
                .with_context(|| format!("invalid Redis URL or TLS settings for {shown}")),
        }
    }

    /// The CA and client certificate for redis-rs; `None` when neither is set.
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        self.is_set().then(|| redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.to_vec(),
                    client_key: key.to_vec(),
                }),
            root_cert: self.ca.as_ref().map(|ca| ca.to_vec()),
        })
    }
}

/// Whether `pem` holds at least one PEM certificate, and every certificate
/// block in it decodes: without one, redis-rs trusts no certificate at all
/// and every handshake fails with an unknown issuer.
fn holds_pem_certificate(pem: &[u8]) -> bool {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut certs = CertificateDer::pem_slice_iter(pem).peekable();
    certs.peek().is_some() && certs.all(|cert| cert.is_ok())
}

/// `url` without its password, for messages; an error if it has a fragment
/// (a part after `#`), which a Redis URL cannot carry: it cannot turn off
/// certificate verification, and in a password it is a `#` left unescaped.
fn no_fragment(url: &str) -> Result<String> {
    let shown = redact_url(url);
    if url.contains('#') {
        bail!(
            "the Redis URL {shown} has a fragment (a part after `#`), which a Redis URL cannot \
             carry (it cannot turn off certificate verification either); a `#` in a password \
             must be written %23"
        );
    }
    Ok(shown)
}

/// How long an administrative command may take, unless `--timeout` says.
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A duration such as `1s`, `500ms`, `250us`, `2m`; bare numbers are
/// milliseconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms or 2s"))?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "" | "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        other => return Err(format!("unknown unit `{other}` (use ns, us, ms, s or m)")),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|e| format!("`{s}`: {e}"))
}

/// `--redis-url`, `--redis-cluster` or `--redis-sentinel`, one of them
/// required: for the commands that only make sense against Redis (`stats`,
/// `inspect`, the lab's child processes). Which one when several are given
/// (a flag, say, and another target's variable) is for [`RedisArgs`] to
/// say: the group cannot tell a flag from a variable.
#[derive(Clone, Debug, Args)]
#[group(required = true, multiple = true)]
pub(crate) struct RedisUrlArgs {
    /// The Redis server (rediss:// for TLS)
    #[arg(long, value_name = "URL", env = REDIS_URL_ENV, hide_env_values = true)]
    pub(crate) redis_url: Option<SecretUrl>,
    /// The nodes of a Redis Cluster (any of them will do; the others are
    /// discovered), comma-separated or repeated
    #[arg(
        long,
        value_name = "URL,…",
        value_delimiter = ',',
        env = REDIS_CLUSTER_ENV,
        hide_env_values = true
    )]
    pub(crate) redis_cluster: Vec<SecretUrl>,
    /// The sentinels of a Redis Sentinel deployment (give them all; with
    /// --sentinel-master), comma-separated or repeated: cachet uses the
    /// primary they name
    #[arg(
        long,
        value_name = "URL,…",
        value_delimiter = ',',
        env = REDIS_SENTINEL_ENV,
        hide_env_values = true
    )]
    pub(crate) redis_sentinel: Vec<SecretUrl>,
}

/// `--redis-url`, `--redis-cluster` or `--redis-sentinel` ([`RedisUrlArgs`]),
/// the Sentinel flags, and the TLS flags, as parsed.
#[derive(Clone, Debug, Args)]
#[group(id = "RedisArgs")]
struct RedisFlags {
    #[command(flatten)]
    at: RedisUrlArgs,
    #[command(flatten)]
    sentinel: SentinelArgs,
    #[command(flatten)]
    tls: RedisTlsArgs,
}

/// A kind of target: its argument, flag and variable.
#[derive(Debug)]
struct TargetKind {
    id: &'static str,
    flag: &'static str,
    env: &'static str,
}

/// The kinds of target, in the order of [`RedisUrlArgs`].
const TARGET_KINDS: [TargetKind; 3] = [
    TargetKind {
        id: "redis_url",
        flag: "--redis-url",
        env: REDIS_URL_ENV,
    },
    TargetKind {
        id: "redis_cluster",
        flag: "--redis-cluster",
        env: REDIS_CLUSTER_ENV,
    },
    TargetKind {
        id: "redis_sentinel",
        flag: "--redis-sentinel",
        env: REDIS_SENTINEL_ENV,
    },
];

/// The arguments of [`SentinelArgs`], which apply to a Sentinel target only.
const SENTINEL_IDS: [&str; 4] = [
    "sentinel_master",
    "sentinel_db",
    "sentinel_node_user",
    "sentinel_node_password",
];

/// Where an argument's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The command line.
    Typed,
    /// Its environment variable.
    Env,
    /// Its environment variable, set to nothing but blanks: as if unset.
    BlankEnv,
}

/// Where the value of argument `id` came from; `None` when it has none.
fn source_of(matches: &ArgMatches, id: &str) -> Option<Source> {
    match matches.value_source(id)? {
        ValueSource::CommandLine => Some(Source::Typed),
        ValueSource::EnvVariable => {
            let blank = matches
                .get_raw(id)
                .is_none_or(|mut values| values.all(|v| v.to_string_lossy().trim().is_empty()));
            Some(if blank { Source::BlankEnv } else { Source::Env })
        }
        _ => None,
    }
}

/// Where each target argument's value came from, read before parsing takes
/// the values out of the matches.
#[derive(Debug)]
struct Sources {
    kinds: [Option<Source>; 3],
    sentinel: [Option<Source>; 4],
}

impl Sources {
    fn of(matches: &ArgMatches) -> Self {
        Self {
            kinds: TARGET_KINDS.each_ref().map(|k| source_of(matches, k.id)),
            sentinel: SENTINEL_IDS.map(|id| source_of(matches, id)),
        }
    }
}

/// `--redis-url`, `--redis-cluster` or `--redis-sentinel` ([`RedisUrlArgs`]),
/// the Sentinel flags, and the TLS flags, each of them also given by a
/// variable. A flag on the command line wins over the environment: a
/// variable of another kind of target is ignored, and so are the Sentinel
/// variables when the target is not a Sentinel one. Two kinds typed, or two
/// from the environment and none typed, are refused.
#[derive(Clone, Debug)]
pub(crate) struct RedisArgs {
    flags: RedisFlags,
    /// How the target was given, for messages: its flag or its variable.
    named: Option<&'static str>,
}

impl Args for RedisArgs {
    fn group_id() -> Option<clap::Id> {
        RedisFlags::group_id()
    }

    fn augment_args(cmd: clap::Command) -> clap::Command {
        RedisFlags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        RedisFlags::augment_args_for_update(cmd)
    }
}

impl FromArgMatches for RedisArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        let sources = Sources::of(matches);
        let mut args = Self {
            flags: RedisFlags::from_arg_matches_mut(matches)?,
            named: None,
        };
        args.resolve(&sources)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.update_from_arg_matches_mut(&mut matches.clone())
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        let sources = Sources::of(matches);
        self.flags.update_from_arg_matches_mut(matches)?;
        self.resolve(&sources)
    }
}

impl RedisArgs {
    /// Keeps the one target the command line and the environment name, and
    /// drops the variables that do not apply to it.
    fn resolve(&mut self, sources: &Sources) -> Result<(), clap::Error> {
        let given = |wanted: Source| -> Vec<usize> {
            (0..TARGET_KINDS.len())
                .filter(|&i| sources.kinds[i] == Some(wanted))
                .collect()
        };
        let (typed, from_env) = (given(Source::Typed), given(Source::Env));
        let chosen = match (typed.as_slice(), from_env.as_slice()) {
            ([one], _) => Some((*one, TARGET_KINDS[*one].flag)),
            ([], [one]) => Some((*one, TARGET_KINDS[*one].env)),
            ([], []) => None,
            ([], several) => {
                let names: Vec<&str> = several.iter().map(|&i| TARGET_KINDS[i].env).collect();
                let (names, all, one) = match names.as_slice() {
                    [first, second] => (format!("{first} and {second}"), "both", "one"),
                    [rest @ .., last] => (
                        format!("{}, and {last}", rest.join(", ")),
                        "all",
                        "all but one",
                    ),
                    [] => unreachable!("several variables"),
                };
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{names} are {all} set, and each names a Redis to use: unset {one}, or \
                         give the target with a flag, which overrides them"
                    ),
                ));
            }
            (several, _) => {
                let names: Vec<&str> = several.iter().map(|&i| TARGET_KINDS[i].flag).collect();
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{} cannot be used together: give one of --redis-url, --redis-cluster \
                         and --redis-sentinel",
                        names.join(" and ")
                    ),
                ));
            }
        };
        // What is left: variables of the other kinds, and blank ones.
        let at = &mut self.flags.at;
        for (i, kind) in TARGET_KINDS.iter().enumerate() {
            if chosen.is_some_and(|(c, _)| c == i) || sources.kinds[i] == Some(Source::Typed) {
                continue;
            }
            match kind.id {
                "redis_url" => at.redis_url = None,
                "redis_cluster" => at.redis_cluster.clear(),
                _ => at.redis_sentinel.clear(),
            }
        }
        if chosen.is_none_or(|(c, _)| TARGET_KINDS[c].id != "redis_sentinel") {
            let sentinel = &mut self.flags.sentinel;
            for (id, source) in SENTINEL_IDS.iter().zip(sources.sentinel) {
                if source == Some(Source::Typed) {
                    continue;
                }
                match *id {
                    "sentinel_master" => sentinel.sentinel_master = None,
                    "sentinel_db" => sentinel.sentinel_db = None,
                    "sentinel_node_user" => sentinel.sentinel_node_user = None,
                    _ => sentinel.sentinel_node_password = None,
                }
            }
        }
        self.named = chosen.map(|(_, name)| name);
        Ok(())
    }
}

/// The flags of a command that asks Redis and waits for its answers
/// (`stats`, `inspect`): where Redis is, and how long to wait.
#[derive(Clone, Debug, Args)]
pub(crate) struct AdminArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// How long connecting, and each command, may take (e.g. 500ms, 10s)
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_timeout)]
    timeout: Duration,
}

impl AdminArgs {
    /// The target these flags name, its administrative calls bounded by
    /// `--timeout`.
    pub(crate) fn target(&self) -> Result<RedisTarget> {
        let mut target = self.redis.target()?;
        target.admin_timeout = self.timeout;
        Ok(target)
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&d) {
        return Err("give 1ms to 1h".to_owned());
    }
    Ok(d)
}

/// What goes with `--redis-sentinel`: the primary's name and database, and
/// the data nodes' credentials.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct SentinelArgs {
    /// The name the sentinels of --redis-sentinel know the primary by
    #[arg(long, value_name = "NAME", env = SENTINEL_MASTER_ENV)]
    sentinel_master: Option<String>,
    /// The database on the primary that --redis-sentinel names [default: 0]
    #[arg(long, value_name = "N", env = SENTINEL_DB_ENV)]
    sentinel_db: Option<u32>,
    /// The ACL user for the data nodes behind --redis-sentinel (with
    /// --sentinel-node-password) [default: the default user]
    #[arg(long, value_name = "NAME", env = SENTINEL_NODE_USER_ENV)]
    sentinel_node_user: Option<String>,
    /// The password for the data nodes behind --redis-sentinel (the
    /// sentinels' own credentials go in their URLs)
    #[arg(
        long,
        value_name = "PASSWORD",
        env = SENTINEL_NODE_PASSWORD_ENV,
        hide_env_values = true
    )]
    sentinel_node_password: Option<Secret>,
}

impl RedisArgs {
    /// The target these flags name.
    pub(crate) fn target(&self) -> Result<RedisTarget> {
        self.given()?.with_context(|| {
            format!(
                "give --redis-url, --redis-cluster or --redis-sentinel (or set {REDIS_URL_ENV}, \
                 {REDIS_CLUSTER_ENV} or {REDIS_SENTINEL_ENV})"
            )
        })
    }

    /// The target these flags name, if they name one (`lab` and `bench`,
    /// which flatten them with their URL group made optional).
    pub(crate) fn given(&self) -> Result<Option<RedisTarget>> {
        let RedisFlags { at, sentinel, tls } = &self.flags;
        RedisTarget::from_all_flags(
            at.redis_url.as_deref(),
            &at.redis_cluster,
            &at.redis_sentinel,
            sentinel,
            tls,
            self.named.unwrap_or("--redis-sentinel"),
        )
    }
}

impl SentinelArgs {
    /// The target of `sentinels` (given with `named`, `--redis-sentinel` or
    /// its variable), or, with none, a check that no Sentinel flag was given.
    fn target(
        &self,
        sentinels: &[SecretUrl],
        tls: &RedisTlsArgs,
        named: &str,
    ) -> Result<Option<RedisTarget>> {
        if !sentinels.is_empty() {
            let master = self.sentinel_master.as_deref().with_context(|| {
                format!("give --sentinel-master (or {SENTINEL_MASTER_ENV}) with {named}")
            })?;
            let db = self.sentinel_db.unwrap_or(0);
            let node_auth = match (&self.sentinel_node_user, &self.sentinel_node_password) {
                (user, Some(password)) => Some(NodeAuth {
                    user: user.clone().unwrap_or_default(),
                    password: password.clone(),
                }),
                (Some(_), None) => {
                    bail!("--sentinel-node-user needs --sentinel-node-password")
                }
                (None, None) => None,
            };
            return RedisTarget::sentinel(sentinels, master, db, node_auth, tls).map(Some);
        }
        if self.sentinel_db.is_some() {
            bail!(
                "--sentinel-db goes with --redis-sentinel; on one server the database is in the \
                 URL (redis://host:6379/3)"
            );
        }
        if self.sentinel_node_user.is_some() || self.sentinel_node_password.is_some() {
            bail!(
                "--sentinel-node-user and --sentinel-node-password go with --redis-sentinel; on \
                 one server or a cluster the credentials are in the URL \
                 (redis://user:password@host:6379/)"
            );
        }
        Ok(None)
    }
}

/// One Redis server, the seed nodes of a Redis Cluster, or the sentinels of a
/// primary and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Server(SecretUrl),
    Cluster(Vec<SecretUrl>),
    Sentinel {
        sentinels: Vec<SecretUrl>,
        master: String,
        /// The database on the primary.
        db: u32,
        /// The credentials for the data nodes; `None`: none.
        node_auth: Option<NodeAuth>,
    },
}

/// Where Redis is, and how to reach it over TLS. Its `Debug` shows no
/// password.
#[derive(Clone)]
pub(crate) struct RedisTarget {
    pub(crate) endpoint: Endpoint,
    tls: Tls,
    /// What bounds connecting and each command of the administrative
    /// connections ([`admin_store`](Self::admin_store), [`Node::connect`]).
    admin_timeout: Duration,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls.args)
            .finish()
    }
}

/// One server behind a target: the server itself, or a master of the cluster.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port`, as the server or `CLUSTER NODES` names it.
    pub(crate) addr: String,
    /// A URL for it, with the scheme and credentials of the target's URL.
    pub(crate) url: String,
    tls: Tls,
    /// The target's administrative timeout.
    timeout: Duration,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.addr)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl RedisTarget {
    /// The server at `url`, without TLS settings.
    pub(crate) fn server(url: String) -> Self {
        Self {
            endpoint: Endpoint::Server(SecretUrl(url)),
            tls: Tls::default(),
            admin_timeout: ADMIN_TIMEOUT,
        }
    }

    /// The target of `--redis-url`, `--redis-cluster` or `--redis-sentinel`
    /// (at most one of them; the sentinels given with `named`, the flag or
    /// its variable) with the Sentinel and TLS flags; `None` when none is
    /// given.
    pub(crate) fn from_all_flags(
        url: Option<&str>,
        cluster: &[SecretUrl],
        sentinels: &[SecretUrl],
        sentinel: &SentinelArgs,
        tls: &RedisTlsArgs,
        named: &str,
    ) -> Result<Option<Self>> {
        if !sentinels.is_empty() && (url.is_some() || !cluster.is_empty()) {
            bail!("give one of --redis-url, --redis-cluster and --redis-sentinel");
        }
        match sentinel.target(sentinels, tls, named)? {
            Some(target) => Ok(Some(target)),
            None => Self::from_flags(url, cluster, tls),
        }
    }

    /// The target of `--redis-url URL` or `--redis-cluster URL,…` and the TLS
    /// flags; `None` when neither URL flag is given.
    pub(crate) fn from_flags<S: AsRef<str>>(
        url: Option<&str>,
        cluster: &[S],
        tls: &RedisTlsArgs,
    ) -> Result<Option<Self>> {
        let nodes: Vec<SecretUrl> = cluster
            .iter()
            .map(|u| u.as_ref().trim())
            .filter(|u| !u.is_empty())
            .map(|u| SecretUrl(u.to_owned()))
            .collect();
        let endpoint = match (url, nodes.is_empty()) {
            (Some(_), false) => bail!("give either --redis-url or --redis-cluster, not both"),
            (Some(url), true) => Endpoint::Server(SecretUrl(url.to_owned())),
            (None, false) => Endpoint::Cluster(nodes),
            (None, true) if !cluster.is_empty() => {
                bail!("--redis-cluster needs the URL of at least one node")
            }
            (None, true) => return Ok(None),
        };
        match &endpoint {
            Endpoint::Server(url) => no_fragment(url).map(drop)?,
            Endpoint::Cluster(urls) => urls.iter().try_for_each(|u| no_fragment(u).map(drop))?,
            Endpoint::Sentinel { .. } => {}
        }
        Ok(Some(Self {
            endpoint,
            tls: Tls::load(tls)?,
            admin_timeout: ADMIN_TIMEOUT,
        }))
    }

    /// The primary that `sentinels` name `master` (`--redis-sentinel`,
    /// `--sentinel-master`), its database `db` (`--sentinel-db`) and
    /// credentials (`--sentinel-node-user`, `--sentinel-node-password`), with
    /// the TLS flags.
    pub(crate) fn sentinel(
        sentinels: &[SecretUrl],
        master: &str,
        db: u32,
        node_auth: Option<NodeAuth>,
        tls: &RedisTlsArgs,
    ) -> Result<Self> {
        let sentinels: Vec<SecretUrl> = sentinels
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| SecretUrl(u.to_owned()))
            .collect();
        if sentinels.is_empty() || master.trim().is_empty() {
            bail!(
                "--redis-sentinel needs the URL of at least one sentinel, and --sentinel-master a name"
            );
        }
        for url in &sentinels {
            no_fragment(url)?;
        }
        Ok(Self {
            endpoint: Endpoint::Sentinel {
                sentinels,
                master: master.trim().to_owned(),
                db,
                node_auth,
            },
            tls: Tls::load(tls)?,
            admin_timeout: ADMIN_TIMEOUT,
        })
    }

    /// The URL of a single server; `None` for a cluster or Sentinel.
    pub(crate) fn server_url(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Server(url) => Some(url),
            Endpoint::Cluster(_) | Endpoint::Sentinel { .. } => None,
        }
    }

    /// Whether TLS files (a CA, a client certificate) were given.
    pub(crate) fn has_tls_files(&self) -> bool {
        self.tls.is_set()
    }

    /// `redis`, `redis-cluster` or `redis-sentinel`, for the lab's rows.
    pub(crate) fn kind(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Server(_) => "redis",
            Endpoint::Cluster(_) => "redis-cluster",
            Endpoint::Sentinel { .. } => "redis-sentinel",
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.endpoint, Endpoint::Cluster(_))
    }

    /// The target for messages, without passwords.
    pub(crate) fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Server(url) => redact_url(url),
            Endpoint::Cluster(urls) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("cluster {}", urls.join(","))
            }
            Endpoint::Sentinel {
                sentinels,
                master,
                db,
                ..
            } => {
                let urls: Vec<String> = sentinels.iter().map(|u| redact_url(u)).collect();
                let db = if *db == 0 {
                    String::new()
                } else {
                    format!(" (db {db})")
                };
                format!("sentinel master {master}{db} via {}", urls.join(","))
            }
        }
    }

    /// A store builder for this target, with the library's defaults.
    pub(crate) fn builder(&self) -> RedisStoreBuilder {
        let builder = match &self.endpoint {
            Endpoint::Server(url) => RedisStore::builder(url.to_string()),
            Endpoint::Cluster(urls) => {
                RedisStore::cluster_builder(urls.iter().map(|u| u.to_string()))
            }
            Endpoint::Sentinel {
                sentinels,
                master,
                db,
                node_auth,
            } => {
                let builder = RedisStore::sentinel_builder(
                    sentinels.iter().map(|u| u.to_string()),
                    master.clone(),
                )
                .node_database(*db);
                match node_auth {
                    Some(auth) => builder.node_auth(auth.user.clone(), auth.password.0.clone()),
                    None => builder,
                }
            }
        };
        self.tls.apply(builder)
    }

    /// A store builder for one more connection to a target whose settings were
    /// already checked (by the first connection of a run): without the
    /// eviction check, which would repeat its warnings for every connection.
    pub(crate) fn another(&self) -> RedisStoreBuilder {
        self.builder().eviction_check(false)
    }

    /// Connects `builder` (made from [`builder`](Self::builder)). The library's
    /// error names what it could not connect to: the server or cluster (without
    /// a password), the Sentinel master, or the setting that is wrong.
    pub(crate) async fn connect(&self, builder: RedisStoreBuilder) -> Result<RedisStore> {
        Ok(builder.connect().await?)
    }

    /// The first connection of a run: a store with the library's defaults, whose
    /// eviction check warns about settings that weaken the guarantees. On a
    /// cluster the library's check cannot read the settings (it asks one
    /// `INFO` of the cluster connection, which answers for every master at
    /// once), so each master is checked through a connection of its own.
    pub(crate) async fn connect_checked(&self) -> Result<RedisStore> {
        match &self.endpoint {
            Endpoint::Server(_) | Endpoint::Sentinel { .. } => self.connect(self.builder()).await,
            Endpoint::Cluster(_) => {
                let store = self.connect(self.another()).await?;
                for node in self.masters(&store.connection()).await? {
                    // Connecting runs the check; the store is not needed after.
                    let checked = node.builder().invalidation_bus(false).connect().await;
                    if let Err(e) = checked {
                        tracing::warn!(node = %node.addr, error = %cachet::Report(&e),
                            "cannot check the eviction settings of a cluster node");
                    }
                }
                Ok(store)
            }
        }
    }

    /// A bare redis-rs connection to this cluster, with the target's TLS
    /// settings, which routes each command by the slot of its key: the
    /// baseline that `cachet bench` measures a cache on a cluster against.
    pub(crate) async fn cluster_connection(
        &self,
    ) -> Result<redis::cluster_async::ClusterConnection> {
        let Endpoint::Cluster(urls) = &self.endpoint else {
            bail!("{} is not a Redis Cluster", self.describe());
        };
        for url in urls {
            no_fragment(url)?;
        }
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(urls.iter().map(|u| u.to_string()))
                .connection_timeout(self.admin_timeout)
                .response_timeout(self.admin_timeout);
        if let Some(certs) = self.tls.certificates() {
            builder = builder.certs(certs);
        }
        let client = builder
            .build()
            .with_context(|| format!("invalid Redis Cluster URLs {}", self.describe()))?;
        client
            .get_async_connection()
            .await
            .with_context(|| format!("cannot connect to Redis at {}", self.describe()))
    }

    /// A store for administrative commands: no invalidation bus, no eviction
    /// warning at connect, the administrative timeout.
    pub(crate) async fn admin_store(&self) -> Result<RedisStore> {
        self.connect(self.admin(self.builder())).await
    }

    /// `builder` (of this target or one of its servers) with the settings of
    /// an administrative store ([`admin_store`](Self::admin_store)).
    pub(crate) fn admin(&self, builder: RedisStoreBuilder) -> RedisStoreBuilder {
        builder
            .invalidation_bus(false)
            .eviction_check(false)
            .response_timeout(self.admin_timeout)
            .connection_timeout(self.admin_timeout)
    }

    /// The flags of this target on a command line of the lab's child
    /// processes: its TLS files. The URLs, which may hold a password, go in
    /// the child's environment ([`child_env`](Self::child_env)).
    pub(crate) fn child_args(&self) -> Vec<String> {
        let RedisTlsArgs {
            redis_ca,
            redis_cert,
            redis_key,
        } = &self.tls.args;
        let mut args = Vec::new();
        for (flag, path) in [
            ("--redis-ca", redis_ca),
            ("--redis-cert", redis_cert),
            ("--redis-key", redis_key),
        ] {
            if let Some(path) = path {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        args
    }

    /// The environment that names this target to a child process
    /// (`CACHET_REDIS_URL`, `CACHET_REDIS_CLUSTER`, or `CACHET_REDIS_SENTINEL`
    /// and `CACHET_SENTINEL_MASTER`), removing the others'.
    pub(crate) fn child_env(&self) -> ChildEnv {
        let joined = |urls: &[SecretUrl]| {
            let urls: Vec<&str> = urls.iter().map(|u| &**u).collect();
            urls.join(",")
        };
        let mut vars = ChildEnv(vec![
            (REDIS_URL_ENV, None),
            (REDIS_CLUSTER_ENV, None),
            (REDIS_SENTINEL_ENV, None),
            (SENTINEL_MASTER_ENV, None),
            (SENTINEL_DB_ENV, None),
            (SENTINEL_NODE_USER_ENV, None),
            (SENTINEL_NODE_PASSWORD_ENV, None),
        ]);
        let mut set = |name: &str, value: String| {
            if let Some((_, slot)) = vars.0.iter_mut().find(|(n, _)| *n == name) {
                *slot = Some(value);
            }
        };
        match &self.endpoint {
            Endpoint::Server(url) => set(REDIS_URL_ENV, url.to_string()),
            Endpoint::Cluster(urls) => set(REDIS_CLUSTER_ENV, joined(urls)),
            Endpoint::Sentinel {
                sentinels,
                master,
                db,
                node_auth,
            } => {
                set(REDIS_SENTINEL_ENV, joined(sentinels));
                set(SENTINEL_MASTER_ENV, master.clone());
                set(SENTINEL_DB_ENV, db.to_string());
                if let Some(auth) = node_auth {
                    set(SENTINEL_NODE_USER_ENV, auth.user.clone());
                    set(SENTINEL_NODE_PASSWORD_ENV, auth.password.0.clone());
                }
            }
        }
        vars
    }

    /// The servers behind this target: the server, every master of the
    /// cluster as `CLUSTER NODES` (sent through `conn`, a connection of a store
    /// on this target) lists them, or the primary the sentinels name now
    /// (reached with the scheme of the first sentinel's URL and the data nodes'
    /// credentials, as the store reaches it).
    pub(crate) async fn masters(&self, conn: &RedisConnection) -> Result<Vec<Node>> {
        match &self.endpoint {
            Endpoint::Server(url) => Ok(vec![Node {
                addr: host_port(url).unwrap_or_else(|| redact_url(url)),
                url: url.to_string(),
                tls: self.tls.clone(),
                timeout: self.admin_timeout,
            }]),
            Endpoint::Cluster(urls) => {
                let seed = urls.first().context("a cluster target without URLs")?;
                let mut conn = conn.clone();
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
                    .with_context(|| format!("cannot list the nodes of {}", self.describe()))?;
                let nodes: Vec<Node> = cluster_masters(&text)
                    .into_iter()
                    .map(|(host, port)| Node {
                        addr: format!("{host}:{port}"),
                        url: with_host_port(seed, &host, port),
                        tls: self.tls.clone(),
                        timeout: self.admin_timeout,
                    })
                    .collect();
                if nodes.is_empty() {
                    bail!(
                        "{} lists no master in CLUSTER NODES:\n{text}",
                        self.describe()
                    );
                }
                Ok(nodes)
            }
            Endpoint::Sentinel {
                sentinels,
                master,
                db,
                node_auth,
            } => {
                let (host, port) = self.primary_of(sentinels, master).await?;
                let seed = sentinels
                    .first()
                    .context("a Sentinel target without URLs")?;
                let url = with_db(&with_host_port(seed, &host, port), *db);
                Ok(vec![Node {
                    addr: format!("{host}:{port}"),
                    url: with_credentials(&url, node_auth.as_ref()),
                    tls: self.tls.clone(),
                    timeout: self.admin_timeout,
                }])
            }
        }
    }

    /// The primary's address, from the first sentinel that names one
    /// (`SENTINEL get-master-addr-by-name`).
    async fn primary_of(&self, sentinels: &[SecretUrl], master: &str) -> Result<(String, u16)> {
        let mut last = None;
        for url in sentinels {
            let sentinel = Node {
                addr: host_port(url).unwrap_or_else(|| redact_url(url)),
                url: url.to_string(),
                tls: self.tls.clone(),
                timeout: self.admin_timeout,
            };
            let asked = async {
                let mut conn = sentinel.connect().await?;
                let addr: Option<(String, String)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(master)
                    .query_async(&mut conn)
                    .await?;
                let (host, port) = addr.context("it knows no such master")?;
                Ok::<_, anyhow::Error>((host, port.parse().context("a port that is not a number")?))
            };
            match asked.await {
                Ok(found) => return Ok(found),
                Err(e) => last = Some(e.context(format!("sentinel {}", sentinel.addr))),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no sentinel given"))
            .context(format!("no sentinel names the primary {master:?}")))
    }
}

impl Node {
    /// A store builder for this server alone, with the target's TLS settings.
    pub(crate) fn builder(&self) -> RedisStoreBuilder {
        self.tls.apply(RedisStore::builder(self.url.clone()))
    }

    /// A plain connection of its own to this server (no cluster routing), for
    /// commands about the server itself.
    pub(crate) async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        let shown = redact_url(&self.url);
        let client = self.tls.client(&self.url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("cannot connect to the Redis server at {shown}"))
    }
}

/// The masters of `CLUSTER NODES` output that are up, as (host, port).
fn cluster_masters(text: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"))
        {
            continue;
        }
        // `host:port@cport[,hostname]`
        let addr = addr.split([',', '@']).next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        if let (false, Ok(port)) = (host.is_empty(), port.parse::<u16>()) {
            out.push((host.to_owned(), port));
        }
    }
    out
}

/// The `host:port` of a URL, if it has one.
fn host_port(url: &str) -> Option<String> {
    let (start, end) = authority(url)?;
    let authority = &url[start..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_owned())
}

/// The byte range of a URL's host and port (after any `user:pass@`).
fn authority(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = start + rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    Some((host_start, end))
}

/// `url` with its path set to database `db`, unless `db` is 0.
fn with_db(url: &str, db: u32) -> String {
    match authority(url) {
        Some((_, end)) if db != 0 => format!("{}/{db}", &url[..end]),
        _ => url.to_owned(),
    }
}

/// `url` with its host and port replaced, keeping scheme, credentials and path.
fn with_host_port(url: &str, host: &str, port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    match authority(url) {
        Some((start, end)) => format!("{}{host}:{port}{}", &url[..start], &url[end..]),
        None => format!("redis://{host}:{port}/"),
    }
}

/// `url` with the credentials `auth` (percent-encoded) in place of its own,
/// or without any when `auth` is `None`.
fn with_credentials(url: &str, auth: Option<&NodeAuth>) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let Some((host_start, _)) = authority(url) else {
        return url.to_owned();
    };
    let userinfo = auth.map_or_else(String::new, |auth| {
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!("{}:{}@", encode(&auth.user), encode(&auth.password.0))
    });
    format!("{}{userinfo}{}", &url[..scheme_end], &url[host_start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_must_hold_a_certificate() {
        let cert = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(holds_pem_certificate(cert));
        let crlf = b"-----BEGIN CERTIFICATE-----\r\nMIIB\r\n-----END CERTIFICATE-----\r\n";
        assert!(holds_pem_certificate(crlf));
        let bundle = [&b"# roots\n"[..], cert, cert].concat();
        assert!(holds_pem_certificate(&bundle));
        assert!(!holds_pem_certificate(b""));
        assert!(!holds_pem_certificate(b"not a certificate\n"));
        let key = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        assert!(!holds_pem_certificate(key));
        assert!(!holds_pem_certificate(
            b"-----BEGIN CERTIFICATE-----\nMIIB\n"
        ));
    }

    #[test]
    fn flags_name_one_target() {
        let tls = RedisTlsArgs::default();
        let endpoint = |url: Option<&str>, nodes: &[String]| {
            RedisTarget::from_flags(url, nodes, &tls)
                .unwrap()
                .map(|t| t.endpoint)
        };
        assert_eq!(endpoint(None, &[]), None);
        assert_eq!(
            endpoint(Some("redis://a:1/"), &[]),
            Some(Endpoint::Server(SecretUrl("redis://a:1/".into())))
        );
        let nodes = vec!["redis://a:1/".to_owned(), " ".to_owned()];
        assert_eq!(
            endpoint(None, &nodes),
            Some(Endpoint::Cluster(vec![SecretUrl("redis://a:1/".into())]))
        );
        assert!(RedisTarget::from_flags(None, &[String::new()], &tls).is_err());
        assert!(RedisTarget::from_flags(Some("redis://a:1/"), &nodes, &tls).is_err());
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let text = "\
            56a2 127.0.0.1:7102@17102 master - 0 1 2 connected 5461-10922\n\
            f275 127.0.0.1:7103@17103,host-c myself,master - 0 0 3 connected 10923-16383\n\
            92d1 127.0.0.1:7101@17101 slave 56a2 0 1 1 connected\n\
            aaaa 127.0.0.1:7104@17104 master,fail - 0 1 4 disconnected\n\
            bbbb ::1:7105@17105 master - 0 1 5 connected 0-5460\n";
        assert_eq!(
            cluster_masters(text),
            vec![
                ("127.0.0.1".to_owned(), 7102),
                ("127.0.0.1".to_owned(), 7103),
                ("::1".to_owned(), 7105)
            ]
        );
    }

    #[test]
    fn node_urls_keep_scheme_and_credentials() {
        assert_eq!(
            with_host_port("redis://:pw@seed:1/0", "10.0.0.2", 7000),
            "redis://:pw@10.0.0.2:7000/0"
        );
        assert_eq!(
            with_host_port("rediss://seed:1", "::1", 7000),
            "rediss://[::1]:7000"
        );
        assert_eq!(host_port("redis://u:p@h:6379/"), Some("h:6379".into()));
    }

    #[test]
    fn targets_never_show_a_password_and_children_get_urls_by_environment() {
        let tls = RedisTlsArgs {
            redis_ca: Some("/tls/ca.crt".into()),
            ..RedisTlsArgs::default()
        };
        let err = RedisTarget::from_flags(Some("rediss://:hunter2@h:1/"), &[] as &[String], &tls)
            .unwrap_err();
        assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
        assert!(
            format!("{err:#}").contains("--redis-ca /tls/ca.crt"),
            "{err:#}"
        );
        let cluster = vec![
            "redis://:hunter2@a:1/".to_owned(),
            "redis://b:2/".to_owned(),
        ];
        for target in [
            RedisTarget::from_flags(
                Some("redis://:hunter2@h:1/"),
                &[] as &[String],
                &RedisTlsArgs::default(),
            ),
            RedisTarget::from_flags(None, &cluster, &RedisTlsArgs::default()),
        ] {
            let target = target.unwrap().unwrap();
            for shown in [
                format!("{target:?}"),
                target.describe(),
                target.child_args().join(" "),
            ] {
                assert!(!shown.contains("hunter2"), "{shown}");
            }
            assert!(format!("{:?}", target.child_env()).contains("CACHET_REDIS"));
            assert!(!format!("{:?}", target.child_env()).contains("hunter2"));
            let env = target.child_env().0;
            assert!(
                env.iter()
                    .any(|(_, v)| v.as_deref().is_some_and(|v| v.contains("hunter2")))
            );
        }
        let node = Node {
            addr: "h:1".into(),
            url: "redis://:hunter2@h:1/".into(),
            tls: Tls::default(),
            timeout: ADMIN_TIMEOUT,
        };
        assert!(!format!("{node:?}").contains("hunter2"));
    }

    #[test]
    fn a_url_with_a_fragment_is_refused_in_terms_of_the_url() {
        let e = no_fragment("redis://:pa#ss@h:1/").unwrap_err().to_string();
        assert!(e.contains("fragment") && e.contains("%23"), "{e}");
        assert!(
            !e.contains("RedisStoreBuilder") && !e.contains("ss@"),
            "{e}"
        );
        let tls = RedisTlsArgs::default();
        for (url, nodes) in [
            (Some("redis://h:1/#insecure"), vec![]),
            (
                None,
                vec!["redis://a:1/".to_owned(), "redis://b:1/#x".to_owned()],
            ),
        ] {
            let e = RedisTarget::from_flags(url, &nodes, &tls).unwrap_err();
            assert!(e.to_string().contains("%23"), "{e}");
        }
        let sentinels = [SecretUrl("redis://s:26379/#insecure".into())];
        let e = RedisTarget::sentinel(&sentinels, "m", 0, None, &tls).unwrap_err();
        assert!(e.to_string().contains("%23"), "{e}");
    }

    #[test]
    fn two_target_flags_typed_are_refused() {
        let e = parse(&["--redis-url", "redis://h/", "--redis-cluster", "redis://c/"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--redis-url and --redis-cluster"), "{e}");
    }

    /// A command line of the Redis flags alone.
    #[derive(clap::Parser)]
    struct RedisCli {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn parse(args: &[&str]) -> Result<RedisCli, clap::Error> {
        <RedisCli as clap::Parser>::try_parse_from(
            std::iter::once("cachet").chain(args.iter().copied()),
        )
    }

    /// The target those flags name.
    fn target_of(args: &[&str]) -> Result<RedisTarget> {
        parse(args).unwrap().redis.target()
    }

    #[test]
    fn sentinel_flags_name_the_sentinels_and_the_master() {
        let target = target_of(&[
            "--redis-sentinel",
            "redis://:hunter2@s1:26379/,redis://s2:26379/",
            "--sentinel-master",
            "mymaster",
        ])
        .unwrap();
        assert_eq!(target.kind(), "redis-sentinel");
        assert_eq!(target.server_url(), None);
        assert_eq!(
            target.describe(),
            "sentinel master mymaster via redis://:***@s1:26379/,redis://s2:26379/"
        );
        assert!(!format!("{target:?}").contains("hunter2"));
        let env = target.child_env().0;
        let var = |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(var(SENTINEL_MASTER_ENV).as_deref(), Some("mymaster"));
        assert_eq!(var(SENTINEL_DB_ENV).as_deref(), Some("0"));
        assert!(var(REDIS_SENTINEL_ENV).is_some_and(|v| v.contains("s2:26379")));
        assert_eq!(var(REDIS_URL_ENV), None);
        // The master's name is required, and one target at a time.
        let e = target_of(&["--redis-sentinel", "redis://s1:26379/"]);
        assert!(e.is_err());
        assert!(
            parse(&[
                "--redis-sentinel",
                "redis://s1/",
                "--redis-url",
                "redis://h/"
            ])
            .is_err()
        );
        // A database on the primary, given to children; only with sentinels.
        let target = target_of(&[
            "--redis-sentinel",
            "redis://s1:26379/",
            "--sentinel-master",
            "m",
            "--sentinel-db",
            "3",
        ])
        .unwrap();
        assert_eq!(
            target.describe(),
            "sentinel master m (db 3) via redis://s1:26379/"
        );
        let env = target.child_env().0;
        assert!(env.contains(&(SENTINEL_DB_ENV, Some("3".to_owned()))));
        let e = target_of(&["--redis-url", "redis://h/", "--sentinel-db", "3"]).unwrap_err();
        assert!(e.to_string().contains("--sentinel-db"), "{e}");
        // The data nodes' credentials: given to children, never shown; only
        // with sentinels, and a user only with a password.
        let with_user = [
            "--redis-sentinel",
            "redis://s1:26379/",
            "--sentinel-master",
            "m",
            "--sentinel-node-user",
            "app",
        ];
        let target =
            target_of(&[&with_user[..], &["--sentinel-node-password", "hunter2"]].concat())
                .unwrap();
        assert!(!format!("{target:?}").contains("hunter2"), "{target:?}");
        let env = target.child_env().0;
        assert!(env.contains(&(SENTINEL_NODE_USER_ENV, Some("app".to_owned()))));
        assert!(env.contains(&(SENTINEL_NODE_PASSWORD_ENV, Some("hunter2".to_owned()))));
        let e = target_of(&with_user).unwrap_err();
        assert!(e.to_string().contains("--sentinel-node-password"), "{e}");
        let e = target_of(&[
            "--redis-url",
            "redis://h/",
            "--sentinel-node-password",
            "pw",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--sentinel-node-password"), "{e}");
        // A server's own URL has no credentials of its own once the node's
        // are put in, and keeps its path.
        let auth = NodeAuth {
            user: String::new(),
            password: Secret("a@b".to_owned()),
        };
        assert_eq!(
            with_credentials("rediss://:old@h:1/2", Some(&auth)),
            "rediss://:a%40b@h:1/2"
        );
        assert_eq!(with_credentials("redis://:old@h:1/", None), "redis://h:1/");
        assert_eq!(with_db("redis://:pw@h:1/", 3), "redis://:pw@h:1/3");
        assert_eq!(with_db("redis://h:1/", 0), "redis://h:1/");
    }

    /// `CLIENT INFO` of a store on `target`, then of a connection to the
    /// master `masters` names.
    async fn client_infos(target: &RedisTarget) -> [String; 2] {
        let store = target.admin_store().await.unwrap();
        let node = &target.masters(&store.connection()).await.unwrap()[0];
        async fn info(mut conn: impl redis::aio::ConnectionLike) -> String {
            redis::cmd("CLIENT")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap()
        }
        [
            info(store.connection()).await,
            info(node.connect().await.unwrap()).await,
        ]
    }

    /// The value of `name=` in `CLIENT INFO` output.
    fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
        info.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sentinel_target_reaches_the_primary() {
        let sentinels = cachet_testkit::RedisSentinels::start();
        let urls: Vec<SecretUrl> = sentinels
            .sentinel_urls()
            .into_iter()
            .map(SecretUrl)
            .collect();
        let target = RedisTarget::sentinel(
            &urls,
            cachet_testkit::RedisSentinels::MASTER,
            0,
            None,
            &RedisTlsArgs::default(),
        )
        .unwrap();
        let store = target.admin_store().await.unwrap();
        let nodes = target.masters(&store.connection()).await.unwrap();
        let primary = sentinels.nodes()[0].port();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].addr, format!("127.0.0.1:{primary}"));
        let mut conn = nodes[0].connect().await.unwrap();
        let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
        assert!(format!("{role:?}").contains("master"), "{role:?}");
        // On another database: the store and the node both select it.
        let db3 = RedisTarget::sentinel(
            &urls,
            cachet_testkit::RedisSentinels::MASTER,
            3,
            None,
            &RedisTlsArgs::default(),
        )
        .unwrap();
        for info in client_infos(&db3).await {
            assert_eq!(field(&info, "db"), Some("3"), "{info}");
        }
        let unknown =
            RedisTarget::sentinel(&urls, "nosuch", 0, None, &RedisTlsArgs::default()).unwrap();
        let e = unknown.masters(&store.connection()).await.unwrap_err();
        assert!(format!("{e:#}").contains("nosuch"), "{e:#}");

        // The data nodes' own ACL user, whose password URLs would mangle
        // unless encoded; the sentinels still take none.
        let password = "p@ss:w/rd%";
        for node in sentinels.nodes() {
            let pass = format!(">{password}");
            node.command(&["ACL", "SETUSER", "app", "on", &pass, "~*", "&*", "+@all"]);
        }
        let parsed = target_of(&[
            "--redis-sentinel",
            &urls[0],
            "--sentinel-master",
            cachet_testkit::RedisSentinels::MASTER,
            "--sentinel-node-user",
            "app",
            "--sentinel-node-password",
            password,
        ])
        .unwrap();
        for info in client_infos(&parsed).await {
            assert_eq!(field(&info, "user"), Some("app"), "{info}");
        }
        let store = parsed.admin_store().await.unwrap();
        let node = &parsed.masters(&store.connection()).await.unwrap()[0];
        for shown in [
            format!("{parsed:?}"),
            format!("{node:?}"),
            parsed.describe(),
            format!("{:?}", parsed.child_env()),
        ] {
            assert!(!shown.contains(password), "{shown}");
        }
    }
}
