//! Three real `chatbridge serve` processes on one fresh PostgreSQL
//! database, against one fake Market, with the Market's limits compressed
//! to seconds; one is SIGKILLed in the middle of a burst (issue 12). What
//! the fake Market saw must be what one process that never crashes would
//! have done: every accepted event delivered, repeats only of what the
//! killed process had in flight, the business's `max_in_flight` and quota
//! never exceeded by the three together, each chat's messages in order.
//!
//! Every message names its chat and the event's number in that chat, and
//! each chat's events are posted one after the other (the next once the
//! previous was answered 2xx), to the three processes in turn: so the order
//! they were accepted in is the order of their numbers.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbridge::clock::SystemClock;
use chatbridge::market::fake::{FakeConfig, FakeMarket, FakeMethod, ReceivedRequest};
use serde_json::json;

use crate::helpers::*;
use crate::process::*;

const BUSINESSES: [i64; 3] = [8101, 8102, 8103];
const CHATS_PER_BUSINESS: i64 = 4;
const EVENTS_PER_CHAT: u64 = 10;
/// Sends per business per window, for chatbridge and the fake alike.
const QUOTA: usize = 8;
const WINDOW_SECS: u64 = 2;
const MAX_IN_FLIGHT: usize = 2;
/// Long enough for a send (`LATENCY_MS`), short enough that the killed
/// process's leases come back within the test.
const LEASE_SECS: &str = "3";
/// Sends take this long at the fake, so they overlap across processes.
const LATENCY_MS: u64 = 400;
/// Each chat posts its next event this long after the last was accepted:
/// the burst lasts a few seconds, and sends run all along it.
const PACE_MS: u64 = 300;
/// The victim is killed once this many events were accepted (of 120) and
/// the Market is answering `BUSY` requests (so it likely has some of them
/// in flight), or at `KILL_AFTER + 30` whatever the Market does.
const KILL_AFTER: usize = 50;
const BUSY: usize = 4;
const VICTIM: usize = 1;

const ROUTES: &str = r#"
[[routes]]
name = "several"
source = "oms"
event = "several.test"
template = "several"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
"#;
const TEMPLATE: &str = "chat={{chatId}} seq={{seq}}";

/// `(chat, seq)` from a message of `TEMPLATE`.
fn parse(message: &str) -> (i64, u64) {
    let field = |name: &str| {
        message
            .split(' ')
            .find_map(|part| part.strip_prefix(name))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no {name} in a message at the fake: {message:?}"))
    };
    (field("chat="), field("seq=") as u64)
}

/// The most sends of one business the fake received within any
/// `window_ms` (half open, as the fake's and chatbridge's windows are),
/// sliding over the request times, and where that window starts.
fn busiest_window(sends: &[&ReceivedRequest], window_ms: i64) -> (usize, i64) {
    let mut times: Vec<i64> = sends.iter().map(|r| r.at).collect();
    times.sort_unstable();
    let mut best = (0, 0);
    for (i, &start) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|&&t| t < start + window_ms)
            .count();
        if n > best.0 {
            best = (n, start);
        }
    }
    best
}

