//! Group commit: the events (webhooks) and records (Market answers) this
//! process writes at the same moment go into one transaction, so a flood
//! of them costs one commit, one round of locks and one notification per
//! business for each batch, not for each write.
//!
//! Why it matters more than the round trips: a transaction that sends a
//! NOTIFY holds PostgreSQL's one notification-queue lock from before its
//! commit until after it, so the commits of notifying transactions (every
//! insert and every record) never share a WAL flush: they queue, one fsync
//! each, across the whole server. One transaction per batch turns that
//! queue into one fsync per batch.
//!
//! Writes wait in a channel for a gathering task on the store's runtime;
//! it takes whatever is waiting (up to [`MAX_BATCH`]) whenever one of its
//! [`Batcher::start`] `parallel` slots is free, so under no load a write
//! runs alone at once and under load the batches grow by themselves.
//! A batch:
//! - takes every event's business locks (shared) and subject locks in one
//!   statement each, in the fixed order of `writes::lock_for_events`;
//! - runs the writes' statements concurrently on its connection (they
//!   travel pipelined), in the order the writes arrived;
//! - notifies once per business with work due, then commits; each caller
//!   hears back only after that commit (durable 2xx).
//!
//! Most batches need not wait for any answer before the commit (every
//! event's chats known and not ordered against other events, no
//! `chats/new` record): those are sent whole, BEGIN to COMMIT, in one
//! round trip (`pipelined.rs`); the others go step by step as above.
//!
//! A write that fails must not fail or lose its batch-mates: the batch is
//! rolled back and each write runs again alone, in its own transaction,
//! and answers for itself. A lost connection fails them all (each hears
//! the database is unavailable, as a lone write would). The same event
//! twice in one batch (one webhook posted twice at once) runs its second
//! copy after the batch's commit, which then reads the stored event.
//! Records of `chats/new` answers never come here (see
//! `writes::record_needs_lock`).

use std::collections::HashSet;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::pipelined::{event_in_one_statement, write_pipelined, Item, Written};
use super::writes::{
    announce_all, event_businesses, event_subject, insert_alone, lock_for_events, record_alone,
    write_event, write_record,
};
use super::*;

/// Writes waiting beyond this many go into the next batch.
const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<StoreResult<T>>;

enum Write {
    Insert(NewEvent, Reply<Inserted>),
    Record(Attempt, Millis, Reply<()>),
}

/// What a write gave back inside its batch, answered after the commit.
enum Done {
    Inserted(Inserted),
    Recorded,
}

impl Write {
    fn answer(self, done: StoreResult<Done>) {
        match self {
            Write::Insert(_, reply) => {
                let _ = reply.send(done.and_then(|d| match d {
                    Done::Inserted(i) => Ok(i),
                    Done::Recorded => {
                        Err(StoreError::Database("a record answered an insert".into()))
                    }
                }));
            }
            Write::Record(_, _, reply) => {
                let _ = reply.send(done.map(|_| ()));
            }
        }
    }

    async fn alone(self, client: &mut Object) {
        match self {
            Write::Insert(event, reply) => {
                let _ = reply.send(insert_alone(client, &event).await);
            }
            Write::Record(attempt, now, reply) => {
                let _ = reply.send(record_alone(client, &attempt, now).await);
            }
        }
    }

    /// The write's steps inside the batch's transaction; returns what to
    /// answer and the businesses to announce.
    async fn run(&self, tx: &impl GenericClient) -> StoreResult<(Done, Vec<Option<i64>>)> {
        match self {
            Write::Insert(event, _) => {
                let (inserted, due) = write_event(tx, event).await?;
                Ok((Done::Inserted(inserted), due))
            }
            Write::Record(attempt, now, _) => {
                let due = write_record(tx, attempt, *now).await?;
                Ok((Done::Recorded, due.into_iter().collect()))
            }
        }
    }
}

pub(super) struct Batcher {
    writes: mpsc::UnboundedSender<Write>,
}

impl Batcher {
    /// Starts the gathering task on `runtime`: at most `parallel` batches
    /// at once, each on a connection of `pool`.
    pub(super) fn start(runtime: &tokio::runtime::Handle, pool: Pool, parallel: usize) -> Self {
        let (writes, waiting) = mpsc::unbounded_channel();
        runtime.spawn(gather(pool, waiting, parallel.max(1)));
        Self { writes }
    }

    pub(super) async fn insert(&self, event: NewEvent) -> StoreResult<Inserted> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Insert(event, reply))?;
        answer.await.map_err(|_| gone())?
    }

    pub(super) async fn record(&self, attempt: Attempt, now: Millis) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Record(attempt, now, reply))?;
        answer.await.map_err(|_| gone())?
    }

    fn send(&self, write: Write) -> StoreResult<()> {
        self.writes.send(write).map_err(|_| StoreError::Closed)
    }
}

fn gone() -> StoreError {
    StoreError::Database("the store's write task ended before answering".into())
}

