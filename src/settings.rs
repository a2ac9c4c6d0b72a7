//! Settings from `<config dir>/chatbridge.toml`, every key overridable from the
//! environment as `CHATBRIDGE__SECTION__KEY`. Loading validates the whole
//! file: unknown keys, wrong types and impossible values are errors naming
//! the file and the key, and secrets are held as [`SecretString`] so they
//! never reach a log line or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::domain::BusinessId;

pub const SETTINGS_FILE: &str = "chatbridge.toml";
pub const ROUTES_FILE: &str = "routes.toml";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `origin` is the file, or the environment variable the value came from.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl SettingsError {
    fn at(file: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            origin: file.display().to_string(),
            message: message.into(),
        }
    }

    /// Blames the variables that set `key`, whose value is the one in force;
    /// or, unless the file alone has the same mistake, those that set a key
    /// above or below it; else the file.
    fn blame(
        file: &Path,
        env: &[EnvOverride],
        key: Option<&str>,
        in_file: bool,
        message: String,
    ) -> Self {
        let Some(key) = key else {
            return Self::at(file, message);
        };
        let mut vars: Vec<&EnvOverride> = env.iter().filter(|o| o.key == key).collect();
        if vars.is_empty() && !in_file {
            vars = env
                .iter()
                .filter(|o| {
                    o.key.starts_with(&format!("{key}.")) || key.starts_with(&format!("{}.", o.key))
                })
                .collect();
        }
        Self::from_env(file, &vars, message)
    }

    fn from_env(file: &Path, vars: &[&EnvOverride], message: String) -> Self {
        let names: Vec<&str> = vars.iter().map(|o| o.var.as_str()).collect();
        match names.as_slice() {
            [] => Self::at(file, message),
            [one] => Self::Invalid {
                origin: format!("environment variable {one}"),
                message,
            },
            many => Self::Invalid {
                origin: format!("environment variables {}", many.join(", ")),
                message,
            },
        }
    }
}

