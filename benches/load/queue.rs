//! Phase "queue": stores seeded with 1,000 and 1,000,000 queued deliveries; claim + send + record on each, the time to the first delivery, and the service under the big backlog.

use super::*;

pub(crate) struct DbCounts {
    pub(crate) states: BTreeMap<String, i64>,
    pub(crate) attempts: i64,
    pub(crate) doubled: i64,
}

/// `Backend::seed` on SQLite: rows inserted one by one in one transaction,
/// indexes dropped meanwhile and made again after.
pub(crate) fn seed_sqlite(
    path: &Path,
    n: usize,
    sample_body: &str,
    text: &str,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let _ = std::fs::remove_file(path);
    // The service's own code creates the schema.
    drop(SqliteStore::open(path).map_err(|e| e.to_string())?);
    let e = |e: rusqlite::Error| e.to_string();
    let mut conn = rusqlite::Connection::open(path).map_err(e)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(e)?;
    // Out of WAL for the bulk load (the writer thread may still be closing).
    let mut mode = String::new();
    for _ in 0..250 {
        match conn.query_row("PRAGMA journal_mode = DELETE", [], |r| {
            r.get::<_, String>(0)
        }) {
            Ok(m) if m == "delete" => {
                mode = m;
                break;
            }
            Ok(m) => mode = m,
            Err(err) => mode = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if mode != "delete" {
        return Err(format!(
            "cannot leave WAL mode for the bulk insert (mode {mode})"
        ));
    }
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .map_err(e)?;
    // Indexes are dropped for the load and made again after it (faster).
    let indexes: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
             AND tbl_name IN ('events', 'deliveries')",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(e)?;
    let tx = conn.transaction().map_err(e)?;
    for (name, _) in &indexes {
        tx.execute_batch(&format!("DROP INDEX \"{name}\""))
            .map_err(e)?;
    }
    let start = now_ms() - 3_600_000;
    {
        let mut ev = tx
            .prepare(
                "INSERT INTO events (id, source, external_id, event_type, payload, received_at)
                 VALUES (?1, 'oms', ?2, 'order.shipped', ?3, ?4)",
            )
            .map_err(e)?;
        let mut de = tx
            .prepare(
                "INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id,
                     conversation, text, state, attempts, created_at, queued_at, next_attempt_at,
                     updated_at)
                 VALUES (?1, ?1, 'order-shipped', 'order_shipped', ?2, ?3, 'chat:' || ?3, ?4,
                     'queued', 0, ?5, ?5, ?5, ?5)",
            )
            .map_err(e)?;
        for i in 0..n as i64 {
            let business = FIRST_BUSINESS + i % BUSINESSES;
            let chat = 100_000 + (i / BUSINESSES) % CHATS_PER_BUSINESS;
            let order = (90_000_000 + i).to_string();
            let external = format!("seed-{i:09}");
            let at = start + i * 3_000_000 / n as i64;
            let payload = sample_body
                .replace("evt-1001", &external)
                .replace("51234567", &order);
            ev.execute(rusqlite::params![i + 1, external, payload, at])
                .map_err(e)?;
            de.execute(rusqlite::params![
                i + 1,
                business,
                chat,
                text.replace("51234567", &order),
                at
            ])
            .map_err(e)?;
        }
    }
    for (_, sql) in &indexes {
        tx.execute_batch(sql).map_err(e)?;
    }
    tx.commit().map_err(e)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(e)?;
    if mode != "wal" {
        return Err(format!("cannot return to WAL mode (mode {mode})"));
    }
    drop(conn);
    // The load ran with synchronous = OFF: write it all back now, or the
    // service's first checkpoint pays for the whole file.
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    Ok(t0.elapsed())
}

#[derive(Default)]
pub(crate) struct ScaleResult {
    pub(crate) claim_us: Vec<u32>,
    pub(crate) send_us: Vec<u32>,
    pub(crate) record_us: Vec<u32>,
    pub(crate) cycle_us: Vec<u32>,
    pub(crate) businesses_us: Vec<u32>,
}

/// One claim + send + record on `store`, timed: `(claim, send, record)`.
pub(crate) async fn claim_send_record(
    store: &dyn Store,
    client: &mut KeepAlive,
    market: SocketAddr,
    business: BusinessId,
) -> Result<(Duration, Duration, Duration), String> {
    let now = now_ms();
    let t1 = Instant::now();
    let claimed = store
        .claim(
            business,
            now,
            now + 60_000,
            ClaimLimits {
                sends: 1,
                chat_lookups: 0,
                total: 1,
                caps: chatbridge::store::SharedCaps {
                    max_in_flight: 1,
                    send_limit: u32::MAX,
                    lookup_limit: 0,
                    window_ms: 3_600_000,
                },
            },
            false,
        )
        .await
        .map_err(|e| e.to_string())?;
    let t2 = Instant::now();
    let Some(c) = claimed.into_iter().next() else {
        return Err(format!("nothing to claim for business {}", business.0));
    };
    // The seeded deliveries all name their chat.
    let Some(chat) = c.chat_id else {
        return Err(format!("delivery {} has no chat id", c.id));
    };
    let body = serde_json::to_vec(&serde_json::json!({ "message": c.text })).unwrap();
    let mut req = format!(
        "POST /v2/businesses/{}/chats/message?chatId={} HTTP/1.1\r\nHost: {market}\r\n\
         Api-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        c.business_id.0,
        chat.0,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let status = client
        .request(&req)
        .map_err(|e| format!("sending to the fake Market: {e}"))?;
    let t3 = Instant::now();
    if status != 200 {
        return Err(format!("the fake Market answered {status}"));
    }
    let finished = now_ms();
    store
        .record(
            Attempt {
                delivery_id: c.id,
                claim_token: c.claim_token,
                business_id: c.business_id,
                method: MarketMethod::SendMessage,
                started_at: now,
                finished_at: finished,
                latency_ms: (t3 - t2).as_millis() as i64,
                http_status: Some(200),
                api_errors: vec![],
                error: None,
                counts_for_quota: true,
                window_used_up_until: None,
                verdict: Verdict::Delivered,
            },
            finished,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((t2 - t1, t3 - t2, t3.elapsed()))
}

/// `Store::claim` of one delivery, its send to the fake Market and its
/// `Store::record`, in process, alternating between the stores (so that
/// disk noise falls on both alike), round the businesses: `iters` times
/// each or until `budget` is spent. Then `Store::queued_businesses` (what
/// every dispatcher round asks first) up to 5 times on each store, within
/// `budget`, when `with_businesses`.
pub(crate) fn scale(
    backend: &Backend,
    urls: [&str; 2],
    market: SocketAddr,
    iters: usize,
    budget: Duration,
    with_businesses: bool,
) -> Result<[ScaleResult; 2], String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stores = [backend.open(urls[0])?, backend.open(urls[1])?];
        let mut client = KeepAlive::new(market);
        let mut results: [ScaleResult; 2] = Default::default();
        let warmup = 5;
        let started = Instant::now();
        let us = |d: Duration| d.as_micros() as u32;
        for k in 0..iters + warmup {
            if started.elapsed() > budget && k > warmup + 5 {
                break;
            }
            let business = BusinessId(FIRST_BUSINESS + (k as i64 % BUSINESSES));
            for (store, r) in stores.iter().zip(results.iter_mut()) {
                let (claim, send, record) =
                    claim_send_record(store.as_ref(), &mut client, market, business).await?;
                if k >= warmup {
                    r.claim_us.push(us(claim));
                    r.send_us.push(us(send));
                    r.record_us.push(us(record));
                    r.cycle_us.push(us(claim + send + record));
                }
            }
        }
        if with_businesses {
            for (store, r) in stores.iter().zip(results.iter_mut()) {
                let started = Instant::now();
                for _ in 0..5 {
                    let t0 = Instant::now();
                    let found = store.queued_businesses().await.map_err(|e| e.to_string())?;
                    r.businesses_us.push(us(t0.elapsed()));
                    if found.len() != BUSINESSES as usize {
                        return Err(format!(
                            "queued_businesses found {} businesses",
                            found.len()
                        ));
                    }
                    if started.elapsed() > budget {
                        break;
                    }
                }
            }
        }
        for r in results.iter_mut() {
            for v in [
                &mut r.claim_us,
                &mut r.send_us,
                &mut r.record_us,
                &mut r.cycle_us,
                &mut r.businesses_us,
            ] {
                v.sort_unstable();
            }
        }
        Ok(results)
    })
}

