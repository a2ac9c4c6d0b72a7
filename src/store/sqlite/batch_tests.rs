//! The writer's group commit: a write that fails undoes only its own
//! work, even though the batch it was in ran without savepoints first.

use super::*;

#[actix_rt::test]
async fn a_write_that_fails_midway_undoes_only_itself_and_its_batch_mates_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("batch.db")).unwrap());
    store
        .write(|conn| {
            conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
                .map_err(db_error)
        })
        .await
        .unwrap();

    // Hold the writer, so that what follows queues up and runs as one batch.
    let (started, writer_busy) = tokio::sync::oneshot::channel();
    let mut started = Some(started);
    let holder = store.clone();
    let hold = actix_rt::spawn(async move {
        holder
            .write(move |_| {
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            })
            .await
    });
    writer_busy.await.unwrap();
    let insert = |x: i64, fail: bool| {
        store.write(move |conn| {
            conn.execute("INSERT INTO t (x) VALUES (?1)", [x])
                .map_err(db_error)?;
            match fail {
                true => Err(StoreError::Conflict(format!("{x} refused after writing"))),
                false => Ok(x),
            }
        })
    };
    let answers = futures_util::future::join_all((1..=9).map(|x| insert(x, x == 5))).await;
    hold.await.unwrap().unwrap();

    for (x, answer) in (1..=9).zip(&answers) {
        match x {
            5 => assert!(
                matches!(answer, Err(StoreError::Conflict(m)) if m.contains("5 refused")),
                "write 5 must fail with its own error, got {answer:?}"
            ),
            _ => assert_eq!(answer.as_ref().ok(), Some(&x), "write {x}"),
        }
    }
    let stored: Vec<i64> = store
        .read(|conn| {
            conn.prepare("SELECT x FROM t ORDER BY x")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(db_error)
        })
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![1, 2, 3, 4, 6, 7, 8, 9],
        "every write but the failed one stored, each once"
    );
}
