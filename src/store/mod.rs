//! The one place state lives: events, their deliveries and every attempt.
//! [`Store`] is the interface the rest of the service uses; SQLite is the
//! embedded backend, and a second backend (PostgreSQL) fits behind the same
//! trait. Guarantees every backend keeps:
//! - an event and all its deliveries are written in one transaction, and
//!   `insert_event` returns only once that commit is durable;
//! - `(source, event id)` is unique: a repeat returns the stored event;
//! - a claim leases deliveries (`sending`, `lease_until`) in a short
//!   transaction, never across an HTTP call, and takes a delivery only when
//!   no earlier delivery of its conversation is still waiting or in flight.
//!   A conversation is the chat, or, while the chat of an order or return
//!   is not known, that order or return (`domain::conversation_key`): so
//!   one `chats/new` call per order is ever in flight, and the messages
//!   waiting behind it keep their order when the chat is found;
//! - the chat found for `(business, order or return)` is remembered for
//!   good, and every later delivery of that context takes it at once;
//! - stored times come from the caller (the injected clock);
//! - an event that says when it happened about a subject (`ordering`: the
//!   Market's status notifications about an order or return) is checked,
//!   in the same transaction that stores it, against the latest such time
//!   already stored for that subject: when it is older, its deliveries are
//!   stored `cancelled` with a reason saying so, and nothing is sent;
//! - a campaign's business, once learnt, is remembered for good;
//! - a database that cannot be reached or written (PostgreSQL down or
//!   failing over, a full disk, an I/O error) is reported as
//!   [`StoreError::Unavailable`], never as a success: callers refuse what
//!   they were asked and try again later (see `health` for how the rest
//!   of the service hears of it);
//! - the Market's pauses of a business's method (a 420, or
//!   `X-RateLimit-Resource-Remaining: 0`) are stored with the attempt that
//!   brought them, so a restarted process (and, on PostgreSQL, every other
//!   one: its claims check them) does not call into a used-up window.

pub mod copy;
pub mod health;
mod lock;
mod postgres;
mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

use crate::clock::Millis;
use crate::domain::{
    BusinessId, ChatContext, ChatId, DeliveryState, MarketMethod, PauseReason, Target,
};

pub use lock::ServeLock;
pub use postgres::{postgres_url_problem, PostgresStore};
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    /// The database cannot be reached or cannot write now (connection
    /// refused or lost, failover, disk full, I/O error): nothing was
    /// changed by the call, or its commit is in doubt; try again later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the store is shut down")]
    Closed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// Whether the database is out of reach or cannot write (retry later),
    /// as opposed to a mistake or a conflict in what was asked.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub struct NewEvent {
    pub source: String,
    pub external_id: String,
    pub event_type: String,
    /// The body as received, already checked to be JSON.
    pub payload: String,
    pub received_at: Millis,
    pub deliveries: Vec<NewDelivery>,
    /// The business the event was resolved to when it is not in its body
    /// (a Market notification names its campaign): kept with the event so
    /// a retry renders it the same way.
    pub business_id: Option<BusinessId>,
    /// Set for events that may arrive out of order (see [`EventOrdering`]).
    pub ordering: Option<EventOrdering>,
}

/// When an event happened, about what: a status of an order or return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOrdering {
    /// What the times are compared within, e.g. `order:123` (per source).
    pub subject: String,
    /// The event's own time (the Market's `updatedAt` or `cancelledAt`).
    pub happened_at: Millis,
}

pub struct NewDelivery {
    pub route: String,
    pub template: String,
    /// `Ok` when rendered: the delivery is queued; `Err`: it is `failed`.
    pub rendered: Result<RenderedMessage, RenderFailure>,
}

/// Why a delivery could not be rendered, with the ids that did render, so
/// the failed delivery is found by its business and chat.
#[derive(Debug, Clone)]
pub struct RenderFailure {
    pub reason: String,
    pub business_id: Option<BusinessId>,
    /// The chat, or the order or return, when those rendered.
    pub target: Option<Target>,
}