async fn gather(pool: Pool, mut waiting: mpsc::UnboundedReceiver<Write>, parallel: usize) {
    let slots = Arc::new(Semaphore::new(parallel));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            run_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

async fn run_batch(pool: &Pool, batch: Vec<Write>) {
    let mut client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            let e = db_error(e);
            for write in batch {
                write.answer(Err(e.clone()));
            }
            return;
        }
    };
    // The same event twice: its second copy waits for the first's commit.
    let mut keys = HashSet::new();
    let (together, after): (Vec<Write>, Vec<Write>) =
        batch.into_iter().partition(|write| match write {
            Write::Insert(event, _) => {
                keys.insert((event.source.clone(), event.external_id.clone()))
            }
            Write::Record(..) => true,
        });
    if together.len() == 1 {
        for write in together {
            write.alone(&mut client).await;
        }
    } else {
        let in_one_trip = together.iter().all(|write| match write {
            Write::Insert(event, _) => event_in_one_statement(event),
            Write::Record(..) => true,
        });
        let outcome = match in_one_trip {
            true => write_in_one_trip(&client, &together).await,
            false => write_together(&mut client, &together).await,
        };
        match outcome {
            Ok(done) => {
                for (write, done) in together.into_iter().zip(done) {
                    write.answer(done);
                }
            }
            // Nothing of the batch was stored, or its commit is in doubt:
            // each write hears it, as it would alone.
            Err(e) if e.is_unavailable() || client.is_closed() => {
                for write in together {
                    write.answer(Err(e.clone()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = together.len(), "a write failed in a batch; each runs again alone");
                for write in together {
                    write.alone(&mut client).await;
                }
            }
        }
    }
    for write in after {
        write.alone(&mut client).await;
    }
}

/// The batch in one transaction sent at once (`pipelined.rs`); `Err` (and
/// nothing stored) when any write failed. After the commit each write has
/// its answer (an event stored before is read then, and only that event
/// hears if the read fails).
async fn write_in_one_trip(
    client: &Object,
    writes: &[Write],
) -> StoreResult<Vec<StoreResult<Done>>> {
    let items: Vec<Item<'_>> = writes
        .iter()
        .map(|write| match write {
            Write::Insert(event, _) => Item::Event(event),
            Write::Record(attempt, now, _) => Item::Record(attempt, *now),
        })
        .collect();
    let written = write_pipelined(client, &items).await?;
    let mut done = Vec::with_capacity(writes.len());
    for (write, written) in writes.iter().zip(written) {
        done.push(match (write, written) {
            (Write::Insert(event, _), Written::Event(Some((id, ids)))) => {
                Ok(Done::Inserted(Inserted::New(stored_event(event, id, ids))))
            }
            (Write::Insert(event, _), Written::Event(None)) => {
                event_by_key(client, &event.source, &event.external_id)
                    .await
                    .and_then(|stored| {
                        stored
                            .ok_or_else(|| StoreError::Database("duplicate event vanished".into()))
                    })
                    .map(|stored| Done::Inserted(Inserted::Duplicate(stored)))
            }
            (Write::Record(..), Written::Record) => Ok(Done::Recorded),
            _ => Err(StoreError::Database(
                "a batch's answers came out of order".into(),
            )),
        });
    }
    Ok(done)
}

/// The event as stored by one statement: its deliveries' ids in order.
fn stored_event(event: &NewEvent, id: i64, ids: Vec<i64>) -> StoredEvent {
    let deliveries = event
        .deliveries
        .iter()
        .zip(ids)
        .map(|(d, id)| DeliverySummary {
            id,
            route: d.route.clone(),
            state: match d.rendered {
                Ok(_) => DeliveryState::Queued,
                Err(_) => DeliveryState::Failed,
            },
        })
        .collect();
    event.stored(id, deliveries)
}

/// The batch in one transaction, step by step; `Err` (and the transaction
/// rolled back) when any write failed.
async fn write_together(
    client: &mut Object,
    writes: &[Write],
) -> StoreResult<Vec<StoreResult<Done>>> {
    let tx = client.transaction().await.map_err(db_error)?;
    let mut businesses = Vec::new();
    let mut subjects = Vec::new();
    for write in writes {
        if let Write::Insert(event, _) = write {
            businesses.extend(event_businesses(event));
            subjects.extend(event_subject(event));
        }
    }
    businesses.sort_unstable();
    businesses.dedup();
    subjects.sort_unstable();
    subjects.dedup();
    lock_for_events(&tx, &businesses, &subjects).await?;
    let results = futures_util::future::join_all(writes.iter().map(|w| w.run(&tx))).await;
    let mut done = Vec::with_capacity(writes.len());
    let mut due = Vec::new();
    for result in results {
        let (d, businesses) = result?;
        done.push(Ok(d));
        due.extend(businesses);
    }
    announce_all(&tx, &mut due).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(done)
}
