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

/// A database as it was just before the migration that contains
/// `migration`, holding event 1 and what `rows` inserts.
fn database_before(path: &Path, migration: &str, rows: impl FnOnce(&rusqlite::Transaction<'_>)) {
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    let before = MIGRATIONS
        .iter()
        .position(|m| m.contains(migration))
        .unwrap();
    for script in &MIGRATIONS[..before] {
        tx.execute_batch(script).unwrap();
    }
    tx.execute_batch(&format!("PRAGMA user_version = {before}"))
        .unwrap();
    tx.execute_batch(
        "INSERT INTO events (id, source, external_id, event_type, payload, received_at)
             VALUES (1, 'oms', 'evt-1', 'order.shipped', '{}', 1000);",
    )
    .unwrap();
    rows(&tx);
    tx.commit().unwrap();
}

/// Room to claim `n` deliveries of a business, within generous limits.
fn room(n: usize) -> ClaimLimits {
    ClaimLimits {
        sends: n,
        chat_lookups: n,
        total: n,
        caps: SharedCaps {
            max_in_flight: n,
            send_limit: 100,
            lookup_limit: 100,
            window_ms: 3_600_000,
        },
    }
}

/// Records that the Market took the claimed delivery at `at`.
async fn delivered(store: &SqliteStore, claimed: &Claimed, at: Millis) {
    let attempt = Attempt {
        delivery_id: claimed.id,
        claim_token: claimed.claim_token,
        business_id: claimed.business_id,
        method: MarketMethod::SendMessage,
        started_at: at - 10,
        finished_at: at,
        latency_ms: 10,
        http_status: Some(200),
        api_errors: Vec::new(),
        error: None,
        counts_for_quota: true,
        window_used_up_until: None,
        verdict: Verdict::Delivered,
    };
    store.record(attempt, at).await.unwrap();
}

/// An operator sends delivery `id` again, to `chat` of `business`.
async fn resend(store: &SqliteStore, id: i64, business: i64, chat: i64, at: Millis) {
    let message = RenderedMessage {
        business_id: BusinessId(business),
        target: Target::Chat(ChatId(chat)),
        text: "again".into(),
    };
    store.requeue(id, message, at).await.unwrap();
}

#[actix_rt::test]
async fn an_old_database_is_upgraded_in_place_and_its_queue_keeps_its_chat_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    old_database(&path);

    let store = SqliteStore::open(&path).unwrap();
    let claimed = store
        .claim(BusinessId(111), 2000, 60_000, room(10), false)
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

/// The queue's counts come from `delivery_counts` (migration 8),
/// which an upgrade fills from the rows already there; afterwards the
/// store's writes keep it equal to counting the rows.
#[actix_rt::test]
async fn an_upgrade_counts_the_deliveries_already_there_and_the_counts_then_follow_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    database_before(&path, "CREATE TABLE delivery_counts", |tx| {
        let rows = [
            (111, "queued", 5000),
            (111, "queued", 3000),
            (111, "sending", 1000),
            (111, "dead", 1000),
            (222, "held", 1000),
            (222, "delivered", 1000),
            (0, "failed", 1000),
            (222, "cancelled", 1000),
        ];
        for (business, state, queued_at) in rows {
            tx.execute(
                "INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text,
                     state, created_at, queued_at, next_attempt_at, updated_at)
                 VALUES (1, 'r', 't', NULLIF(?1, 0), 5001, 'x', ?2, 1000, ?3, ?3, 1000)",
                params![business, state, queued_at],
            )
            .unwrap();
        }
    });

    let store = SqliteStore::open(&path).unwrap();

    let summary = store.queue_summary().await.unwrap();
    let shown: Vec<_> = summary
        .iter()
        .map(|b| {
            (
                b.business_id,
                [b.queued, b.sending, b.held, b.dead, b.failed],
                b.oldest_queued_at,
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (111, [2, 1, 0, 1, 0], Some(3000)),
            (222, [0, 0, 1, 0, 0], None)
        ]
    );
    let states = store.state_counts().await.unwrap();
    assert_eq!(
        states,
        [
            (DeliveryState::Queued, 2),
            (DeliveryState::Sending, 1),
            (DeliveryState::Held, 1),
            (DeliveryState::Dead, 1),
            (DeliveryState::Failed, 1),
            (DeliveryState::Cancelled, 1),
        ]
    );

    // The store's own writes keep the counts (migration 10: the writer,
    // not triggers): a cancel, a requeue to another business, a mark as
    // failed, a claim and its delivered answer.
    store.cancel(1, 2000).await.unwrap();
    resend(&store, 7, 333, 5001, 2000).await;
    store.mark_failed(4, "broken".into(), 2000).await.unwrap();
    let claimed = store
        .claim(BusinessId(111), 9_000, 69_000, room(4), false)
        .await
        .unwrap();
    let sent = claimed.first().expect("a queued delivery of 111");
    delivered(&store, sent, 9_010).await;
    let counted: Vec<(i64, String, i64)> = Connection::open(&path)
        .unwrap()
        .prepare(
            "SELECT IFNULL(business_id, 0), state, COUNT(*) FROM deliveries
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let kept: Vec<(i64, String, i64)> = Connection::open(&path)
        .unwrap()
        .prepare("SELECT business_id, state, n FROM delivery_counts WHERE n <> 0 ORDER BY 1, 2")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(kept, counted);
    assert_eq!(
        store.queue_summary().await.unwrap()[2].business_id,
        333,
        "a delivery that found its business counts for it"
    );
}

/// Migration 11 marks the deliveries already closed (`closed_at`), so a
/// dead delivery keeps nothing waiting while a sending or held one still
/// holds back the later ones of its conversation; afterwards the store's
/// writes keep `closed_at` with the state.
#[actix_rt::test]
async fn an_upgrade_marks_closed_deliveries_and_only_open_ones_hold_their_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    database_before(&path, "ADD COLUMN closed_at", |tx| {
        // Chat 1: a dead delivery, then a queued one. Chat 2: a held one,
        // then a queued one. Chat 3: delivered, sending, queued.
        let rows = [
            (1, "dead"),
            (1, "queued"),
            (2, "held"),
            (2, "queued"),
            (3, "delivered"),
            (3, "sending"),
            (3, "queued"),
        ];
        for (chat, state) in rows {
            tx.execute(
                "INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text,
                     state, created_at, queued_at, next_attempt_at, updated_at, conversation)
                 VALUES (1, 'r', 't', 111, ?1, 'x', ?2, 1000, 1000, 1000, 1000, 'chat:' || ?1)",
                params![chat, state],
            )
            .unwrap();
        }
    });

    let store = SqliteStore::open(&path).unwrap();
    let claimed = store
        .claim(BusinessId(111), 2000, 62_000, room(10), false)
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        [2],
        "only chat 1's queued delivery: its dead one is closed"
    );

    // Answers close deliveries (delivered), reopen them (a retry) or keep
    // them open; an operator cancels and resends. `closed_at` follows.
    delivered(&store, &claimed[0], 2010).await;
    store.cancel(4, 2020).await.unwrap();
    resend(&store, 1, 111, 1, 2030).await;
    let conn = Connection::open(&path).unwrap();
    let mismatched: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM deliveries
             WHERE (closed_at IS NULL) <> (state IN ('queued', 'sending', 'held'))",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        mismatched, 0,
        "closed_at IS NULL exactly while a delivery is open"
    );
    let closed: Vec<(i64, Option<i64>)> = conn
        .prepare("SELECT id, closed_at FROM deliveries WHERE id IN (1, 2, 4, 5) ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        closed,
        [(1, None), (2, Some(2010)), (4, Some(2020)), (5, Some(1000))]
    );
}
