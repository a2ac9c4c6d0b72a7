//! PostgreSQL's claim counts a business's quota slots in the window from
//! per-minute counts plus the slots of the window's first, partial minute
//! (migration 8). Whatever the minutes, the room it finds must be the
//! count of the slots one by one: never a send more than the limit allows,
//! never one fewer.

use chatbridge::clock::Millis;
use chatbridge::domain::BusinessId;
use chatbridge::settings::StorageSettings;
use chatbridge::store::{Attempt, ClaimLimits, Claimed, SharedCaps, Store, Verdict};

use crate::helpers::*;

const BUSINESS: i64 = 555;
/// A minute and a half: the window's start falls anywhere in a minute.
const WINDOW_MS: Millis = 90_000;

fn limits(send_limit: u32) -> ClaimLimits {
    ClaimLimits {
        sends: 1,
        chat_lookups: 1,
        total: 1,
        caps: SharedCaps {
            max_in_flight: 1,
            send_limit,
            lookup_limit: 1000,
            window_ms: WINDOW_MS,
        },
    }
}

/// The answer to a claimed send at `at`: counted by the Market, or not
/// (a call that never left gives its slot back).
fn answered(claimed: &Claimed, at: Millis, counted: bool) -> Attempt {
    match counted {
        true => answer(claimed, at, Verdict::Delivered),
        false => Attempt {
            http_status: None,
            error: Some("connection refused".to_owned()),
            counts_for_quota: false,
            ..answer(claimed, at, Verdict::Delivered)
        },
    }
}

#[actix_rt::test]
async fn the_room_a_claim_finds_is_the_count_of_the_slots_in_the_window_wherever_the_minutes_fall()
{
    let database = TestDatabase::create().await;
    let store: std::sync::Arc<dyn Store> = chatbridge::store::open(&StorageSettings {
        url: database.url.clone(),
        pool_size: 4,
        connect_timeout_secs: 5,
        ..StorageSettings::default()
    })
    .unwrap();
    for i in 0..80 {
        store
            .insert_event(chat_event(&format!("q-{i}"), BUSINESS, 9000 + i, "hi"))
            .await
            .unwrap();
    }
    // The answers' times of the slots the Market counted.
    let mut slots: Vec<Millis> = Vec::new();
    let claim_one = |now: Millis, send_limit: u32| {
        let store = store.clone();
        async move {
            store
                .claim(
                    BusinessId(BUSINESS),
                    now,
                    now + 30_000,
                    limits(send_limit),
                    false,
                )
                .await
                .unwrap()
        }
    };
    // Sends claimed on either side of minute boundaries, answered in the
    // same minute or the next, and two that never left.
    for (claimed_at, answered_at, counted) in [
        (10_000, 10_005, true),
        (59_990, 60_010, true),
        (60_000, 60_000, true),
        (61_000, 61_500, false),
        (119_999, 120_000, true),
        (120_000, 121_000, true),
        (150_000, 179_999, true),
        (170_000, 170_100, false),
        (180_000, 180_001, true),
    ] {
        let claimed = claim_one(claimed_at, 1000).await;
        assert_eq!(claimed.len(), 1, "claim at {claimed_at}");
        store
            .record(answered(&claimed[0], answered_at, counted), answered_at)
            .await
            .unwrap();
        if counted {
            slots.push(answered_at);
        }
    }
    // At each moment: with the limit at the count, no room; one more, one
    // send (its slot counts from then on).
    for now in [
        120_000, 149_999, 150_000, 150_001, 150_005, 150_006, 180_000, 209_999, 210_000, 210_001,
        239_999, 240_000, 269_999, 270_000, 270_002, 300_000,
    ] {
        let used = slots.iter().filter(|&&t| t > now - WINDOW_MS).count() as u32;
        assert!(
            claim_one(now, used).await.is_empty(),
            "at {now}: {used} slot(s) in the window, yet a send was allowed under a limit of {used}"
        );
        let claimed = claim_one(now, used + 1).await;
        assert_eq!(
            claimed.len(),
            1,
            "at {now}: {used} slot(s) in the window, yet no send under a limit of {}",
            used + 1
        );
        store
            .record(answered(&claimed[0], now, true), now)
            .await
            .unwrap();
        slots.push(now);
    }
}
