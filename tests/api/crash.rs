//! The real binary as a child process, killed and stopped under load: what
//! was accepted (2xx) is delivered after a restart, and only the sends in
//! flight at a SIGKILL may repeat (DESIGN.md, "Delivery semantics").
//!
//! Each test runs `chatbridge serve` on a temp copy of `config/` and
//! `templates/` with one route of its own whose message carries the event's
//! sequence number, so every message at the fake Market (in this process)
//! names the event it came from.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatbridge::clock::SystemClock;
use chatbridge::market::fake::{FakeConfig, FakeMarket};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use crate::helpers::API_KEY;
use crate::process::{post_signed as post, ServeProcess, ServeRoot};

const EVENT_TYPE: &str = "crash.test";
const FIRST_BUSINESS: i64 = 7001;

const ROUTES: &str = r#"
[[routes]]
name = "crash-test"
source = "oms"
event = "crash.test"
template = "crash"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
"#;
const TEMPLATE: &str = "crash test message seq={{seq}}";

/// A temp root with the shipped configuration, our route and template, and
/// the database; every start of the service uses it.
struct Setup {
    root: ServeRoot,
}

impl Setup {
    fn new(market: &FakeMarket) -> Self {
        let root = ServeRoot::new(market);
        root.write("config/routes.toml", ROUTES);
        root.write("templates/crash.hbs", TEMPLATE);
        Self { root }
    }

    /// Starts `chatbridge serve` (two workers, logging at info) and waits
    /// (bounded) until `/readyz` answers 200.
    async fn start(&self, env: &[(&str, &str)]) -> ServeProcess {
        let mut all = vec![("RUST_LOG", "info"), ("CHATBRIDGE__SERVER__WORKERS", "2")];
        all.extend_from_slice(env);
        self.root.start(&all).await
    }
}

fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

fn event(seq: u64, business: i64, chat: i64) -> Value {
    json!({
        "id": format!("crash-{seq}"),
        "type": EVENT_TYPE,
        "businessId": business,
        "chatId": chat,
        "seq": seq,
    })
}

fn seq_of(message: &str) -> Option<u64> {
    message.rsplit("seq=").next()?.trim().parse().ok()
}

/// How many times the fake Market answered 200 to each sequence number.
fn delivered_counts(market: &FakeMarket) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for r in market.delivered() {
        let seq = seq_of(&r.message)
            .unwrap_or_else(|| panic!("a message without seq= at the fake: {:?}", r.message));
        *counts.entry(seq).or_default() += 1;
    }
    counts
}

/// Waits (bounded) until every one of `seqs` reached the fake Market with 200.
async fn wait_all_delivered(
    market: &FakeMarket,
    seqs: &BTreeSet<u64>,
    within: Duration,
) -> BTreeSet<u64> {
    let deadline = Instant::now() + within;
    loop {
        let counts = delivered_counts(market);
        let missing: BTreeSet<u64> = seqs
            .iter()
            .filter(|s| !counts.contains_key(s))
            .copied()
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fake(config: FakeConfig) -> FakeMarket {
    FakeMarket::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![API_KEY.into()],
            ..config
        },
        Arc::new(SystemClock),
    )
    .unwrap()
}

