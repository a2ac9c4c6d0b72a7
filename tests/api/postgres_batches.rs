//! PostgreSQL's group commit (`src/store/postgres/batch.rs`): webhooks and
//! Market answers written at the same moment share one transaction, and
//! one that fails there must not fail or lose the others.

use chatbridge::domain::{BusinessId, DeliveryState, MarketMethod};
use chatbridge::settings::StorageSettings;
use chatbridge::store::{
    Attempt, ClaimLimits, Claimed, DeliveryFilter, Inserted, NewEvent, SharedCaps, Store, Verdict,
};

use crate::helpers::*;

fn open(url: &str) -> std::sync::Arc<dyn Store> {
    chatbridge::store::open(&StorageSettings {
        url: url.to_owned(),
        pool_size: 4,
        connect_timeout_secs: 5,
        ..StorageSettings::default()
    })
    .unwrap()
}

/// An event with one delivery of business 444 to `chat`, saying `text`.
fn message(id: &str, chat: i64, text: &str) -> NewEvent {
    chat_event(id, 444, chat, text)
}

/// Eight messages of business 444, to chats `first_chat`.., stored and
/// claimed at 2,000 (quota slots taken then).
async fn eight_claimed(store: &std::sync::Arc<dyn Store>, first_chat: i64) -> Vec<Claimed> {
    for i in 0..8 {
        store
            .insert_event(message(
                &format!("m-{first_chat}-{i}"),
                first_chat + i,
                "hello",
            ))
            .await
            .unwrap();
    }
    let limits = ClaimLimits {
        sends: 8,
        chat_lookups: 8,
        total: 8,
        caps: SharedCaps {
            max_in_flight: 8,
            send_limit: 1000,
            lookup_limit: 1000,
            window_ms: 3_600_000,
        },
    };
    let claimed = store
        .claim(BusinessId(444), 2_000, 60_000, limits, false)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 8);
    claimed
}