/// Does a problem message name `key`: in full (`server.listen`), as its
/// `[table]`, or as a list of one table's keys ("dispatch.lease_secs and
/// claim_batch")?
fn names_key(message: &str, key: &str) -> bool {
    let Some((table, field)) = key.rsplit_once('.') else {
        return message.contains(key);
    };
    let is_word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let has_word = message.match_indices(field).any(|(at, _)| {
        let before = message[..at].chars().next_back();
        let after = message[at + field.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    });
    message.contains(key)
        || message.contains(&format!("[{table}]"))
        || (message.contains(&format!("{table}.")) && has_word)
}

/// A `CHATBRIDGE__A__B` variable and the key it sets (`a.b`).
struct EnvOverride {
    var: String,
    key: String,
}

/// The overrides in the environment, as the `config` crate reads them
/// (names are matched without regard to case; keys are lowercased).
fn env_overrides() -> Vec<EnvOverride> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter_map(|var| {
            let rest = var
                .get(..12)
                .filter(|p| p.eq_ignore_ascii_case("CHATBRIDGE__"))?;
            let key = var[rest.len()..].to_lowercase().replace("__", ".");
            Some(EnvOverride { var, key })
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub templates: TemplateSettings,
    pub market: MarketSettings,
    pub dispatch: DispatchSettings,
    pub admin: AdminSettings,
    pub sources: BTreeMap<String, SourceSettings>,
    pub log: LogSettings,
    /// The folder the settings were read from; `routes.toml` lives there too.
    #[serde(skip)]
    pub config_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: String,
    pub max_body_bytes: usize,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// How long in-flight requests and sends may take to finish on shutdown.
    pub shutdown_timeout_secs: u64,
    /// Reload routes, templates and settings when their files change.
    pub watch_config: bool,
    /// Deepest JSON nesting accepted in a webhook body.
    pub max_json_depth: usize,
    /// A client must send its whole request head within this time (else 408).
    pub client_request_timeout_ms: u64,
    /// A webhook's body must arrive within this time after its head (else 408).
    pub body_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    pub keep_alive_secs: u64,
    /// Open connections per worker; more wait in the listen backlog.
    pub max_connections: usize,
    /// Reverse proxies (IPs or CIDRs, e.g. "10.0.0.0/8") whose
    /// `X-Forwarded-Proto` is believed: the console marks its cookie
    /// `Secure` when such a proxy says the request came over HTTPS. Empty:
    /// no one's header is believed.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 262_144,
            workers: 0,
            shutdown_timeout_secs: 10,
            watch_config: true,
            max_json_depth: 32,
            client_request_timeout_ms: 5000,
            body_timeout_ms: 10_000,
            keep_alive_secs: 5,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// `sqlite://path/to/file.db` or `postgres://user:password@host:port/db`
    /// (a secret: it may carry a password; see `store::redact_url`).
    pub url: String,
    /// Finished events (and their deliveries and attempts) are deleted
    /// after this many days; until then a repeated event id is a duplicate.
    pub retention_days: u64,
    /// PostgreSQL: connections this process keeps open at most.
    pub pool_size: usize,
    /// PostgreSQL: how long to wait to connect, or for a free connection.
    pub connect_timeout_secs: u64,
    /// PostgreSQL: how often this process reads the queue's gauges for
    /// `/metrics` from the database (other instances change them too).
    pub gauge_refresh_ms: u64,
}

impl std::fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSettings")
            .field("url", &crate::store::redact_url(&self.url))
            .field("retention_days", &self.retention_days)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("gauge_refresh_ms", &self.gauge_refresh_ms)
            .finish()
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/chatbridge.db".into(),
            retention_days: 30,
            pool_size: 16,
            connect_timeout_secs: 5,
            gauge_refresh_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSettings {
    pub dir: PathBuf,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        Self {
            dir: "templates".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarketSettings {
    pub base_url: String,
    pub api_key: Option<SecretString>,
    /// Sends (`chats/message`) per business per quota window.
    pub hourly_limit: u32,
    /// `chats/new` calls (finding the chat of an order or return) per
    /// business per quota window: the Market counts them apart from sends.
    pub chats_new_hourly_limit: u32,
    pub quota_window_secs: u64,
    /// Requests at once per business, every method together.
    pub max_in_flight: usize,
    pub request_timeout_secs: u64,
    pub businesses: BTreeMap<String, BusinessSettings>,
    /// Campaign id → business id, for the Market's notifications (which
    /// name the campaign); a campaign not here is looked up with
    /// `GET /v2/campaigns/{id}` once and remembered in the store.
    pub campaigns: BTreeMap<String, i64>,
}

impl Default for MarketSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.partner.market.yandex.ru".into(),
            api_key: None,
            hourly_limit: 1000,
            chats_new_hourly_limit: 1000,
            quota_window_secs: 3600,
            max_in_flight: 4,
            request_timeout_secs: 10,
            businesses: BTreeMap::new(),
            campaigns: BTreeMap::new(),
        }
    }
}

/// Per-business overrides of `[market]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BusinessSettings {
    pub api_key: Option<SecretString>,
    pub hourly_limit: Option<u32>,
    pub chats_new_hourly_limit: Option<u32>,
    pub quota_window_secs: Option<u64>,
    pub max_in_flight: Option<usize>,
}

/// What the dispatcher applies to one business, overrides resolved.
#[derive(Clone)]
pub struct BusinessLimits {
    pub api_key: Option<SecretString>,
    pub hourly_limit: u32,
    pub chats_new_hourly_limit: u32,
    pub quota_window: Duration,
    pub max_in_flight: usize,
}

impl BusinessLimits {
    /// The hourly limit of one Market method.
    pub fn limit_of(&self, method: crate::domain::MarketMethod) -> u32 {
        match method {
            crate::domain::MarketMethod::SendMessage => self.hourly_limit,
            crate::domain::MarketMethod::CreateChat => self.chats_new_hourly_limit,
        }
    }
}

