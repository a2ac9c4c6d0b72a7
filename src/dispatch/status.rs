//! What the dispatcher knows that the store does not: per business, whether
//! the Market paused it (until when and why), whether its key is refused,
//! and how much of its quota the window holds. The dispatcher lives on one
//! actix thread with `Rc` state; it publishes a copy here every round, and
//! the admin API (any worker thread) reads it. A snapshot, not the truth:
//! it is at most one dispatcher round old.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::Millis;
use crate::domain::BusinessId;

use super::Business;

pub use crate::domain::PauseReason;

/// One business as the dispatcher sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BusinessStatus {
    /// The Market's pause, while it lasts.
    pub paused_until: Option<Millis>,
    pub pause_reason: Option<PauseReason>,
    /// The business's key is refused; its deliveries are `held`.
    pub held: bool,
    pub held_reason: Option<String>,
    /// Sends counted in the quota window ending now.
    pub quota_used: u32,
    pub quota_limit: u32,
    /// When a slot frees, if the quota is used up.
    pub quota_next_free: Option<Millis>,
}

/// Shared between the dispatcher (writer) and request handlers (readers).
#[derive(Debug, Default)]
pub struct DispatchStatus {
    businesses: Mutex<BTreeMap<BusinessId, BusinessStatus>>,
}

impl DispatchStatus {
    pub fn publish(&self, business: BusinessId, status: BusinessStatus) {
        if let Ok(mut map) = self.businesses.lock() {
            map.insert(business, status);
        }
    }

    /// Whether a send to a known chat of `business` cannot start before a
    /// time the dispatcher already waits for: its sends are paused by the
    /// Market, its quota is used up, or its key is refused (probed on a
    /// timer). A business the dispatcher has not seen yet is not blocked.
    pub fn sends_blocked(&self, business: BusinessId, now: Millis) -> bool {
        self.businesses
            .lock()
            .ok()
            .and_then(|map| {
                map.get(&business).map(|s| {
                    s.held
                        || s.paused_until.is_some_and(|t| t > now)
                        || s.quota_next_free.is_some_and(|t| t > now)
                })
            })
            .unwrap_or(false)
    }

    /// Every business the dispatcher has seen since it started.
    pub fn snapshot(&self) -> BTreeMap<BusinessId, BusinessStatus> {
        self.businesses
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
}

/// Copies what the admin shows of a business into the shared snapshot.
pub(super) fn publish(status: &DispatchStatus, id: BusinessId, b: &mut Business, now: Millis) {
    // Sends are what the queue waits for; chat lookups have their own
    // budget but a delivery waiting for one shows as queued all the same.
    let sends = &mut b.sends;
    let paused = sends.blocked_until > now;
    status.publish(
        id,
        BusinessStatus {
            paused_until: paused.then_some(sends.blocked_until),
            pause_reason: sends.blocked_why.filter(|_| paused),
            held: b.held,
            held_reason: b.held_why.clone().filter(|_| b.held),
            quota_used: sends.quota.used(now),
            quota_limit: sends.quota.limit(),
            quota_next_free: sends.quota.next_free(now),
        },
    );
}