#[derive(Debug, Clone)]
pub struct RenderedMessage {
    pub business_id: BusinessId,
    pub target: Target,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    pub id: i64,
    pub route: String,
    pub state: DeliveryState,
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub source: String,
    pub external_id: String,
    pub event_type: String,
    pub payload: String,
    pub received_at: Millis,
    pub deliveries: Vec<DeliverySummary>,
    /// The business resolved for it on arrival (see [`NewEvent::business_id`]).
    pub business_id: Option<BusinessId>,
}

pub enum Inserted {
    New(StoredEvent),
    Duplicate(StoredEvent),
}

/// A delivery leased to this dispatcher.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub route: String,
    pub business_id: BusinessId,
    /// `None`: the chat of `context` is not known yet; find it first.
    pub chat_id: Option<ChatId>,
    pub context: Option<ChatContext>,
    pub text: String,
    pub attempts: i64,
    /// When it (last) entered the queue; its maximum age counts from here.
    pub queued_at: Millis,
    /// Written by the claim; `record` and `release` change the delivery
    /// only while it still carries this token, so an answer that comes
    /// after the lease was taken over cannot overwrite the new owner's.
    pub claim_token: i64,
}

/// What an attempt ends in; each maps to one delivery state.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    /// Back to `queued`, to be tried at `at`.
    Retry {
        at: Millis,
        reason: String,
    },
    /// 420: back to `queued` until `until`, not counted as an attempt.
    Throttled {
        until: Millis,
    },
    Dead {
        reason: String,
    },
    Held {
        reason: String,
    },
    /// `chats/new` named the chat of the delivery's order or return: it is
    /// remembered, and the delivery (with every open one of that order or
    /// return) goes back to the queue to be sent to that chat. Not an attempt.
    ChatFound {
        context: ChatContext,
        chat: ChatId,
    },
}

impl NewEvent {
    /// The event as stored under `id`, with its deliveries' summaries.
    pub(crate) fn stored(&self, id: i64, deliveries: Vec<DeliverySummary>) -> StoredEvent {
        StoredEvent {
            id,
            source: self.source.clone(),
            external_id: self.external_id.clone(),
            event_type: self.event_type.clone(),
            payload: self.payload.clone(),
            received_at: self.received_at,
            deliveries,
            business_id: self.business_id,
        }
    }
}

impl Attempt {
    /// The delivery's new state, reason, next attempt time, delivery time, and
    /// whether the attempt counts (a 420 and a found chat do not).
    pub(crate) fn outcome(
        &self,
        now: Millis,
    ) -> (DeliveryState, Option<String>, Millis, Option<Millis>, i64) {
        let counted = i64::from(!matches!(
            self.verdict,
            Verdict::Throttled { .. } | Verdict::ChatFound { .. }
        ));
        let (state, reason, next, delivered_at) = match &self.verdict {
            Verdict::Delivered => (DeliveryState::Delivered, None, now, Some(now)),
            Verdict::Retry { at, reason } => {
                (DeliveryState::Queued, Some(reason.clone()), *at, None)
            }
            Verdict::Throttled { until } => (DeliveryState::Queued, None, *until, None),
            Verdict::Dead { reason } => (DeliveryState::Dead, Some(reason.clone()), now, None),
            Verdict::Held { reason } => (DeliveryState::Held, Some(reason.clone()), now, None),
            Verdict::ChatFound { .. } => (DeliveryState::Queued, None, now, None),
        };
        (state, reason, next, delivered_at, counted)
    }
}

impl Verdict {
    /// The attempt's `outcome` column.
    pub fn outcome_name(&self) -> &'static str {
        match self {
            Verdict::ChatFound { .. } => "chat_found",
            Verdict::Delivered => "delivered",
            Verdict::Retry { .. } => "retry",
            Verdict::Throttled { .. } => "throttled",
            Verdict::Dead { .. } => "dead",
            Verdict::Held { .. } => "held",
        }
    }
}