impl MarketSettings {
    /// The business `[market.campaigns]` names for a campaign.
    pub fn configured_campaign(&self, campaign: i64) -> Option<BusinessId> {
        self.campaigns
            .get(&campaign.to_string())
            .filter(|&&b| b >= 1)
            .map(|&b| BusinessId(b))
    }

    pub fn limits_for(&self, business: BusinessId) -> BusinessLimits {
        let own = self.businesses.get(&business.to_string());
        BusinessLimits {
            api_key: own
                .and_then(|b| b.api_key.clone())
                .or_else(|| self.api_key.clone())
                .filter(|k| !k.expose_secret().is_empty()),
            hourly_limit: own
                .and_then(|b| b.hourly_limit)
                .unwrap_or(self.hourly_limit),
            chats_new_hourly_limit: own
                .and_then(|b| b.chats_new_hourly_limit)
                .unwrap_or(self.chats_new_hourly_limit),
            quota_window: Duration::from_secs(
                own.and_then(|b| b.quota_window_secs)
                    .unwrap_or(self.quota_window_secs),
            ),
            max_in_flight: own
                .and_then(|b| b.max_in_flight)
                .unwrap_or(self.max_in_flight),
        }
    }
}

/// Retry policy and dispatcher pacing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// First retry delay after a 5xx, timeout or connection error; doubles each time.
    pub initial_backoff_secs: u64,
    /// Cap on the retry delay.
    pub max_backoff_secs: u64,
    /// A delivery still not sent this long after its event arrived is dead.
    pub max_age_secs: u64,
    /// How long a claimed delivery stays leased to a dispatcher; a crash frees it after this.
    pub lease_secs: u64,
    /// How often a held business (key refused) is tried again.
    pub held_retry_secs: u64,
    /// Wait after a 420 that names no window end.
    pub throttle_backoff_secs: u64,
    /// Deliveries claimed per business per round.
    pub claim_batch: usize,
    /// The longest the dispatcher waits without looking at the queue. Its
    /// own webhooks and sends wake it at once, and on PostgreSQL so does
    /// work accepted by another instance (LISTEN/NOTIFY); this is the
    /// fallback, and what notices a manual clock moved or a lease expired.
    pub poll_interval_ms: u64,
}

/// Below this, `dispatch.poll_interval_ms` would keep the dispatcher busy.
pub const MIN_POLL_INTERVAL_MS: u64 = 10;

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            initial_backoff_secs: 5,
            max_backoff_secs: 600,
            max_age_secs: 86_400,
            lease_secs: 60,
            held_retry_secs: 300,
            throttle_backoff_secs: 60,
            claim_batch: 16,
            poll_interval_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token for `/admin`; empty or absent turns the admin API off.
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// By hand, so that a wrong value gets the allowed ones rather than serde's
/// "enum LogFormat does not have variant constructor".
impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a log format; write \"text\" or \"json\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// What protocol a source speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// `POST /hooks/{source}`: our webhook format (signed or with a token).
    #[default]
    Webhook,
    /// `POST /hooks/{source}/notification`: the Market's push notifications.
    Market,
}

impl<'de> Deserialize<'de> for SourceKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "webhook" => Ok(Self::Webhook),
            "market" => Ok(Self::Market),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a source kind; write \"webhook\" or \"market\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    #[serde(default)]
    pub kind: SourceKind,
    /// Callers allowed (IPs or CIDRs); a market source needs it or
    /// `insecure = true`, since the Market does not sign notifications.
    #[serde(default)]
    pub allow_from: Vec<String>,
    #[serde(default)]
    pub secret: Option<SecretList>,
    #[serde(default)]
    pub token: Option<SecretList>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default = "default_event_type_pointer")]
    pub event_type: String,
    #[serde(default)]
    pub event_id: Option<String>,
}

fn default_event_type_pointer() -> String {
    "/type".into()
}

/// One secret, or several during a rotation: a list in the file, or
/// space-separated values in one environment variable.
#[derive(Clone, Default)]
pub struct SecretList(pub Vec<SecretString>);

