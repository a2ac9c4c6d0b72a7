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
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl SettingsError {
    fn at(file: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.display().to_string(),
            message: message.into(),
        }
    }
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub url: String,
    /// Finished events (and their deliveries and attempts) are deleted
    /// after this many days; until then a repeated event id is a duplicate.
    pub retention_days: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/chatbridge.db".into(),
            retention_days: 30,
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
}

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
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token for `/admin`; empty or absent turns the admin API off.
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
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
        let raw = config::Config::builder()
            .add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("CHATBRIDGE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(|e| SettingsError::at(&file, without_quoted_lines(&e.to_string())))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| SettingsError::at(&file, explain_config_error(e)))?;
        settings.config_dir = dir.to_path_buf();
        let problems = settings.problems();
        if let Some(first) = problems.into_iter().next() {
            return Err(SettingsError::at(&file, first));
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
        if self.server.max_body_bytes == 0 {
            out.push("server.max_body_bytes must be at least 1".into());
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
        if !self.storage.url.starts_with("sqlite:") {
            out.push(format!(
                "storage.url {:?} is not supported: write sqlite://path/to/file.db",
                self.storage.url
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
        for (name, source) in &self.sources {
            out.extend(source_problems(name, source));
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
    let has_secret = source.secret.as_ref().is_some_and(|s| !s.is_empty());
    let has_token = source.token.as_ref().is_some_and(|s| !s.is_empty());
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

/// The config crate's messages name the key but not what to do; add that.
fn explain_config_error(e: config::ConfigError) -> String {
    let text = e.to_string();
    if text.contains("unknown field") {
        format!("{text} (check the spelling; see README \"Configuration\" for the keys)")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_lists_never_show_in_debug() {
        let list = SecretList(vec![SecretString::from("whsec_c2VjcmV0")]);
        let shown = format!("{list:?}");
        assert!(!shown.contains("whsec"), "{shown}");
    }

    #[test]
    fn sources_without_a_secret_must_say_insecure() {
        let source = SourceSettings {
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