/// Why an event's deliveries were stored `cancelled`: event `id` (of
/// `event_type`, at `at`) about the same subject happened later (both
/// backends store this same reason).
fn stale_reason(ordering: &EventOrdering, id: i64, event_type: &str, at: Millis) -> String {
    format!(
        "stale: this notification about {} happened at {}, but event {id} ({event_type}) about it happened later, at {}; not sent, so the buyer does not hear old news after new",
        ordering.subject,
        crate::clock::to_rfc3339(ordering.happened_at),
        crate::clock::to_rfc3339(at)
    )
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ApiErrorEntry {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub delivery_id: i64,
    /// The token of the claim this attempt was made under (see [`Claimed`]).
    pub claim_token: i64,
    pub business_id: BusinessId,
    /// Which Market method was called; each has its own quota.
    pub method: MarketMethod,
    pub started_at: Millis,
    /// When the answer came; the quota counts a send from here, since the
    /// Market may have counted it any time up to then.
    pub finished_at: Millis,
    pub latency_ms: i64,
    pub http_status: Option<u16>,
    pub api_errors: Vec<ApiErrorEntry>,
    /// Transport failure (timeout, refused connection), when there was no answer.
    pub error: Option<String>,
    /// Whether the Market counted this request against the hourly quota.
    pub counts_for_quota: bool,
    /// The Market said `X-RateLimit-Resource-Remaining: 0`: the method's
    /// window is used up until then. Stored as the method's pause (a 420
    /// verdict is stored as one too).
    pub window_used_up_until: Option<Millis>,
    pub verdict: Verdict,
}

/// The Market paused one method of a business until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodPause {
    pub method: MarketMethod,
    pub until: Millis,
    pub reason: PauseReason,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub at: String,
    /// `send` or `chats/new`.
    pub method: MarketMethod,
    pub http_status: Option<u16>,
    pub latency_ms: i64,
    pub outcome: String,
    pub api_errors: Vec<ApiErrorEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub event_id: i64,
    pub source: String,
    pub event_type: String,
    pub route: String,
    pub template: String,
    pub business_id: Option<i64>,
    pub chat_id: Option<i64>,
    /// The order or return whose chat the route writes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_id: Option<i64>,
    pub state: DeliveryState,
    pub reason: Option<String>,
    pub attempts: i64,
    pub created_at: String,
    pub next_attempt_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub state: Option<DeliveryState>,
    pub business_id: Option<i64>,
    pub chat_id: Option<i64>,
    pub order_id: Option<i64>,
    pub return_id: Option<i64>,
    pub route: Option<String>,
    pub source: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// Page after this delivery id (ids ascend).
    pub after_id: Option<i64>,
    pub limit: usize,
}