impl fmt::Debug for SecretList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} secret(s) REDACTED]", self.0.len())
    }
}

impl SecretList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for SecretList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Number(i64),
            Many(Vec<String>),
        }
        let values: Vec<String> = match Raw::deserialize(deserializer)? {
            Raw::One(s) => s.split_whitespace().map(str::to_owned).collect(),
            Raw::Number(n) => vec![n.to_string()],
            Raw::Many(v) => v
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_owned)
                .collect(),
        };
        Ok(Self(values.into_iter().map(SecretString::from).collect()))
    }
}

impl ServerSettings {
    /// Whether `peer` is one of `trusted_proxies`.
    pub fn is_trusted_proxy(&self, peer: std::net::IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .filter_map(|p| parse_net(p))
            .any(|net| net.contains(&peer))
    }

    /// The client's address: the direct peer, or, when the peer is a
    /// trusted proxy, the right-most `X-Forwarded-For` hop that is not one
    /// (a client can write anything to the left of what its proxy appends).
    /// All hops trusted: the left-most.
    pub fn client_ip(
        &self,
        peer: std::net::IpAddr,
        forwarded_for: Option<&str>,
    ) -> std::net::IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let hops: Vec<std::net::IpAddr> = forwarded_for
            .unwrap_or("")
            .split(',')
            .filter_map(|h| parse_hop(h.trim()))
            .collect();
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            client = hop;
            if !self.is_trusted_proxy(hop) {
                break;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an IP, maybe with a port (`1.2.3.4:5`,
/// `[::1]:5`).
fn parse_hop(hop: &str) -> Option<std::net::IpAddr> {
    hop.parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

impl SourceSettings {
    /// Where the event type is: `notificationType` for the Market's
    /// notifications, else the `event_type` pointer.
    pub fn event_type_pointer(&self) -> &str {
        match self.kind {
            SourceKind::Market => "/notificationType",
            SourceKind::Webhook => &self.event_type,
        }
    }

    /// Whether `allow_from` lets `client` call (always, with `insecure`).
    pub fn allows(&self, client: std::net::IpAddr) -> bool {
        // `::ffff:1.2.3.4` is the IPv4 caller of a dual-stack listener.
        let client = match client {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(client),
            v4 => v4,
        };
        (self.insecure && self.allow_from.is_empty())
            || self
                .allow_from
                .iter()
                .filter_map(|p| parse_net(p))
                .any(|net| net.contains(&client))
    }
}

/// "10.0.0.1" or "10.0.0.0/8" (IPv4 or IPv6).
fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

impl Settings {
    /// Reads `<dir>/chatbridge.toml` and the `CHATBRIDGE__*` environment, then validates.
    pub fn load(dir: &Path) -> Result<Self, SettingsError> {
        let file = dir.join(SETTINGS_FILE);
        if !file.is_file() {
            return Err(SettingsError::at(
                &file,
                "settings file not found (pass --config DIR with the folder holding chatbridge.toml)",
            ));
        }
        let env = env_overrides();
        let build = |with_env: bool| {
            let mut builder = config::Config::builder()
                .add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
            if with_env {
                builder = builder.add_source(
                    config::Environment::with_prefix("CHATBRIDGE")
                        .prefix_separator("__")
                        .separator("__")
                        .try_parsing(true),
                );
            }
            builder.build()
        };
        // The file alone: when it has the same mistake, the file is to blame
        // even if a variable touches the same table.
        let file_alone = || -> Result<Settings, String> {
            let raw = build(false).map_err(|e| e.to_string())?;
            raw.try_deserialize::<Settings>()
                .map_err(|e| explain_config_error(&e).1)
        };
        let raw = build(true)
            .map_err(|e| SettingsError::at(&file, without_quoted_lines(&e.to_string())))?;
        let mut settings: Settings = raw.try_deserialize().map_err(|e| {
            let (key, message) = explain_config_error(&e);
            let in_file = file_alone().err().is_some_and(|m| m == message);
            SettingsError::blame(&file, &env, key.as_deref(), in_file, message)
        })?;
        settings.config_dir = dir.to_path_buf();
        if let Some(first) = settings.problems().into_iter().next() {
            let in_file = file_alone().is_ok_and(|s| s.problems().contains(&first));
            // A problem message names its keys, or their [table].
            let vars: Vec<&EnvOverride> = env
                .iter()
                .filter(|_| !in_file)
                .filter(|o| names_key(&first, &o.key))
                .collect();
            return Err(SettingsError::from_env(&file, &vars, first));
        }
        Ok(settings)
    }

    pub fn settings_file(&self) -> PathBuf {
        self.config_dir.join(SETTINGS_FILE)
    }

    pub fn routes_file(&self) -> PathBuf {
        self.config_dir.join(ROUTES_FILE)
    }

    /// Every mistake in the values (not the syntax) of the settings, each
    /// saying what to write instead.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(why) = check_listen(&self.server.listen) {
            out.push(format!("server.listen = {:?}: {why}", self.server.listen));
        }
        if self.server.max_body_bytes == 0 {
            out.push("server.max_body_bytes must be at least 1".into());
        }
        for proxy in &self.server.trusted_proxies {
            if parse_net(proxy).is_none() {
                out.push(format!(
                    "server.trusted_proxies: {proxy:?} is not an IP address or a CIDR like \"10.0.0.0/8\""
                ));
            }
        }
        if self.storage.retention_days == 0 {
            out.push("storage.retention_days must be at least 1 (it is also how long duplicates are recognised)".into());
        }
        if self.server.max_json_depth == 0 || self.server.max_connections == 0 {
            out.push(
                "server.max_json_depth and server.max_connections must each be at least 1".into(),
            );
        }
        if self.dispatch.lease_secs <= self.market.request_timeout_secs {
            out.push(format!(
                "dispatch.lease_secs ({}) must be longer than market.request_timeout_secs ({}), or a slow send could be leased twice",
                self.dispatch.lease_secs, self.market.request_timeout_secs
            ));
        }
        if !self.storage.url.starts_with("sqlite:") && !crate::store::is_postgres(&self.storage.url)
        {
            out.push(format!(
                "storage.url {:?} is not supported: write sqlite://path/to/file.db or postgres://user@host:port/database",
                crate::store::redact_url(&self.storage.url)
            ));
        } else if crate::store::is_postgres(&self.storage.url) {
            if let Some(problem) = crate::store::postgres_url_problem(&self.storage.url) {
                out.push(format!(
                    "storage.url {:?}: {problem}",
                    crate::store::redact_url(&self.storage.url)
                ));
            }
        }
        if self.storage.pool_size == 0 || self.storage.connect_timeout_secs == 0 {
            out.push(
                "storage.pool_size and storage.connect_timeout_secs must each be at least 1".into(),
            );
        }
        if self.storage.gauge_refresh_ms < 10 {
            out.push(format!(
                "storage.gauge_refresh_ms ({}) must be at least 10: each refresh counts the queue in the database",
                self.storage.gauge_refresh_ms
            ));
        }
        if !(self.market.base_url.starts_with("http://")
            || self.market.base_url.starts_with("https://"))
        {
            out.push(format!(
                "market.base_url {:?} must start with http:// or https://",
                self.market.base_url
            ));
        }
        if self.market.hourly_limit == 0
            || self.market.chats_new_hourly_limit == 0
            || self.market.quota_window_secs == 0
            || self.market.max_in_flight == 0
        {
            out.push(
                "market.hourly_limit, chats_new_hourly_limit, quota_window_secs and max_in_flight must each be at least 1"
                    .into(),
            );
        }
        for (id, b) in &self.market.businesses {
            if BusinessId::parse(id).is_err() {
                out.push(format!(
                    "[market.businesses.{id}]: the table name must be the business id, a positive integer"
                ));
            }
            if b.hourly_limit == Some(0)
                || b.chats_new_hourly_limit == Some(0)
                || b.quota_window_secs == Some(0)
                || b.max_in_flight == Some(0)
            {
                out.push(format!(
                    "[market.businesses.{id}]: limits must each be at least 1"
                ));
            }
        }
        if self.dispatch.initial_backoff_secs == 0
            || self.dispatch.lease_secs == 0
            || self.dispatch.claim_batch == 0
        {
            out.push(
                "dispatch.initial_backoff_secs, lease_secs and claim_batch must each be at least 1"
                    .into(),
            );
        }
        if self.dispatch.poll_interval_ms < MIN_POLL_INTERVAL_MS {
            out.push(format!(
                "dispatch.poll_interval_ms = {}: must be at least {MIN_POLL_INTERVAL_MS} (the dispatcher would spin); the default is 500",
                self.dispatch.poll_interval_ms
            ));
        }
        for (name, source) in &self.sources {
            out.extend(source_problems(name, source));
        }
        for (campaign, business) in &self.market.campaigns {
            if campaign.parse::<i64>().map_or(true, |c| c < 1) {
                out.push(format!(
                    "[market.campaigns]: {campaign:?} is not a campaign id (a positive integer, quoted: \"12345\" = 111)"
                ));
            }
            if *business < 1 {
                out.push(format!(
                    "[market.campaigns]: campaign {campaign:?} = {business}: the business id must be a positive integer"
                ));
            }
        }
        out
    }
}

fn source_problems(name: &str, source: &SourceSettings) -> Vec<String> {
    let mut out = Vec::new();
    let at = format!("[sources.{name}]");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        out.push(format!(
            "{at}: a source name may only hold a-z, 0-9, _ and -"
        ));
    }
    for net in &source.allow_from {
        if parse_net(net).is_none() {
            out.push(format!(
                "{at}: allow_from: {net:?} is not an IP address or a CIDR like \"5.45.207.0/25\""
            ));
        }
    }
    let has_secret = source.secret.as_ref().is_some_and(|s| !s.is_empty());
    let has_token = source.token.as_ref().is_some_and(|s| !s.is_empty());
    if source.kind == SourceKind::Market {
        if has_secret || has_token {
            out.push(format!(
                "{at}: the Market does not sign notifications, so a kind = \"market\" source takes no secret or token; limit its callers with allow_from"
            ));
        }
        if source.allow_from.is_empty() && !source.insecure {
            out.push(format!(
                "{at}: a kind = \"market\" source needs allow_from = [\"5.45.207.0/25\", \"141.8.142.0/25\", \"5.255.253.0/25\"] (the Market's addresses), or insecure = true to accept notifications from anyone"
            ));
        }
        if source.event_type != default_event_type_pointer() || source.event_id.is_some() {
            out.push(format!(
                "{at}: a kind = \"market\" source takes its event type from notificationType and has no event id; remove event_type and event_id"
            ));
        }
        return out;
    }
    if !source.allow_from.is_empty() {
        out.push(format!(
            "{at}: allow_from is for kind = \"market\" sources; a webhook source is checked by its secret or token"
        ));
    }
    if has_secret && has_token {
        out.push(format!("{at}: give either secret or token, not both"));
    }
    if !has_secret && !has_token && !source.insecure {
        out.push(format!(
            "{at}: no secret or token; set secret = \"whsec_...\" (or CHATBRIDGE__SOURCES__{}__SECRET), or write insecure = true to accept unsigned webhooks",
            name.to_uppercase()
        ));
    }
    if let Some(secrets) = &source.secret {
        for (i, s) in secrets.0.iter().enumerate() {
            if let Err(why) = decode_webhook_secret(s.expose_secret()) {
                out.push(format!("{at}: secret #{}: {why}", i + 1));
            }
        }
    }
    for (key, pointer) in [
        ("event_type", Some(&source.event_type)),
        ("event_id", source.event_id.as_ref()),
    ] {
        if let Some(p) = pointer {
            if !p.starts_with('/') {
                out.push(format!(
                    "{at}: {key} = {p:?} is not a JSON Pointer; write \"/{}\"",
                    p.trim_start_matches('/').replace('.', "/")
                ));
            }
        }
    }
    out
}

/// `host:port` (or `[v6]:port`) with a port 0..=65535, as `serve` binds it;
/// the host is resolved only by `serve`.
fn check_listen(listen: &str) -> Result<(), String> {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let example = "write host:port, such as \"127.0.0.1:8080\" or \"[::1]:8080\"";
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(format!("no port; {example}"));
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("no host; {example}"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "the port {port:?} is not a number from 0 to 65535; {example}"
        ));
    }
    Ok(())
}

