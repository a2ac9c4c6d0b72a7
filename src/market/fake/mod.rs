//! A simulated Market Partner API, close enough to the real one that the
//! dispatcher cannot tell: the chat methods chatbridge uses on their real
//! paths (send a message in `send.rs`; find or open the chat of an order or
//! return, list chats and get one in `chats.rs`), the business of a
//! campaign (`campaigns.rs`), the `Api-Key` check,
//! validation per `chats.openapi.yaml`, the official error body, and per
//! method its own hourly window with `X-RateLimit-Resource-*` headers
//! (420 beyond it). The 4-in-flight cap counts every request on
//! `/businesses/{id}/...` together (also 420). Switches for failures,
//! latency and scripted answers. It keeps every request it received;
//! `GET /_fake/messages` and `/_fake/stats` show them to tests and people.
//! `GET /_fake/config` shows the switches and `POST /_fake/config` changes
//! the ones given.
//! It also plays the Market's notifier (`notifier.rs`): it pushes
//! notifications to a seller's URL and reports what it was answered.

mod campaigns;
mod chats;
pub mod notifier;
mod send;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::format_until;
use super::{HEADER_API_KEY, HEADER_LIMIT, HEADER_REMAINING, HEADER_UNTIL};
use crate::clock::{Millis, SharedClock};
use crate::store::ApiErrorEntry;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeConfig {
    /// Keys that pass; empty = any non-empty key passes.
    pub api_keys: Vec<String>,
    /// Sends per business per window; 0 = no limit.
    pub hourly_limit: u32,
    /// `chats/new` calls per business per window; 0 = no limit.
    pub chats_new_hourly_limit: u32,
    /// Chat list calls (`POST .../chats`) per business per window; 0 = no limit.
    pub get_chats_hourly_limit: u32,
    /// `GET .../chat` calls per business per window; 0 = no limit.
    pub get_chat_hourly_limit: u32,
    /// `GET /v2/campaigns/{id}` calls per campaign per window; 0 = no limit.
    pub get_campaign_hourly_limit: u32,
    /// Campaigns the fake knows: campaign id → business id.
    pub campaigns: std::collections::BTreeMap<String, i64>,
    pub window_secs: u64,
    /// Parallel requests per business; 0 = no cap.
    pub max_in_flight: usize,
    /// Share of requests answered 500, 0.0..=1.0.
    pub failure_rate: f64,
    pub latency_ms: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            hourly_limit: 1000,
            chats_new_hourly_limit: 1000,
            get_chats_hourly_limit: 5000,
            get_chat_hourly_limit: 1000,
            get_campaign_hourly_limit: 5000,
            campaigns: std::collections::BTreeMap::new(),
            window_secs: 3600,
            max_in_flight: 4,
            failure_rate: 0.0,
            latency_ms: 0,
        }
    }
}

/// The Market methods the fake serves, named by their `operationId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum FakeMethod {
    #[default]
    #[serde(rename = "sendMessageToChat")]
    SendMessage,
    #[serde(rename = "createChat")]
    CreateChat,
    #[serde(rename = "getChats")]
    GetChats,
    #[serde(rename = "getChat")]
    GetChat,
    /// Its `business_id` in a [`ReceivedRequest`] is the campaign id.
    #[serde(rename = "getCampaign")]
    GetCampaign,
}

impl FakeMethod {
    fn hourly_limit(self, config: &FakeConfig) -> u32 {
        match self {
            Self::SendMessage => config.hourly_limit,
            Self::CreateChat => config.chats_new_hourly_limit,
            Self::GetChats => config.get_chats_hourly_limit,
            Self::GetChat => config.get_chat_hourly_limit,
            Self::GetCampaign => config.get_campaign_hourly_limit,
        }
    }
}