impl DeliveryFilter {
    /// The listing's test of `d.state`, written into the SQL (the states
    /// are a fixed set of words) rather than bound: both databases use a
    /// partial index only where the query's own terms prove its condition,
    /// and `deliveries_state` holds every state but `sending` (a delivery
    /// is there for the length of one call; `deliveries_leased` or
    /// `deliveries_sending` lists those few).
    pub(crate) fn state_sql(&self) -> String {
        match self.state {
            None => String::new(),
            Some(DeliveryState::Sending) => " AND d.state = 'sending'".to_owned(),
            Some(other) => format!(
                " AND d.state = '{}' AND d.state <> 'sending'",
                other.as_str()
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct BusinessQueue {
    pub business_id: i64,
    pub queued: i64,
    pub sending: i64,
    pub held: i64,
    pub dead: i64,
    pub failed: i64,
    pub oldest_queued_at: Option<Millis>,
}

/// What `/metrics` shows of the queue: [`Store::queue_summary`] and
/// [`Store::state_counts`] read together.
#[derive(Debug, Clone, Default)]
pub struct QueueGauges {
    pub businesses: Vec<BusinessQueue>,
    pub states: Vec<(DeliveryState, i64)>,
}

/// Every state but `delivered`, in [`DeliveryState::ALL`]'s order, with
/// the counts given per state name (0 where none is given): what
/// [`Store::state_counts`] answers on every backend.
pub(crate) fn open_state_counts(
    counted: impl IntoIterator<Item = (String, i64)>,
) -> Vec<(DeliveryState, i64)> {
    let counted: std::collections::HashMap<String, i64> = counted.into_iter().collect();
    DeliveryState::ALL
        .into_iter()
        .filter(|s| *s != DeliveryState::Delivered)
        .map(|s| (s, counted.get(s.as_str()).copied().unwrap_or(0)))
        .collect()
}

/// How many deliveries one claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Sends to known chats (the send quota left).
    pub sends: usize,
    /// Deliveries whose chat must be found first (the `chats/new` quota left).
    pub chat_lookups: usize,
    /// Both together (the business's free request slots).
    pub total: usize,
    /// The business's limits across every process on the database: a
    /// backend shared by several processes (PostgreSQL) enforces them in
    /// the claim itself; SQLite (one process) relies on the counts above.
    pub caps: SharedCaps,
}

/// What [`Store::claim_round`] took for one business.
#[derive(Debug, Clone)]
pub struct RoundClaim {
    pub claimed: Vec<Claimed>,
    /// When fewer were taken than asked: the earliest future time one of
    /// the business's conversation heads becomes due (see `next_due`).
    pub next_due: Option<Millis>,
}

/// A business's settings the claim enforces across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCaps {
    pub max_in_flight: usize,
    pub send_limit: u32,
    pub lookup_limit: u32,
    pub window_ms: Millis,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes the event and its deliveries in one durable transaction, or
    /// returns the stored event when `(source, external_id)` is known.
    async fn insert_event(&self, event: NewEvent) -> StoreResult<Inserted>;

    /// Businesses with queued deliveries, with the earliest time one is due.
    async fn queued_businesses(&self) -> StoreResult<Vec<(BusinessId, Millis)>>;

    /// Leases due deliveries of the business, oldest first, only the first
    /// open one of each conversation: up to `limits.chat_lookups` whose chat
    /// must be found first, then sends to known chats, at most
    /// `limits.total` in all. `held = true` takes one of the business's held
    /// deliveries instead (to probe whether its key works).
    async fn claim(
        &self,
        business: BusinessId,
        now: Millis,
        lease_until: Millis,
        limits: ClaimLimits,
        held: bool,
    ) -> StoreResult<Vec<Claimed>>;

    /// The earliest future time a delivery of the business that is first in
    /// its conversation becomes due (a retry or a 420 wait), if any. A store
    /// shared by several processes also answers when a stored pause of one
    /// of the business's methods ends: another process may have taken it,
    /// and this one's claims wait for it.
    async fn next_due(&self, business: BusinessId, now: Millis) -> StoreResult<Option<Millis>>;

    /// The business's method pauses that last beyond `now`, as stored by
    /// `record` (by any process on the database).
    async fn method_pauses(
        &self,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<Vec<MethodPause>>;

    /// One dispatcher round's claims: for each business, what
    /// [`claim`](Self::claim) (`held = false`) takes with its limits, and,
    /// when that is fewer than `limits.total`, its
    /// [`next_due`](Self::next_due). Answers in the order asked. By default
    /// the claims run at once and the look-ups after them; SQLite does the
    /// whole round as one write (one commit, no read per business), which
    /// is what lets the dispatcher keep up with many businesses.
    async fn claim_round(
        &self,
        wanted: Vec<(BusinessId, ClaimLimits)>,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<RoundClaim>> {
        let claims = futures_util::future::join_all(
            wanted
                .iter()
                .map(|(business, limits)| self.claim(*business, now, lease_until, *limits, false)),
        )
        .await;
        let mut round = Vec::with_capacity(wanted.len());
        for ((business, limits), claimed) in wanted.into_iter().zip(claims) {
            let claimed = claimed?;
            let next_due = match claimed.len() < limits.total {
                true => self.next_due(business, now).await?,
                false => None,
            };
            round.push(RoundClaim { claimed, next_due });
        }
        Ok(round)
    }

    /// Records an attempt and moves its delivery to the verdict's state.
    async fn record(&self, attempt: Attempt, now: Millis) -> StoreResult<()>;

    /// Gives leased deliveries back to the queue untouched (shutdown):
    /// `(id, claim token)`, each only while it still carries that token.
    async fn release(&self, ids: Vec<(i64, i64)>, now: Millis) -> StoreResult<()>;

    /// Finish times of the business's quota-counted calls of `method` after
    /// `since`, oldest first.
    async fn calls_since(
        &self,
        business: BusinessId,
        method: MarketMethod,
        since: Millis,
    ) -> StoreResult<Vec<Millis>>;

    /// The chat remembered for an order or return of the business.
    async fn known_chat(
        &self,
        business: BusinessId,
        context: ChatContext,
    ) -> StoreResult<Option<ChatId>>;

    /// Returns deliveries whose lease expired (their dispatcher died) to the
    /// queue, except `ours`: this process's sends still in flight.
    async fn reclaim_expired(&self, now: Millis, ours: Vec<i64>) -> StoreResult<u64>;

    /// Businesses with held deliveries.
    async fn held_businesses(&self) -> StoreResult<Vec<BusinessId>>;

    /// Moves every held delivery of the business back to the queue.
    async fn release_held(&self, business: BusinessId, now: Millis) -> StoreResult<u64>;

    async fn delivery(&self, id: i64) -> StoreResult<Option<(DeliveryRow, Vec<AttemptRow>)>>;
    async fn list_deliveries(&self, filter: DeliveryFilter) -> StoreResult<Vec<DeliveryRow>>;
    async fn event(&self, id: i64) -> StoreResult<Option<StoredEvent>>;
    /// The event a source sent with this id.
    async fn event_by_source_id(
        &self,
        source: String,
        external_id: String,
    ) -> StoreResult<Option<StoredEvent>>;
    /// The most recent events, newest first (for a reload's regression check).
    async fn recent_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>>;
    /// Puts a failed, dead or cancelled delivery back in the queue with new text.
    async fn requeue(&self, id: i64, message: RenderedMessage, now: Millis) -> StoreResult<()>;
    /// Marks a delivery failed again (it still does not render).
    async fn mark_failed(&self, id: i64, reason: String, now: Millis) -> StoreResult<()>;
    async fn cancel(&self, id: i64, now: Millis) -> StoreResult<()>;
    /// Open, dead and failed deliveries per business (those with any),
    /// with the business's oldest queued one. For the admin queue view and
    /// `/metrics`: SQLite reads counts kept as states change, PostgreSQL
    /// counts from partial indexes (no table rows read).
    async fn queue_summary(&self) -> StoreResult<Vec<BusinessQueue>>;
    /// Deliveries per state, `delivered` excepted.
    async fn state_counts(&self) -> StoreResult<Vec<(DeliveryState, i64)>>;
    /// Both of the above, in one reading where the backend can.
    async fn queue_gauges(&self) -> StoreResult<QueueGauges> {
        Ok(QueueGauges {
            businesses: self.queue_summary().await?,
            states: self.state_counts().await?,
        })
    }
    /// Whether other processes change this store's deliveries too
    /// (PostgreSQL). Then `/metrics` shows the queue's gauges from a
    /// reading refreshed in the background (see `telemetry::gauges`), as
    /// counting them costs a scan of the queue's indexes; otherwise this
    /// process sees every change and they are kept up to date as they
    /// happen, so a scrape reads them directly.
    fn changed_by_other_processes(&self) -> bool {
        false
    }
    /// Deletes up to `batch` events received before `before` whose
    /// deliveries are all finished, with their deliveries and attempts.
    /// Returns how many events went; their ids may then be sent again.
    async fn prune(&self, before: Millis, batch: usize) -> StoreResult<u64>;
    /// Whether the store can take writes now (`/readyz`): on SQLite a
    /// tiny committed write (a full disk fails it while reads still work),
    /// on PostgreSQL a round trip on a pooled connection.
    async fn ping(&self) -> StoreResult<()>;

    /// The business remembered for a Market campaign, if any.
    async fn campaign_business(&self, campaign: i64) -> StoreResult<Option<BusinessId>>;

    /// Remembers a campaign's business (durably, before returning). A
    /// campaign already known keeps its first business.
    async fn remember_campaign(
        &self,
        campaign: i64,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<()>;

    /// Of a business's queued deliveries: how many wait behind an earlier
    /// open one of their conversation (their chat, or the order or return
    /// whose chat is still to be found), and how many (of the rest) wait for a later
    /// retry time. For the admin's queue view; not on the hot path.
    async fn queue_waits(&self, business: BusinessId, now: Millis) -> StoreResult<QueueWaits>;

    /// Wakes `wake` whenever another process on the same database may have
    /// made work due, and once more after that channel recovers from an
    /// outage (a rescan: what happened meanwhile went unheard). Nothing to
    /// do for a backend one process owns (SQLite): its own handlers and
    /// sends wake the dispatcher. (No default: a wrapper must pass it on.)
    fn wake_on_work(&self, wake: std::sync::Arc<tokio::sync::Notify>);
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueueWaits {
    pub behind_chat: i64,
    pub not_yet_due: i64,
}

/// The pauses an attempt brings to its method: a 420's wait, and the
/// window the Market said is used up (both backends store them alike).
fn pauses_of(attempt: &Attempt) -> Vec<(Millis, PauseReason)> {
    let mut out = Vec::new();
    if let Verdict::Throttled { until } = attempt.verdict {
        out.push((until, PauseReason::Market420));
    }
    if let Some(until) = attempt.window_used_up_until {
        out.push((until, PauseReason::RemainingZero));
    }
    out
}

/// The file of a `sqlite://` (or `sqlite:`) `storage.url`.
pub fn sqlite_path(url: &str) -> Option<&std::path::Path> {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .map(std::path::Path::new)
}

/// Whether a `storage.url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `storage.url` for messages: the password (in the user part or a
/// `password=` parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..]
            .find(['/', '?'])
            .map(|i| rest + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest..authority_end].rfind('@').map(|i| rest + i) {
            if let Some(colon) = out[rest..at].find(':').map(|i| rest + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// Opens the backend `storage.url` names.
pub fn open(settings: &crate::settings::StorageSettings) -> StoreResult<std::sync::Arc<dyn Store>> {
    let url = settings.url.as_str();
    if is_postgres(url) {
        let store = PostgresStore::open(settings)?;
        copy::refuse_unfinished(&store)?;
        return Ok(std::sync::Arc::new(store));
    }
    match sqlite_path(url) {
        Some(path) => Ok(std::sync::Arc::new(SqliteStore::open(path)?)),
        None => Err(StoreError::Database(format!(
            "storage.url {:?}: write sqlite://path/to/file.db or postgres://user@host:port/database",
            redact_url(url)
        ))),
    }
}

/// Takes the one-serving-process lock of the database `storage.url` names
/// (see [`ServeLock`]); `None` for a backend made for several processes.
pub fn lock_for_serving(url: &str) -> StoreResult<Option<ServeLock>> {
    sqlite_path(url).map(ServeLock::acquire).transpose()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_database_password_never_shows() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/chat?sslmode=require"),
            "postgres://app:***@db:5432/chat?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://app@db/chat?password=s3cret&sslmode=require"),
            "postgresql://app@db/chat?password=***&sslmode=require"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