/// Decodes a Standard Webhooks secret (`whsec_` + base64) into its key bytes.
pub fn decode_webhook_secret(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.strip_prefix("whsec_") else {
        return Err("a Standard Webhooks secret starts with whsec_ followed by base64".into());
    };
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err("the part after whsec_ is not valid base64".into()),
    }
}

/// A TOML syntax error quotes the offending line, which may hold a secret:
/// keep the position and the reason, drop the quote.
fn without_quoted_lines(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            !(t.starts_with('|')
                || t.split_once('|')
                    .is_some_and(|(n, _)| n.trim().chars().all(|c| c.is_ascii_digit())))
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// The config crate's message in our words, and the key it is about
/// (`market.api_ky` for an unknown field `api_ky` in `[market]`).
fn explain_config_error(e: &config::ConfigError) -> (Option<String>, String) {
    use config::ConfigError as E;
    let (key, what) = match e {
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            // The value itself may be a secret: show only its kind then.
            let secret = key
                .as_deref()
                .is_some_and(|k| ["key", "secret", "token"].iter().any(|s| k.ends_with(s)));
            let found = if secret {
                "a value of another type".to_owned()
            } else {
                unexpected.to_string()
            };
            (key.clone(), format!("expected {expected}, found {found}"))
        }
        E::At { error, key, .. } => (key.clone(), error.to_string()),
        E::NotFound(key) => (Some(key.clone()), "is required".to_owned()),
        other => (None, other.to_string()),
    };
    if let Some(field) = what
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let full = match &key {
            Some(k) => format!("{k}.{field}"),
            None => field.to_owned(),
        };
        let message = format!(
            "{full}: {what} (check the spelling; see README \"Configuration\" for the keys)"
        );
        return (Some(full), message);
    }
    match key {
        Some(k) => (Some(k.clone()), format!("{k}: {what}")),
        None => (None, what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_traced_to_the_keys_they_name() {
        let m = "dispatch.initial_backoff_secs, lease_secs and claim_batch must each be at least 1";
        assert!(names_key(m, "dispatch.claim_batch"));
        assert!(names_key(m, "dispatch.lease_secs"));
        assert!(!names_key(m, "dispatch.max_backoff_secs"));
        assert!(!names_key(m, "market.max_in_flight"));
        assert!(names_key("[sources.oms]: no secret", "sources.oms.secret"));
    }

    #[test]
    fn secret_lists_never_show_in_debug() {
        let list = SecretList(vec![SecretString::from("whsec_c2VjcmV0")]);
        let shown = format!("{list:?}");
        assert!(!shown.contains("whsec"), "{shown}");
    }

    #[test]
    fn sources_without_a_secret_must_say_insecure() {
        let source = SourceSettings {
            kind: SourceKind::Webhook,
            allow_from: Vec::new(),
            secret: None,
            token: None,
            insecure: false,
            event_type: "/type".into(),
            event_id: None,
        };
        let problems = source_problems("oms", &source);
        assert!(problems[0].contains("insecure = true"), "{problems:?}");
    }

    #[test]
    fn pointers_without_a_slash_get_a_suggestion() {
        let source = SourceSettings {
            kind: SourceKind::Webhook,
            allow_from: Vec::new(),
            secret: None,
            token: None,
            insecure: true,
            event_type: "event.type".into(),
            event_id: None,
        };
        let problems = source_problems("oms", &source);
        assert!(problems[0].contains("\"/event/type\""), "{problems:?}");
    }
}