#[actix_rt::test]
async fn a_killed_service_loses_no_accepted_event_and_repeats_at_most_what_was_in_flight() {
    const EVENTS: u64 = 2000;
    const KILL_AFTER: usize = 1000;
    const BUSINESSES: i64 = 5;
    const CHATS_PER_BUSINESS: i64 = 100;
    const MAX_IN_FLIGHT: usize = 4;
    let market = fake(FakeConfig {
        hourly_limit: 0,
        max_in_flight: MAX_IN_FLIGHT,
        latency_ms: 5,
        ..FakeConfig::default()
    });
    let setup = Setup::new(&market);
    let env = [
        // The lease must outlast a request; 5 ms sends fit in 1 s.
        ("CHATBRIDGE__DISPATCH__LEASE_SECS", "2"),
        ("CHATBRIDGE__MARKET__REQUEST_TIMEOUT_SECS", "1"),
        ("CHATBRIDGE__MARKET__HOURLY_LIMIT", "1000000"),
        ("CHATBRIDGE__MARKET__MAX_IN_FLIGHT", "4"),
    ];
    let service = RefCell::new(setup.start(&env).await);
    let base = service.borrow().base.clone();
    let client = client();
    let started = Instant::now();

    let accepted = RefCell::new(BTreeSet::new());
    let refused = Cell::new(0usize);
    let failed = Cell::new(0usize);
    let killed_at = Cell::new(None::<(Duration, usize)>);
    stream::iter(0..EVENTS)
        .map(|seq| {
            let (client, base) = (&client, &base);
            let (accepted, refused, failed, killed_at, service, market) =
                (&accepted, &refused, &failed, &killed_at, &service, &market);
            async move {
                let business = FIRST_BUSINESS + (seq as i64 % BUSINESSES);
                let chat = 1 + (seq as i64 / BUSINESSES) % CHATS_PER_BUSINESS;
                match post(client, base, &event(seq, business, chat)).await {
                    Ok(s) if (200..300).contains(&s) => {
                        let n = {
                            let mut a = accepted.borrow_mut();
                            a.insert(seq);
                            a.len()
                        };
                        if n >= KILL_AFTER && killed_at.get().is_none() {
                            service.borrow_mut().kill();
                            killed_at.set(Some((started.elapsed(), market.delivered().len())));
                        }
                    }
                    Ok(_) => refused.set(refused.get() + 1),
                    Err(_) => failed.set(failed.get() + 1),
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let accepted = accepted.into_inner();
    let (kill_time, delivered_at_kill) = killed_at.get().expect("the service was killed");
    assert_eq!(refused.get(), 0, "posts answered with a non-2xx status");
    let requests_before_restart = market.requests().len();

    let restart = Instant::now();
    let service = {
        drop(service);
        setup.start(&env).await
    };
    let missing = wait_all_delivered(&market, &accepted, Duration::from_secs(60)).await;
    let delivered_in = restart.elapsed();
    let queue = service.wait_settled(Duration::from_secs(20)).await;

    let counts = delivered_counts(&market);
    let repeated: Vec<(u64, usize)> = counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&s, &n)| (s, n))
        .collect();
    let extra: usize = repeated.iter().map(|(_, n)| n - 1).sum();
    let stored_not_accepted = counts.keys().filter(|s| !accepted.contains(s)).count();
    println!(
        "crash: posted {EVENTS}, accepted {}, transport errors {} (killed at {:.2?} after {} deliveries); \
         after restart all accepted delivered in {:.2?}; delivered distinct {}, of them not acknowledged to the poster {}; \
         duplicated {} message(s), {} extra copies {:?}; Market requests {} before restart, {} total, {:?}; queue after: {:?}",
        accepted.len(),
        failed.get(),
        kill_time,
        delivered_at_kill,
        delivered_in,
        counts.len(),
        stored_not_accepted,
        repeated.len(),
        extra,
        repeated,
        requests_before_restart,
        market.requests().len(),
        market.stats().by_status,
        queue,
    );
    assert!(
        missing.is_empty(),
        "{} accepted event(s) never reached the Market within 60 s of the restart, e.g. {:?}; queue: {:?}",
        missing.len(),
        missing.iter().take(20).collect::<Vec<_>>(),
        queue
    );
    assert!(accepted.len() >= KILL_AFTER);
    let window = MAX_IN_FLIGHT * BUSINESSES as usize;
    assert!(
        extra <= window,
        "{extra} repeated sends; at most {window} (max_in_flight × businesses) may repeat after a SIGKILL: {repeated:?}"
    );
    assert_eq!(
        queue[0] + queue[1] + queue[2],
        0,
        "work left over: {queue:?}"
    );
    assert_eq!(
        queue[3] + queue[4],
        0,
        "dead or failed deliveries: {queue:?}"
    );
    drop(service);
    market.stop().await;
}

#[actix_rt::test]
async fn sigterm_stops_taking_webhooks_and_finishes_in_flight_sends() {
    const EVENTS: u64 = 40;
    const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
    let market = fake(FakeConfig {
        latency_ms: 300,
        ..FakeConfig::default()
    });
    let setup = Setup::new(&market);
    let mut service = setup
        .start(&[("CHATBRIDGE__DISPATCH__LEASE_SECS", "60")])
        .await;
    // One business, its own chat per event: 4 sends at a time, 300 ms each.
    let mut accepted = BTreeSet::new();
    for seq in 0..EVENTS {
        let status = post(
            &service.client,
            &service.base,
            &event(seq, FIRST_BUSINESS, 100 + seq as i64),
        )
        .await
        .expect("post");
        assert_eq!(status, 202);
        accepted.insert(seq);
    }
    // The first batch is done and the second in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while market.delivered().len() < 4 {
        assert!(Instant::now() < deadline, "nothing delivered within 10 s");
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let delivered_at_term = market.delivered().len();
    let term = Instant::now();
    service.sigterm();

    // New connections are refused from now on (bounded wait for the signal
    // to be handled); whatever is still answered 2xx counts as accepted.
    let fresh = || {
        awc::Client::builder()
            .timeout(Duration::from_secs(5))
            .finish()
    };
    let mut refused_while_alive = None;
    let mut late_accepted = 0;
    let mut seq = EVENTS;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let alive = service.try_wait().is_none();
        match post(
            &fresh(),
            &service.base,
            &event(seq, FIRST_BUSINESS, 100 + seq as i64),
        )
        .await
        {
            Ok(s) if (200..300).contains(&s) => {
                accepted.insert(seq);
                late_accepted += 1;
            }
            Ok(_) | Err(_) => {
                refused_while_alive = Some(alive);
                break;
            }
        }
        seq += 1;
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    let first_refusal = term.elapsed();

    let status = service
        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 3))
        .await;
    let exit_time = term.elapsed();
    let delivered_at_exit = market.delivered().len();
    let requests_at_exit = market.requests().len();
    // Nothing of the stopped process reaches the Market afterwards.
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let requests_after_exit = market.requests().len();
    println!(
        "sigterm: accepted {} ({late_accepted} after SIGTERM); delivered {delivered_at_term} at SIGTERM, \
         {delivered_at_exit} at exit ({exit_time:.2?} after SIGTERM, exit {status:?}); \
         first refused post {first_refusal:.2?} after SIGTERM (process still alive then: {refused_while_alive:?})",
        accepted.len()
    );
    let status = status.unwrap_or_else(|| {
        panic!("the service did not exit within {SHUTDOWN_TIMEOUT_SECS} s + 3 s of SIGTERM")
    });
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        refused_while_alive.is_some(),
        "the service still took new webhooks 2 s after SIGTERM"
    );
    assert!(
        delivered_at_exit > delivered_at_term,
        "the sends in flight at SIGTERM did not finish ({delivered_at_term} delivered then, {delivered_at_exit} at exit)"
    );
    assert_eq!(
        requests_at_exit, requests_after_exit,
        "the Market got requests after the process exited"
    );

    // A long lease: a delivery left `sending` would stay stuck.
    let service = setup
        .start(&[("CHATBRIDGE__DISPATCH__LEASE_SECS", "600")])
        .await;
    let missing = wait_all_delivered(&market, &accepted, Duration::from_secs(30)).await;
    let queue = service.wait_settled(Duration::from_secs(10)).await;
    let counts = delivered_counts(&market);
    let repeated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    println!(
        "sigterm: after restart delivered {} distinct, repeated {:?}, queue {:?}",
        counts.len(),
        repeated,
        queue
    );
    assert!(
        missing.is_empty(),
        "accepted but not delivered after the restart (left `sending`?): {missing:?}; queue {queue:?}"
    );
    assert!(
        repeated.is_empty(),
        "delivered more than once after a graceful stop: {repeated:?}"
    );
    assert_eq!(
        queue, [0; 5],
        "(queued, sending, held, dead, failed) after the restart"
    );
    drop(service);
    market.stop().await;
}

