//! Per-business quota: never more than `limit` sends in any window. A send
//! takes a slot when it is dispatched and keeps it until one window after
//! its answer came (the Market may have counted it any time until then).
//! The log is seeded from the store at start, so a restart cannot reset it.

use std::collections::BTreeMap;

use crate::clock::Millis;

#[derive(Debug)]
pub struct QuotaLog {
    limit: u32,
    window_ms: Millis,
    /// Slot time → how many sends hold a slot from that time.
    slots: BTreeMap<Millis, u32>,
    used: u32,
}

impl QuotaLog {
    pub fn new(limit: u32, window_ms: Millis, recorded: impl IntoIterator<Item = Millis>) -> Self {
        let mut log = Self {
            limit,
            window_ms,
            slots: BTreeMap::new(),
            used: 0,
        };
        for t in recorded {
            log.take(t);
        }
        log
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn set_limits(&mut self, limit: u32, window_ms: Millis) {
        self.limit = limit;
        self.window_ms = window_ms;
    }

    fn expire(&mut self, now: Millis) {
        while let Some((&t, &n)) = self.slots.first_key_value() {
            if t > now - self.window_ms {
                break;
            }
            self.slots.remove(&t);
            self.used -= n;
        }
    }

    /// Sends that may start now.
    pub fn available(&mut self, now: Millis) -> u32 {
        self.expire(now);
        self.limit.saturating_sub(self.used)
    }

    /// Sends counted in the window ending now.
    pub fn used(&mut self, now: Millis) -> u32 {
        self.expire(now);
        self.used
    }

    /// When the next slot frees, if all are taken.
    pub fn next_free(&mut self, now: Millis) -> Option<Millis> {
        if self.available(now) > 0 {
            return None;
        }
        self.slots
            .first_key_value()
            .map(|(&t, _)| t + self.window_ms)
    }

    /// Takes a slot at `t` (a dispatch or an answer time).
    pub fn take(&mut self, t: Millis) {
        *self.slots.entry(t).or_default() += 1;
        self.used += 1;
    }

    /// Gives back the slot taken at `t`.
    pub fn give_back(&mut self, t: Millis) {
        if let Some(n) = self.slots.get_mut(&t) {
            *n -= 1;
            self.used -= 1;
            if *n == 0 {
                self.slots.remove(&t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_frees_one_window_after_the_oldest_send() {
        let mut q = QuotaLog::new(2, 1000, [100, 400]);
        assert_eq!(q.available(500), 0);
        assert_eq!(q.next_free(500), Some(1100));
        assert_eq!(q.available(1100), 1);
        assert_eq!(q.available(1400), 2);
    }

    #[test]
    fn an_answer_moves_the_slot_later() {
        let mut q = QuotaLog::new(1, 1000, []);
        q.take(0);
        q.give_back(0);
        q.take(300);
        assert_eq!(q.available(1000), 0);
        assert_eq!(q.available(1300), 1);
    }
}