/// An answer to give instead of the normal one, `times` times, to requests
/// of `method` (default: sends) matching the business, chat and order or
/// return id (`context_id`, for `createChat`) when given. An unknown order
/// is scripted as `{"method":"createChat","context_id":N,"status":404}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScriptedAnswer {
    pub status: u16,
    #[serde(default)]
    pub errors: Vec<ApiErrorEntry>,
    #[serde(default)]
    pub method: FakeMethod,
    #[serde(default)]
    pub business_id: Option<i64>,
    #[serde(default)]
    pub chat_id: Option<i64>,
    #[serde(default)]
    pub context_id: Option<i64>,
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

impl Default for ScriptedAnswer {
    fn default() -> Self {
        Self {
            status: 500,
            errors: Vec::new(),
            method: FakeMethod::default(),
            business_id: None,
            chat_id: None,
            context_id: None,
            times: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedRequest {
    pub method: FakeMethod,
    pub business_id: i64,
    /// The chat the request names (a send), or the one `createChat` answered.
    pub chat_id: i64,
    /// `createChat`: the context asked for (`ORDER`/`RETURN`, id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<(String, i64)>,
    pub message: String,
    pub at: Millis,
    pub status: u16,
    /// The request as it came, for checking it against the OpenAPI spec.
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FakeStats {
    pub requests: u64,
    pub by_status: HashMap<u16, u64>,
    /// The most requests of one business in flight at once.
    pub max_in_flight_seen: HashMap<i64, usize>,
}

#[derive(Default)]
struct Window {
    started: Millis,
    count: u32,
}

struct FakeState {
    config: Mutex<FakeConfig>,
    clock: SharedClock,
    received: Mutex<Vec<ReceivedRequest>>,
    windows: Mutex<HashMap<(i64, FakeMethod), Window>>,
    chats: Mutex<chats::ChatRegistry>,
    in_flight: Mutex<HashMap<i64, usize>>,
    script: Mutex<VecDeque<ScriptedAnswer>>,
    stats: Mutex<FakeStats>,
}

/// A running fake Market. Dropping it does not stop the server; call `stop`.
#[derive(Clone)]
pub struct FakeMarket {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    server: actix_web::dev::ServerHandle,
}

impl FakeMarket {
    /// Binds `listen` (port 0 picks one) and serves on the current actix system.
    pub fn start(listen: &str, config: FakeConfig, clock: SharedClock) -> std::io::Result<Self> {
        let state = Arc::new(FakeState {
            config: Mutex::new(config),
            clock,
            received: Mutex::default(),
            windows: Mutex::default(),
            chats: Mutex::default(),
            in_flight: Mutex::default(),
            script: Mutex::default(),
            stats: Mutex::default(),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .route(
                    "/v2/businesses/{business_id}/chats/message",
                    web::post().to(send::send_message),
                )
                .route(
                    "/v2/businesses/{business_id}/chats/new",
                    web::post().to(chats::create_chat),
                )
                .route(
                    "/v2/businesses/{business_id}/chats",
                    web::post().to(chats::get_chats),
                )
                .route(
                    "/v2/businesses/{business_id}/chat",
                    web::get().to(chats::get_chat),
                )
                .route(
                    "/v2/campaigns/{campaign_id}",
                    web::get().to(campaigns::get_campaign),
                )
                .route("/_fake/notify", web::post().to(notifier::notify))
                .route("/_fake/messages", web::get().to(list_messages))
                .route("/_fake/stats", web::get().to(show_stats))
                .route("/_fake/script", web::post().to(add_script))
                .route("/_fake/config", web::post().to(set_config))
                .route("/_fake/config", web::get().to(show_config))
        })
        .workers(1)
        .disable_signals()
        .bind(listen)?;
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(Self {
            addr,
            state,
            server: handle,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Messages sent with 200, in arrival order.
    pub fn delivered(&self) -> Vec<ReceivedRequest> {
        lock(&self.state.received)
            .iter()
            .filter(|r| r.status == 200 && r.method == FakeMethod::SendMessage)
            .cloned()
            .collect()
    }

    /// Requests of one method, in arrival order.
    pub fn requests_of(&self, method: FakeMethod) -> Vec<ReceivedRequest> {
        lock(&self.state.received)
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.state.received).clone()
    }

    /// Requests being answered right now, of every business.
    pub fn in_flight(&self) -> usize {
        lock(&self.state.in_flight).values().sum()
    }

    pub fn stats(&self) -> FakeStats {
        lock(&self.state.stats).clone()
    }

    pub fn script(&self, answer: ScriptedAnswer) {
        lock(&self.state.script).push_back(answer);
    }

    pub fn configure(&self, change: impl FnOnce(&mut FakeConfig)) {
        change(&mut lock(&self.state.config));
    }

    pub async fn stop(&self) {
        self.server.stop(false).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking handler must not take the fake down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn api_error(status: u16, code: &str, message: &str) -> (u16, Vec<ApiErrorEntry>) {
    (
        status,
        vec![ApiErrorEntry {
            code: code.into(),
            message: Some(message.into()),
        }],
    )
}

/// Decrements the business's in-flight count however the handler ends.
struct InFlight<'a> {
    state: &'a FakeState,
    business: i64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.state.in_flight).get_mut(&self.business) {
            *n = n.saturating_sub(1);
        }
    }
}

/// What a method's handler read from a request that passed its validation.
#[derive(Default)]
struct Parsed {
    chat_id: Option<i64>,
    context: Option<(String, i64)>,
    message: Option<String>,
    chat_filter: Option<chats::ChatFilter>,
}

/// The checks and bookkeeping every method shares, in the Market's order:
/// `Api-Key` (401), the business id and the method's own validation (400),
/// the parallel cap across all methods (420), a scripted answer, the
/// method's hourly window (420), injected failures (500); then the method's
/// answer. Every request is recorded and answered with its method's
/// rate-limit headers.
async fn serve(
    state: web::Data<FakeState>,
    req: HttpRequest,
    method: FakeMethod,
    business_raw: &str,
    body: &[u8],
    validate: impl FnOnce(&HttpRequest, &[u8]) -> Result<Parsed, String>,
) -> HttpResponse {
    let config = lock(&state.config).clone();
    let now = state.clock.now_ms();
    let business = business_raw.parse::<i64>().ok().filter(|&b| b >= 1);
    let key = req
        .headers()
        .get(HEADER_API_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let key_ok = !key.is_empty()
        && !key.starts_with("Bearer ")
        && (config.api_keys.is_empty() || config.api_keys.iter().any(|k| k == key));

    let business_key = business.unwrap_or(0);
    let in_flight_now = {
        let mut map = lock(&state.in_flight);
        let n = map.entry(business_key).or_default();
        *n += 1;
        *n
    };
    let _guard = InFlight {
        state: &state,
        business: business_key,
    };
    {
        let mut stats = lock(&state.stats);
        let seen = stats.max_in_flight_seen.entry(business_key).or_default();
        *seen = (*seen).max(in_flight_now);
    }
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }

    let window_ms = config.window_secs.max(1) as i64 * 1000;
    let limit = method.hourly_limit(&config);
    let mut parsed = Parsed::default();
    let outcome = if !key_ok {
        Err(api_error(
            401,
            "UNAUTHORIZED",
            "Api-Key header is missing or invalid",
        ))
    } else if business.is_none() {
        Err(api_error(
            400,
            "BAD_REQUEST",
            if method == FakeMethod::GetCampaign {
                "campaignId must be an integer of at least 1"
            } else {
                "businessId must be an integer of at least 1"
            },
        ))
    } else {
        match validate(&req, body) {
            Err(why) => Err(api_error(400, "BAD_REQUEST", &why)),
            Ok(p) => {
                parsed = p;
                if config.max_in_flight > 0 && in_flight_now > config.max_in_flight {
                    Err(api_error(
                        420,
                        "HIT_RATE_LIMIT",
                        "too many parallel requests",
                    ))
                } else if let Some(scripted) = take_script(&state, method, business_key, &parsed) {
                    match scripted.status {
                        // A scripted 200 answers like a real one.
                        200 => respond(&state, business_key, method, &mut parsed),
                        _ => Err((scripted.status, scripted.errors)),
                    }
                } else if limit > 0
                    && !take_quota(&state, (business_key, method), now, window_ms, limit)
                {
                    Err(api_error(420, "HIT_RATE_LIMIT", "hourly limit reached"))
                } else if config.failure_rate > 0.0 && rand::random::<f64>() < config.failure_rate {
                    Err(api_error(500, "INTERNAL_ERROR", "simulated failure"))
                } else {
                    respond(&state, business_key, method, &mut parsed)
                }
            }
        }
    };
    let (status, body_out) = match outcome {
        Ok(result) => (200, result),
        Err((status, errors)) => (status, json!({"status": "ERROR", "errors": errors})),
    };

    lock(&state.received).push(ReceivedRequest {
        method,
        business_id: business_key,
        chat_id: parsed.chat_id.unwrap_or(0),
        context: parsed.context.clone(),
        message: parsed.message.clone().unwrap_or_default(),
        at: now,
        status,
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                let value = if k.as_str().eq_ignore_ascii_case(HEADER_API_KEY) {
                    "<redacted>".to_owned()
                } else {
                    v.to_str().unwrap_or("").to_owned()
                };
                (k.as_str().to_owned(), value)
            })
            .collect(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    {
        let mut stats = lock(&state.stats);
        stats.requests += 1;
        *stats.by_status.entry(status).or_default() += 1;
    }

    let (used, until) = {
        let windows = lock(&state.windows);
        windows
            .get(&(business_key, method))
            .filter(|w| now < w.started + window_ms)
            .map(|w| (w.count, w.started + window_ms))
            .unwrap_or((0, now + window_ms))
    };
    let mut response =
        HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default());
    // With its limit off, the fake names no limit (rather than "0 remaining").
    if limit > 0 {
        response
            .insert_header((HEADER_LIMIT, limit.to_string()))
            .insert_header((HEADER_REMAINING, limit.saturating_sub(used).to_string()))
            // Whole seconds, fraction dropped, as the Market sends it: a
            // window opened mid-second ends up to 1 s after the named second.
            .insert_header((HEADER_UNTIL, format_until(until)));
    }
    response.json(body_out)
}

/// What a method answers once every check passed.
fn respond(
    state: &FakeState,
    business: i64,
    method: FakeMethod,
    parsed: &mut Parsed,
) -> Result<Value, (u16, Vec<ApiErrorEntry>)> {
    match method {
        FakeMethod::SendMessage => Ok(json!({"status": "OK"})),
        FakeMethod::CreateChat => Ok(chats::open_chat(state, business, parsed, now_of(state))),
        FakeMethod::GetChats => Ok(chats::list_chats(state, business, parsed)),
        FakeMethod::GetChat => chats::find_chat(state, business, parsed),
        FakeMethod::GetCampaign => campaigns::find_campaign(state, business),
    }
}

fn now_of(state: &FakeState) -> Millis {
    state.clock.now_ms()
}

/// Counts one call in the business's fixed window of its method; false
/// when it is full.
fn take_quota(
    state: &FakeState,
    key: (i64, FakeMethod),
    now: Millis,
    window_ms: i64,
    limit: u32,
) -> bool {
    let mut windows = lock(&state.windows);
    let w = windows.entry(key).or_default();
    if now >= w.started + window_ms || w.count == 0 {
        *w = Window {
            started: now,
            count: 0,
        };
    }
    if w.count >= limit {
        return false;
    }
    w.count += 1;
    true
}

fn take_script(
    state: &FakeState,
    method: FakeMethod,
    business: i64,
    parsed: &Parsed,
) -> Option<ScriptedAnswer> {
    let mut script = lock(&state.script);
    let index = script.iter().position(|s| {
        s.method == method
            && s.business_id.is_none_or(|b| b == business)
            && s.chat_id.is_none_or(|c| Some(c) == parsed.chat_id)
            && s.context_id
                .is_none_or(|c| parsed.context.as_ref().is_some_and(|(_, id)| *id == c))
    })?;
    let entry = &mut script[index];
    entry.times = entry.times.saturating_sub(1);
    let answer = entry.clone();
    if entry.times == 0 {
        script.remove(index);
    }
    Some(answer)
}

async fn list_messages(state: web::Data<FakeState>) -> HttpResponse {
    HttpResponse::Ok().json(&*lock(&state.received))
}

async fn show_stats(state: web::Data<FakeState>) -> HttpResponse {
    HttpResponse::Ok().json(&*lock(&state.stats))
}

async fn add_script(
    state: web::Data<FakeState>,
    answer: web::Json<ScriptedAnswer>,
) -> HttpResponse {
    lock(&state.script).push_back(answer.into_inner());
    HttpResponse::NoContent().finish()
}

/// `POST /_fake/config`: the fields given change, the others keep their
/// value; an unknown field or an impossible value is refused whole (400,
/// naming it), so a typo never silently resets the fake.
async fn set_config(state: web::Data<FakeState>, body: web::Bytes) -> HttpResponse {
    let patch: FakeConfigPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return config_refused(format!("invalid /_fake/config body: {e}")),
    };
    let mut config = lock(&state.config);
    let mut changed = config.clone();
    if let Err(problems) = patch.apply(&mut changed) {
        return config_refused(problems.join("; "));
    }
    *config = changed;
    HttpResponse::Ok().json(&*config)
}

async fn show_config(state: web::Data<FakeState>) -> HttpResponse {
    HttpResponse::Ok().json(&*lock(&state.config))
}

fn config_refused(message: String) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({
        "error": {"code": "bad_request", "message": message}
    }))
}

/// A change to [`FakeConfig`]: absent fields stay as they are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfigPatch {
    pub api_keys: Option<Vec<String>>,
    pub hourly_limit: Option<u32>,
    pub chats_new_hourly_limit: Option<u32>,
    pub get_chats_hourly_limit: Option<u32>,
    pub get_chat_hourly_limit: Option<u32>,
    pub get_campaign_hourly_limit: Option<u32>,
    pub campaigns: Option<std::collections::BTreeMap<String, i64>>,
    pub window_secs: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub failure_rate: Option<f64>,
    pub latency_ms: Option<u64>,
}

/// Longest latency the fake will inject: beyond it a test hangs rather than tests.
const MAX_LATENCY_MS: u64 = 600_000;

impl FakeConfigPatch {
    /// Applies every field or, if any is impossible, none (the problems named).
    pub fn apply(self, config: &mut FakeConfig) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(rate) = self.failure_rate {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(format!(
                    "failure_rate must be a share from 0.0 to 1.0, got {rate}"
                ));
            }
        }
        if self.window_secs == Some(0) {
            problems.push("window_secs must be at least 1".to_owned());
        }
        if let Some(ms) = self.latency_ms.filter(|&ms| ms > MAX_LATENCY_MS) {
            problems.push(format!(
                "latency_ms must be at most {MAX_LATENCY_MS}, got {ms}"
            ));
        }
        if let Some(keys) = &self.api_keys {
            if keys.iter().any(|k| k.is_empty()) {
                problems.push("api_keys must not contain an empty key".to_owned());
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        if let Some(v) = self.api_keys {
            config.api_keys = v;
        }
        if let Some(v) = self.hourly_limit {
            config.hourly_limit = v;
        }
        if let Some(v) = self.chats_new_hourly_limit {
            config.chats_new_hourly_limit = v;
        }
        if let Some(v) = self.get_chats_hourly_limit {
            config.get_chats_hourly_limit = v;
        }
        if let Some(v) = self.get_chat_hourly_limit {
            config.get_chat_hourly_limit = v;
        }
        if let Some(v) = self.get_campaign_hourly_limit {
            config.get_campaign_hourly_limit = v;
        }
        if let Some(v) = self.campaigns {
            config.campaigns = v;
        }
        if let Some(v) = self.window_secs {
            config.window_secs = v;
        }
        if let Some(v) = self.max_in_flight {
            config.max_in_flight = v;
        }
        if let Some(v) = self.failure_rate {
            config.failure_rate = v;
        }
        if let Some(v) = self.latency_ms {
            config.latency_ms = v;
        }
        Ok(())
    }
}