#[actix_rt::test]
async fn one_bad_event_among_webhooks_written_together_fails_alone_and_the_others_are_stored_once()
{
    let database = TestDatabase::create().await;
    let store = open(&database.url);
    // PostgreSQL refuses a NUL character in text (SQLite takes it).
    let bad = 7;
    let events: Vec<NewEvent> = (0..16)
        .map(|i| match i == bad {
            true => message(&format!("e-{i}"), 7000 + i, "a NUL \0 inside"),
            false => message(&format!("e-{i}"), 7000 + i, &format!("message {i}")),
        })
        .collect();

    let answers =
        futures_util::future::join_all(events.into_iter().map(|e| store.insert_event(e))).await;

    for (i, answer) in answers.iter().enumerate() {
        match (i as i64 == bad, answer) {
            (true, Err(e)) => assert!(!e.is_unavailable(), "{e}"),
            (false, Ok(Inserted::New(event))) => {
                assert_eq!(event.external_id, format!("e-{i}"));
                assert_eq!(event.deliveries.len(), 1);
                assert_eq!(event.deliveries[0].state, DeliveryState::Queued);
            }
            (_, Err(e)) => panic!("event {i}: {e}"),
            (_, Ok(_)) => panic!("event {i}: not stored as a new event"),
        }
    }
    let stored = store
        .list_deliveries(DeliveryFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut texts: Vec<String> = stored.iter().filter_map(|d| d.text.clone()).collect();
    texts.sort();
    let mut expected: Vec<String> = (0..16)
        .filter(|i| *i != bad)
        .map(|i| format!("message {i}"))
        .collect();
    expected.sort();
    assert_eq!(
        texts, expected,
        "each good event once, the bad one not at all"
    );
    for i in (0..16).filter(|i| *i != bad) {
        let again = store
            .insert_event(message(&format!("e-{i}"), 7000 + i, "again"))
            .await
            .unwrap();
        assert!(matches!(again, Inserted::Duplicate(_)), "event {i}");
    }
}

#[actix_rt::test]
async fn one_bad_answer_among_answers_recorded_together_fails_alone_and_the_others_are_recorded() {
    let database = TestDatabase::create().await;
    let store = open(&database.url);
    let claimed = eight_claimed(&store, 7100).await;
    let bad = claimed[3].id;
    let answers = futures_util::future::join_all(claimed.iter().map(|c| {
        store.record(
            Attempt {
                // PostgreSQL refuses a NUL character in text.
                error: (c.id == bad).then(|| "a NUL \0 inside".to_owned()),
                ..answer(c, 2_200, Verdict::Delivered)
            },
            2_300,
        )
    }))
    .await;

    for (c, answer) in claimed.iter().zip(&answers) {
        match (c.id == bad, answer) {
            (true, Err(e)) => assert!(!e.is_unavailable(), "{e}"),
            (false, Ok(())) => {}
            (_, other) => panic!("delivery {}: {other:?}", c.id),
        }
    }
    for c in &claimed {
        let (delivery, attempts) = store.delivery(c.id).await.unwrap().unwrap();
        match c.id == bad {
            true => {
                assert_eq!(delivery.state, DeliveryState::Sending);
                assert!(attempts.is_empty());
            }
            false => {
                assert_eq!(delivery.state, DeliveryState::Delivered, "{}", c.id);
                assert_eq!(attempts.len(), 1, "{}", c.id);
            }
        }
    }
}

/// Answers recorded together are written by one statement per kind
/// (`src/store/postgres/pipelined.rs`): each must still come out as it
/// would alone: its state, its attempt, its quota slot kept or given
/// back, its pause, and nothing changed for an answer whose claim is over.
#[actix_rt::test]
async fn answers_of_every_kind_recorded_together_each_come_out_as_they_would_alone() {
    let database = TestDatabase::create().await;
    let store = open(&database.url);
    let claimed = eight_claimed(&store, 7200).await;
    let c = &claimed;
    let answers = vec![
        answer(&c[0], 2_200, Verdict::Delivered),
        answer(
            &c[1],
            2_200,
            Verdict::Retry {
                at: 9_000,
                reason: "Market answered 500".into(),
            },
        ),
        answer(
            &c[2],
            2_200,
            Verdict::Dead {
                reason: "Market answered 400".into(),
            },
        ),
        // A 420: the Market did not count the call; its slot is given back.
        Attempt {
            counts_for_quota: false,
            ..answer(&c[3], 2_200, Verdict::Throttled { until: 50_000 })
        },
        // Its claim was taken over: an attempt, nothing else changes.
        Attempt {
            claim_token: c[4].claim_token + 1_000_000,
            ..answer(&c[4], 2_200, Verdict::Delivered)
        },
        // The window used up: the sends pause.
        Attempt {
            window_used_up_until: Some(70_000),
            ..answer(&c[5], 2_200, Verdict::Delivered)
        },
        answer(&c[6], 2_300, Verdict::Delivered),
        answer(&c[7], 2_300, Verdict::Delivered),
    ];
    let recorded =
        futures_util::future::join_all(answers.into_iter().map(|a| store.record(a, 2_400))).await;
    for r in recorded {
        r.unwrap();
    }

    let expected = [
        (DeliveryState::Delivered, None, 1),
        (DeliveryState::Queued, Some("Market answered 500"), 1),
        (DeliveryState::Dead, Some("Market answered 400"), 1),
        (DeliveryState::Queued, None, 0),
        (DeliveryState::Sending, None, 0),
        (DeliveryState::Delivered, None, 1),
        (DeliveryState::Delivered, None, 1),
        (DeliveryState::Delivered, None, 1),
    ];
    for (c, (state, reason, counted)) in claimed.iter().zip(expected) {
        let (delivery, attempts) = store.delivery(c.id).await.unwrap().unwrap();
        assert_eq!(delivery.state, state, "delivery {}", c.id);
        assert_eq!(delivery.reason.as_deref(), reason, "delivery {}", c.id);
        assert_eq!(delivery.attempts, counted, "delivery {}", c.id);
        assert_eq!(attempts.len(), 1, "delivery {}: one attempt each", c.id);
    }
    let (retried, _) = store.delivery(claimed[1].id).await.unwrap().unwrap();
    assert_eq!(
        retried.next_attempt_at,
        chatbridge::clock::to_rfc3339(9_000),
        "the retry waits until its time"
    );
    // Slots: each counted call's moved to its answer (the taken-over
    // one's claim slot stays where it was, and its answer adds one), the
    // 420's given back.
    let slots = store
        .calls_since(BusinessId(444), MarketMethod::SendMessage, 0)
        .await
        .unwrap();
    assert_eq!(
        slots,
        vec![2_000, 2_200, 2_200, 2_200, 2_200, 2_200, 2_300, 2_300],
        "quota slots"
    );
    let pauses = store.method_pauses(BusinessId(444), 2_400).await.unwrap();
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!(pauses[0].method, MarketMethod::SendMessage);
    assert_eq!(pauses[0].until, 70_000);
}
