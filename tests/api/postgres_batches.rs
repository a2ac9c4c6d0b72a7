//! PostgreSQL's group commit (`src/store/postgres/batch.rs`): webhooks and
//! Market answers written at the same moment share one transaction, and
//! one that fails there must not fail or lose the others.

use chatbridge::domain::{BusinessId, DeliveryState};
use chatbridge::settings::StorageSettings;
use chatbridge::store::{
    Attempt, ClaimLimits, DeliveryFilter, Inserted, NewEvent, SharedCaps, Store, Verdict,
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
    for i in 0..8 {
        store
            .insert_event(message(&format!("r-{i}"), 7100 + i, "hello"))
            .await
            .unwrap();
    }
    let claimed = store
        .claim(
            BusinessId(444),
            2_000,
            60_000,
            ClaimLimits {
                sends: 8,
                chat_lookups: 8,
                total: 8,
                caps: SharedCaps {
                    max_in_flight: 8,
                    send_limit: 1000,
                    lookup_limit: 1000,
                    window_ms: 3_600_000,
                },
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 8);
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