#[actix_rt::test]
async fn three_processes_on_one_database_behave_like_one_that_never_crashes_when_one_is_killed() {
    let market = FakeMarket::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![API_KEY.into()],
            hourly_limit: QUOTA as u32,
            window_secs: WINDOW_SECS,
            max_in_flight: MAX_IN_FLIGHT,
            latency_ms: LATENCY_MS,
            ..FakeConfig::default()
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let database = TestDatabase::create().await;
    let root = ServeRoot::new(&market).with_storage(&database.url);
    root.write("config/routes.toml", ROUTES);
    root.write("templates/several.hbs", TEMPLATE);
    let (quota, window, max_in_flight) = (
        QUOTA.to_string(),
        WINDOW_SECS.to_string(),
        MAX_IN_FLIGHT.to_string(),
    );
    let env = [
        ("CHATBRIDGE__MARKET__HOURLY_LIMIT", quota.as_str()),
        ("CHATBRIDGE__MARKET__QUOTA_WINDOW_SECS", window.as_str()),
        ("CHATBRIDGE__MARKET__MAX_IN_FLIGHT", max_in_flight.as_str()),
        ("CHATBRIDGE__MARKET__REQUEST_TIMEOUT_SECS", "2"),
        ("CHATBRIDGE__DISPATCH__LEASE_SECS", LEASE_SECS),
        ("CHATBRIDGE__STORAGE__POOL_SIZE", "4"),
        ("CHATBRIDGE__SERVER__WORKERS", "2"),
        ("RUST_LOG", "info"),
    ];
    // Started one after the other would hide a race of their migrations:
    // spawn all three, then wait for each.
    let mut processes: Vec<ServeProcess> = (0..3).map(|_| root.spawn(&env)).collect();
    for p in &mut processes {
        p.wait_ready().await;
    }
    let bases: Vec<String> = processes.iter().map(|p| p.base.clone()).collect();
    let processes = RefCell::new(processes);
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let chats: Vec<(i64, i64)> = BUSINESSES
        .iter()
        .flat_map(|&b| (1..=CHATS_PER_BUSINESS).map(move |c| (b, b * 100 + c)))
        .collect();

    let accepted = Cell::new(0usize);
    let killed = Cell::new(false);
    let lost_posts = Cell::new(0usize);
    let kill_info = Cell::new(None::<(usize, usize, usize)>);
    let started = Instant::now();
    let post_chat = |i: usize, business: i64, chat: i64| {
        let (client, bases, processes) = (&client, &bases, &processes);
        let (accepted, killed, lost_posts, kill_info, market) =
            (&accepted, &killed, &lost_posts, &kill_info, &market);
        async move {
            for seq in 0..EVENTS_PER_CHAT {
                let event = json!({
                    "id": format!("several-{chat}-{seq}"),
                    "type": "several.test",
                    "businessId": business,
                    "chatId": chat,
                    "seq": seq,
                });
                let mut target = (i + seq as usize) % bases.len();
                loop {
                    if killed.get() && target == VICTIM {
                        target = (target + 1) % bases.len();
                    }
                    match post_signed(client, &bases[target], &event).await {
                        Ok(status) if (200..300).contains(&status) => break,
                        Ok(status) => panic!("process {target} answered {status} to {event}"),
                        // The victim died under this post: as an order
                        // system would, send the same event elsewhere
                        // (stored or not, it is then accepted once).
                        Err(_) if killed.get() && target == VICTIM => {
                            lost_posts.set(lost_posts.get() + 1);
                        }
                        Err(e) => panic!("process {target} did not answer {event}: {e}"),
                    }
                }
                accepted.set(accepted.get() + 1);
                let busy = market.in_flight() >= BUSY;
                if !killed.get()
                    && (accepted.get() >= KILL_AFTER && busy || accepted.get() >= KILL_AFTER + 30)
                {
                    processes.borrow_mut()[VICTIM].kill();
                    killed.set(true);
                    kill_info.set(Some((
                        started.elapsed().as_millis() as usize,
                        market.requests().len(),
                        market.in_flight(),
                    )));
                }
                actix_rt::time::sleep(Duration::from_millis(PACE_MS)).await;
            }
        }
    };
    futures_util::future::join_all(
        chats
            .iter()
            .enumerate()
            .map(|(i, &(business, chat))| post_chat(i, business, chat)),
    )
    .await;
    let posted_in = started.elapsed();
    let (killed_at_ms, requests_at_kill, in_flight_at_kill) =
        kill_info.get().expect("the victim was killed");

    // Every accepted event reaches the Market (bounded: about 40 sends
    // per business at 8 per 2 s, plus the killed process's leases).
    let wanted: BTreeSet<(i64, u64)> = chats
        .iter()
        .flat_map(|&(_, chat)| (0..EVENTS_PER_CHAT).map(move |s| (chat, s)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(45);
    let missing = loop {
        let got: BTreeSet<(i64, u64)> = market
            .delivered()
            .iter()
            .map(|r| parse(&r.message))
            .collect();
        let missing: Vec<(i64, u64)> = wanted.difference(&got).copied().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    let processes = processes.into_inner();
    let queue = processes[(VICTIM + 1) % 3]
        .wait_settled(Duration::from_secs(10))
        .await;
    let delivered_in = started.elapsed();
    // What the victim held when it died, as the survivors saw it.
    let reclaimed: usize = processes
        .iter()
        .map(|p| {
            p.log_text()
                .lines()
                .filter(|l| l.contains("reclaimed deliveries whose lease expired"))
                .filter_map(|l| {
                    l.split("count=")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .sum::<usize>()
        })
        .sum();

    let requests = market.requests();
    let stats = market.stats();
    let sends: Vec<&ReceivedRequest> = requests
        .iter()
        .filter(|r| r.method == FakeMethod::SendMessage)
        .collect();
    let mut per_chat: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut by_arrival: Vec<&ReceivedRequest> =
        sends.iter().copied().filter(|r| r.status == 200).collect();
    by_arrival.sort_by_key(|r| r.at);
    for r in &by_arrival {
        let (chat, seq) = parse(&r.message);
        per_chat.entry(chat).or_default().push(seq);
    }
    let mut repeats: BTreeMap<i64, usize> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for (chat, seqs) in &per_chat {
        let mut seen: Vec<u64> = seqs.clone();
        seen.dedup();
        *repeats.entry(chat / 100).or_default() += seqs.len() - seen.len();
        if seen != (0..EVENTS_PER_CHAT).collect::<Vec<_>>() {
            out_of_order.push((chat, seqs.clone()));
        }
    }
    let window_ms = WINDOW_SECS as i64 * 1000;
    let busiest: BTreeMap<i64, (usize, i64)> = BUSINESSES
        .iter()
        .map(|&b| {
            let of_b: Vec<&ReceivedRequest> = sends
                .iter()
                .copied()
                .filter(|r| r.business_id == b)
                .collect();
            (b, busiest_window(&of_b, window_ms))
        })
        .collect();
    println!(
        "three processes: {} events accepted in {posted_in:.2?} ({} posts lost with the victim and sent again); \
         victim killed {killed_at_ms} ms in, after {requests_at_kill} Market requests with {in_flight_at_kill} in flight, \
         its {reclaimed} lease(s) taken over by the others; \
         all delivered and settled {delivered_in:.2?} in; Market requests {} by status {:?}; \
         max in flight seen {:?}; busiest window per business (sends, start) {busiest:?}; \
         repeats per business {repeats:?}; queue {queue:?}",
        accepted.get(),
        lost_posts.get(),
        requests.len(),
        stats.by_status,
        stats.max_in_flight_seen,
    );

    assert_eq!(accepted.get(), wanted.len(), "every event was accepted");
    assert!(
        missing.is_empty(),
        "{} accepted event(s) never reached the Market: {missing:?}; queue {queue:?}",
        missing.len()
    );
    for b in BUSINESSES {
        let seen = stats.max_in_flight_seen.get(&b).copied().unwrap_or(0);
        assert!(
            seen <= MAX_IN_FLIGHT,
            "business {b}: {seen} requests at once at the Market; max_in_flight is {MAX_IN_FLIGHT} across all processes"
        );
        let (most, from) = busiest[&b];
        assert!(
            most <= QUOTA,
            "business {b}: {most} sends within {WINDOW_SECS} s from {from} ms; the quota is {QUOTA}"
        );
        let repeated = repeats.get(&b).copied().unwrap_or(0);
        assert!(
            repeated <= MAX_IN_FLIGHT,
            "business {b}: {repeated} messages delivered twice; only the killed process's sends in flight (at most {MAX_IN_FLIGHT}) may repeat"
        );
    }
    let repeated: usize = repeats.values().sum();
    assert!(
        repeated <= reclaimed,
        "{repeated} messages delivered twice, but the survivors took over only {reclaimed} lease(s): a repeat without a lost lease"
    );
    assert_eq!(
        stats.by_status.get(&420).copied().unwrap_or(0),
        0,
        "the Market refused requests beyond its limits: {:?}",
        stats.by_status
    );
    assert!(
        out_of_order.is_empty(),
        "chats whose messages came out of order or incomplete (seqs as the Market got them): {out_of_order:?}"
    );
    assert_eq!(
        queue, [0; 5],
        "(queued, sending, held, dead, failed) at the end"
    );
    drop(processes);
    market.stop().await;
    drop(database);
}