#[actix_rt::test]
async fn the_service_waits_out_a_market_outage_and_delivers_when_it_returns() {
    const EVENTS: u64 = 20;
    const BUSINESSES: i64 = 5;
    const OUTAGE: Duration = Duration::from_secs(5);
    let market = fake(FakeConfig {
        failure_rate: 1.0,
        ..FakeConfig::default()
    });
    let setup = Setup::new(&market);
    let service = setup
        .start(&[
            ("CHATBRIDGE__DISPATCH__INITIAL_BACKOFF_SECS", "1"),
            ("CHATBRIDGE__DISPATCH__MAX_BACKOFF_SECS", "2"),
        ])
        .await;
    let outage_started = Instant::now();
    let mut accepted = BTreeSet::new();
    for seq in 0..EVENTS {
        let business = FIRST_BUSINESS + seq as i64 % BUSINESSES;
        let status = post(
            &service.client,
            &service.base,
            &event(seq, business, 100 + seq as i64),
        )
        .await
        .expect("post");
        assert_eq!(status, 202);
        accepted.insert(seq);
    }
    let remaining = OUTAGE.saturating_sub(outage_started.elapsed());
    actix_rt::time::sleep(remaining).await;
    let during = market.requests().len();
    let failed = market.stats().by_status.get(&500).copied().unwrap_or(0);
    market.configure(|c| c.failure_rate = 0.0);
    let outage = outage_started.elapsed();

    let missing = wait_all_delivered(&market, &accepted, Duration::from_secs(15)).await;
    let recovered_in = outage_started.elapsed() - outage;
    let queue = service.wait_settled(Duration::from_secs(10)).await;
    let counts = delivered_counts(&market);
    let repeated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    // About outage/1 s + 2 tries per event (backoff 1 s doubling to 2 s).
    let bound = EVENTS as usize * (outage.as_secs() as usize + 2);
    println!(
        "outage: {EVENTS} events, {during} Market requests ({failed} answered 500) during a {outage:.2?} outage \
         (bound {bound}); all delivered {recovered_in:.2?} after it ended; repeated {repeated:?}; queue {queue:?}"
    );
    assert!(
        during >= EVENTS as usize,
        "not every event was tried during the outage: {during}"
    );
    // The rate itself is checked on the injected clock, in
    // dispatch::a_market_outage_is_retried_at_the_backoff_rate_of_the_clock;
    // here real time only decides how many tries fit, so it is printed.
    assert!(
        missing.is_empty(),
        "not delivered after the outage: {missing:?}; queue {queue:?}"
    );
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    assert_eq!(queue, [0; 5], "(queued, sending, held, dead, failed)");
    drop(service);
    market.stop().await;
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// SIGTERM's budget is one `shutdown_timeout_secs` for requests and sends
/// together, and the dispatcher stops claiming when the signal comes: no
/// send starts after it, even while a slow webhook upload keeps the HTTP
/// server draining.
#[actix_rt::test]
async fn sigterm_starts_no_new_send_and_exits_within_one_shutdown_timeout() {
    use std::io::Write;
    const EVENTS: u64 = 12;
    const SHUTDOWN_TIMEOUT_SECS: u64 = 3;
    let market = fake(FakeConfig {
        latency_ms: 2500,
        ..FakeConfig::default()
    });
    let setup = Setup::new(&market);
    let env = [
        ("CHATBRIDGE__DISPATCH__LEASE_SECS", "60"),
        ("CHATBRIDGE__MARKET__REQUEST_TIMEOUT_SECS", "5"),
        ("CHATBRIDGE__SERVER__SHUTDOWN_TIMEOUT_SECS", "3"),
    ];
    let mut service = setup.start(&env).await;
    let mut accepted = BTreeSet::new();
    for seq in 0..EVENTS {
        let event = event(seq, FIRST_BUSINESS, 100 + seq as i64);
        let status = post(&service.client, &service.base, &event)
            .await
            .expect("post");
        assert_eq!(status, 202);
        accepted.insert(seq);
    }
    // The first 4 sends are in flight (they take 2.5 s each).
    let deadline = Instant::now() + Duration::from_secs(5);
    while service.queue().await[1] < 4 {
        assert!(Instant::now() < deadline, "no sends in flight within 5 s");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    // An upstream in the middle of a slow upload keeps a request open.
    let addr = service.base.trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.write_all(
        b"POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .expect("write a partial request");
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let term_at = epoch_ms();
    let term = Instant::now();
    service.sigterm();
    // Honest exit: about one shutdown_timeout_secs (3 s) after SIGTERM. The
    // stalled upload never finishes and the sends take 2.5 s, so a shutdown
    // without the budget never exits; 3x the budget is the margin for a
    // loaded machine, not a measurement (the figure is printed below).
    let status = service
        .wait_exit(Duration::from_secs(3 * SHUTDOWN_TIMEOUT_SECS))
        .await;
    let exit_time = term.elapsed();
    drop(slow);
    let started_after: Vec<i64> = market
        .requests()
        .iter()
        .map(|r| r.at - term_at)
        .filter(|&d| d > 50)
        .collect();
    println!(
        "sigterm budget: exit {status:?} {exit_time:.2?} after SIGTERM (budget {SHUTDOWN_TIMEOUT_SECS} s); \
         sends started after SIGTERM (ms after it): {started_after:?}"
    );
    let status = status.unwrap_or_else(|| {
        panic!("the service did not exit within 3 x shutdown_timeout_secs of SIGTERM")
    });
    assert!(status.success(), "exit status after SIGTERM: {status}");

    // Whatever happened, nothing accepted is lost or stuck.
    let service = setup
        .start(&[
            ("CHATBRIDGE__DISPATCH__LEASE_SECS", "600"),
            ("CHATBRIDGE__MARKET__REQUEST_TIMEOUT_SECS", "5"),
        ])
        .await;
    let missing = wait_all_delivered(&market, &accepted, Duration::from_secs(20)).await;
    let queue = service.wait_settled(Duration::from_secs(10)).await;
    let counts = delivered_counts(&market);
    let repeated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    println!("sigterm budget: after restart repeated {repeated:?}, queue {queue:?}");
    assert!(
        missing.is_empty(),
        "not delivered after the restart: {missing:?}; queue {queue:?}"
    );
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    assert!(
        started_after.is_empty(),
        "{} send(s) started after SIGTERM (ms after it: {started_after:?}); the dispatcher must stop claiming at once",
        started_after.len()
    );
    drop(service);
    market.stop().await;
}