/// Seeds stores with 1k and 1M queued deliveries; claim cost with each,
/// the service's time to first delivery with each, and its memory with 1M.
pub(crate) fn queue_phases(
    report: &mut Report,
    plan: &Plan,
    backend: &Backend,
    dir: &Path,
    sample: &Value,
    sample_body: &str,
) -> Result<u64, String> {
    let pipeline = Pipeline::load(&Path::new(ROOT).join("config"))
        .map_err(|p| format!("loading config/: {}", p.join("; ")))?;
    let meta = EventMeta {
        source: "oms".into(),
        event_type: "order.shipped".into(),
        id: "evt-1001".into(),
        received_at: to_rfc3339(now_ms()),
        business_id: None,
    };
    let text = pipeline
        .renderer
        .render_text(
            "order_shipped",
            EventContext::new(sample.clone(), &meta).context(),
        )
        .map_err(|e| e.to_string())?;

    let small = backend.fresh("queue-1k")?;
    let big = backend.fresh("queue-1m")?;
    backend.seed(&small, plan.small_queue, sample_body, &text)?;
    log(format!(
        "seeding {} queued deliveries ({})",
        thousands(plan.big_queue as f64),
        backend.name()
    ));
    let took = backend.seed(&big, plan.big_queue, sample_body, &text)?;
    let sec = &format!(
        "queue size, {} (1,000 vs 1,000,000 queued; 50 businesses × 1,000 chats)",
        backend.name()
    );
    report.row(
        sec,
        format!(
            "bulk insert of {} deliveries + events",
            thousands(plan.big_queue as f64)
        ),
        match chatbridge::store::sqlite_path(&big).and_then(|p| std::fs::metadata(p).ok()) {
            Some(file) => format!(
                "{:.1} s (+ fsync), file {:.0} MB",
                took.as_secs_f64(),
                file.len() as f64 / 1e6
            ),
            None => format!("{:.1} s (in the server, one statement)", took.as_secs_f64()),
        },
    );

    let (mut fake, market) = start_fake(dir)?;
    log("claim + send + record at 1k and 1M queued (Store API, in process)");
    let budget = Duration::from_secs_f64(plan.scale_secs);
    // Each iteration takes one delivery from each store: leave most queued.
    let iters = plan.scale_iters.min(plan.small_queue / 2);
    let [s_small, s_big] = scale(backend, [&small, &big], market, iters, budget, !plan.quick)?;
    let line = |r: &ScaleResult, v: fn(&ScaleResult) -> &Vec<u32>| {
        format!("p50 {}  p99 {}", ms(pct(v(r), 0.5)), ms(pct(v(r), 0.99)))
    };
    let claim_ratio = pct(&s_big.claim_us, 0.5) / pct(&s_small.claim_us, 0.5);
    let cycle_ratio = pct(&s_big.cycle_us, 0.5) / pct(&s_small.cycle_us, 0.5);
    report.row(
        sec,
        format!("Store::claim(1), 1k queued (n={})", s_small.claim_us.len()),
        line(&s_small, |r| &r.claim_us),
    );
    report.row(
        sec,
        format!("Store::claim(1), 1M queued (n={})", s_big.claim_us.len()),
        line(&s_big, |r| &r.claim_us),
    );
    report.row(
        sec,
        "claim + send + record, 1k queued",
        line(&s_small, |r| &r.cycle_us),
    );
    report.row(
        sec,
        "claim + send + record, 1M queued",
        line(&s_big, |r| &r.cycle_us),
    );
    report.row(
        sec,
        "  of which send / record (1M)",
        format!(
            "{} / {}",
            ms(pct(&s_big.send_us, 0.5)),
            ms(pct(&s_big.record_us, 0.5))
        ),
    );
    report.target(
        sec,
        "claim p50 at 1M ÷ at 1k (claim + send + record)",
        format!("{claim_ratio:.2}× ({cycle_ratio:.2}×)"),
        "≤ 2×",
        claim_ratio <= 2.0,
    );
    if !plan.quick {
        report.row(
            sec,
            format!(
                "Store::queued_businesses (each dispatcher round) 1k / 1M (n={}/{})",
                s_small.businesses_us.len(),
                s_big.businesses_us.len()
            ),
            format!(
                "p50 {} / {}",
                ms(pct(&s_small.businesses_us, 0.5)),
                ms(pct(&s_big.businesses_us, 0.5))
            ),
        );
    }

    // The service itself on each store: time to the first delivery from
    // its start (quota 20 per business, so it stops after 1,000 sends).
    let mut peak_big = 0;
    let mut first_small = None;
    for (label, db) in [("1k", &small), ("1M", &big)] {
        log(format!("service on the {label} store"));
        let (_, before) = fake_counts(market)?;
        let (mut svc, addr, spawned, ready) = start_service(dir, db, market, "20")?;
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs_f64(plan.first_delivery_secs);
        while Instant::now() < deadline {
            if fake_counts(market)?.1 > before {
                first = Some(spawned.elapsed());
                break;
            }
            svc.alive()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        report.row(
            sec,
            format!("service start → first delivery, {label} queued"),
            match first {
                Some(d) => format!(
                    "{} (/healthz after {})",
                    ms(d.as_micros() as f64),
                    ms(ready.as_micros() as f64)
                ),
                None => format!("none within {:.0} s", plan.first_delivery_secs),
            },
        );
        match (label, first) {
            ("1k", f) => first_small = f,
            (_, f) => {
                let (ok, value) = match (first_small, f) {
                    (Some(a), Some(b)) => {
                        let ratio = b.as_secs_f64() / a.as_secs_f64();
                        (ratio <= 2.0, format!("{ratio:.2}×"))
                    }
                    _ => (false, "no first delivery".to_string()),
                };
                report.target(
                    sec,
                    "first delivery after start: 1M ÷ 1k",
                    value,
                    "≤ 2×",
                    ok,
                );
            }
        }
        if label == "1M" {
            // Work with the big queue: webhooks in, the quota's sends out, /metrics.
            let hooks = Webhooks::new(sample, addr, "big", 50_000_000);
            let r = run_load(&[addr], &hooks, CONNECTIONS, 30.0, plan.rss_posts);
            check_load(report, "ingest with 1M queued", &r);
            let metrics = Instant::now();
            let (status, _) = http(addr, "GET", "/metrics", &[], b"")?;
            let metrics_took = metrics.elapsed();
            if status != 200 {
                report.fail(format!("/metrics answered {status}"));
            }
            std::thread::sleep(Duration::from_secs(1));
            svc.alive()?;
            let (hwm, rss) = memory_kib(svc.pid());
            peak_big = hwm;
            report.row(
                sec,
                format!(
                    "webhooks with 1M queued ({} posted)",
                    thousands(plan.rss_posts as f64)
                ),
                format!(
                    "{} /s; p50 {}  p99 {}",
                    thousands(r.rate()),
                    ms(pct(&r.latencies_us, 0.5)),
                    ms(pct(&r.latencies_us, 0.99))
                ),
            );
            report.row(
                sec,
                "GET /metrics with 1M queued",
                ms(metrics_took.as_micros() as f64),
            );
            report.target(
                sec,
                "service peak RSS (VmHWM) with 1M queued; RSS now",
                format!("{}; {}", mib(hwm), mib(rss)),
                "≤ 100 MB",
                hwm <= 100 * 1024,
            );
        }
        let (took, graceful) = svc.stop();
        report.row(
            sec,
            format!("shutdown on SIGTERM, {label} queued"),
            if graceful {
                ms(took.as_micros() as f64)
            } else {
                format!("not within {:.0} s: killed", took.as_secs_f64())
            },
        );
    }
    fake.stop();
    Ok(peak_big)
}
