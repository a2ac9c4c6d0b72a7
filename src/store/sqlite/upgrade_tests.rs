//! A database written by an earlier chatbridge opens in place: the
//! migrations it lacks run, and what it holds keeps working.

use super::*;

/// A database as the version before chat lookup left it (schema 2), with
/// one queued delivery to chat 5001.
fn old_database(path: &Path) {
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    for script in &MIGRATIONS[..2] {
        tx.execute_batch(script).unwrap();
    }
    tx.execute_batch(
        "PRAGMA user_version = 2;
         INSERT INTO events (id, source, external_id, event_type, payload, received_at)
             VALUES (1, 'oms', 'evt-1', 'order.shipped', '{}', 1000);
         INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id, text, state,
                 created_at, queued_at, next_attempt_at, updated_at)
             VALUES (1, 1, 'order-shipped', 'order_shipped', 111, 5001, 'hello', 'queued',
                 1000, 1000, 1000, 1000);
         INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id, text, state,
                 created_at, queued_at, next_attempt_at, updated_at)
             VALUES (2, 1, 'order-shipped', 'order_shipped', 111, 5001, 'second', 'queued',
                 1000, 1000, 1000, 1000);",
    )
    .unwrap();
    tx.commit().unwrap();
}

#[actix_rt::test]
async fn an_old_database_is_upgraded_in_place_and_its_queue_keeps_its_chat_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    old_database(&path);

    let store = SqliteStore::open(&path).unwrap();
    let limits = ClaimLimits {
        sends: 10,
        chat_lookups: 10,
        total: 10,
        caps: crate::store::SharedCaps {
            max_in_flight: 10,
            send_limit: 10,
            lookup_limit: 10,
            window_ms: 3_600_000,
        },
    };
    let claimed = store
        .claim(BusinessId(111), 2000, 60_000, limits, false)
        .await
        .unwrap();
    // The old rows joined their chat's conversation: only the first is taken.
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, 1);
    assert_eq!(claimed[0].chat_id, Some(ChatId(5001)));
    assert_eq!(claimed[0].context, None);
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version as usize, MIGRATIONS.len());
}
