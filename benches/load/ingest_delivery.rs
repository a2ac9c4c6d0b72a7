//! Phase "load": ingest with the dispatcher paused, the dispatcher alone on that backlog, then both at once with the nothing-lost check.

use super::*;

/// Ingest alone, then the dispatcher alone on that backlog; then, on a
/// fresh store, both at once and the count check, with `instances`
/// services on it (one, then two on PostgreSQL). Returns the service's
/// peak RSS and the end-to-end rate.
pub(crate) fn load_phases(
    report: &mut Report,
    plan: &Plan,
    backend: &Backend,
    dir: &Path,
    sample: &Value,
) -> Result<(u64, f64), String> {
    let db = backend.fresh("ingest")?;
    let (mut fake, market) = start_fake(dir)?;

    // The disk changes under other loads: look at it again just before.
    fsync_latency(report, dir, plan.fsync_writes / 2, "before ingest")?;

    // 1. Ingest with the dispatcher paused by its quota (1 send per business per hour).
    log(format!(
        "ingest ({}): service with market.hourly_limit = 1 (dispatcher paused)",
        backend.name()
    ));
    let (mut svc, addr, _, _) = start_service(dir, &db, market, "1")?;
    let warm = run_load(
        &[addr],
        &Webhooks::new(sample, addr, "warm", 0),
        CONNECTIONS,
        10.0,
        1_000,
    );
    check_load(report, "warm-up", &warm);
    let pid = svc.pid().to_string();
    let cpu0 = cpu_secs(&pid);
    let ingest = run_load(
        &[addr],
        &Webhooks::new(sample, addr, "ingest", 1_000),
        CONNECTIONS,
        plan.ingest_secs,
        plan.ingest_max,
    );
    let svc_cpu = cpu_secs(&pid) - cpu0;
    svc.alive()?;
    check_load(report, "ingest", &ingest);
    let (hwm_ingest, _) = memory_kib(svc.pid());
    svc.stop();
    let sec = &format!(
        "ingest, {} (64 connections, dispatcher paused)",
        backend.name()
    );
    let rate = ingest.rate();
    report.target(
        sec,
        format!(
            "accepted (202, durable): {} in {:.1} s",
            thousands(ingest.accepted as f64),
            ingest.elapsed.as_secs_f64()
        ),
        format!("{} /s", thousands(rate)),
        "≥ 20,000 /s",
        rate >= 20_000.0,
    );
    let l = &ingest.latencies_us;
    let p99 = pct(l, 0.99);
    report.target(
        sec,
        "latency p50 / p99 / p99.9",
        format!("{} / {} / {}", ms(pct(l, 0.5)), ms(p99), ms(pct(l, 0.999))),
        "p99 ≤ 10 ms",
        p99 <= 10_000.0,
    );
    report.row(
        sec,
        "CPU: service / load generator",
        format!(
            "{:.0} µs / {:.0} µs per webhook ({:.2} + {:.2} cores)",
            svc_cpu * 1e6 / ingest.accepted.max(1) as f64,
            ingest.generator_cpu * 1e6 / ingest.accepted.max(1) as f64,
            svc_cpu / ingest.elapsed.as_secs_f64(),
            ingest.generator_cpu / ingest.elapsed.as_secs_f64()
        ),
    );
    report.row(sec, "service peak RSS (VmHWM)", mib(hwm_ingest));

    // 2. Drain: that backlog, limits off; the dispatcher alone, for a bounded time.
    let backlog = warm.accepted + ingest.accepted;
    log(format!(
        "drain: restarting with limits off; {backlog} queued"
    ));
    let (mut svc, _, _, _) = start_service(dir, &db, market, NO_LIMIT)?;
    let pid = svc.pid().to_string();
    let (_, before) = fake_counts(market)?;
    let t1 = Instant::now();
    let cpu0 = cpu_secs(&pid);
    let fake_cpu0 = cpu_secs(&fake.pid().to_string());
    let (_, after, done) =
        wait_delivered(market, backlog, Duration::from_secs_f64(plan.drain_secs))?;
    let svc_cpu = cpu_secs(&pid) - cpu0;
    let fake_cpu = cpu_secs(&fake.pid().to_string()) - fake_cpu0;
    svc.alive()?;
    let (hwm_drain, _) = memory_kib(svc.pid());
    svc.stop();
    fake.stop();
    let drained = after - before;
    let drain_secs = done.duration_since(t1).as_secs_f64();
    let sec = &delivery_section(backend);
    report.row(
        sec,
        format!(
            "dispatcher alone, on that backlog: {} messages in {:.1} s",
            thousands(drained as f64),
            drain_secs
        ),
        format!("{} msg/s", thousands(drained as f64 / drain_secs)),
    );
    report.row(
        sec,
        "  CPU: service / fake Market",
        format!(
            "{:.0} µs / {:.0} µs per message ({:.2} + {:.2} cores)",
            svc_cpu * 1e6 / drained.max(1) as f64,
            fake_cpu * 1e6 / drained.max(1) as f64,
            svc_cpu / drain_secs,
            fake_cpu / drain_secs
        ),
    );
    report.row(sec, "  service peak RSS (VmHWM)", mib(hwm_drain));

    let (hwm_e2e, e2e_rate) = end_to_end(report, plan, backend, dir, sample, 1)?;
    Ok((hwm_ingest.max(hwm_drain).max(hwm_e2e), e2e_rate))
}

fn delivery_section(backend: &Backend) -> String {
    let baseline = match SERVE_BIN.lock().map(|b| b.is_some()) {
        Ok(true) => ", BASELINE build (BENCH_BASELINE_BIN)",
        _ => "",
    };
    format!(
        "delivery, {}{baseline} (fake Market, limits off; 50 businesses, 4 in flight each)",
        backend.name()
    )
}

/// End to end on a fresh store and fake Market: webhooks in (spread over
/// `instances` services on the one store) while the dispatchers deliver,
/// until every accepted one is delivered; then the count check. Returns
/// the services' peak RSS (the largest) and the messages per second.
pub(crate) fn end_to_end(
    report: &mut Report,
    plan: &Plan,
    backend: &Backend,
    dir: &Path,
    sample: &Value,
    instances: usize,
) -> Result<(u64, f64), String> {
    let sec = &delivery_section(backend);
    // 3. End to end on a fresh store and fake Market: webhooks in while the
    // dispatcher delivers, until every accepted one is delivered.
    log(format!(
        "end to end ({}, {instances} instance(s)): webhooks in while delivering, fresh store",
        backend.name()
    ));
    let db = backend.fresh(&format!("e2e-{instances}"))?;
    let (mut fake, market) = start_fake(dir)?;
    let mut services = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..instances {
        let (svc, addr, _, _) = start_service(dir, &db, market, NO_LIMIT)?;
        services.push(svc);
        addrs.push(addr);
    }
    let service_cpu = |services: &[Proc]| {
        services
            .iter()
            .map(|s| cpu_secs(&s.pid().to_string()))
            .sum::<f64>()
    };
    let cpu0 = service_cpu(&services);
    let t0 = Instant::now();
    let e2e = run_load(
        &addrs,
        &Webhooks::new(sample, addrs[0], "e2e", 10_000_000),
        CONNECTIONS,
        plan.e2e_secs,
        plan.e2e_max,
    );
    check_load(report, "end to end", &e2e);
    let accepted = e2e.accepted;
    let (requests, delivered, done) = wait_delivered(
        market,
        accepted,
        Duration::from_secs_f64(plan.e2e_wait_secs),
    )?;
    let svc_cpu = service_cpu(&services) - cpu0;
    for svc in services.iter_mut() {
        svc.alive()?;
    }
    let e2e_secs = done.duration_since(t0).as_secs_f64();
    let e2e_rate = delivered as f64 / e2e_secs;
    let metric = format!(
        "end to end, {instances} instance(s): {} webhooks in {:.1} s, delivered after {:.1} s",
        thousands(accepted as f64),
        e2e.elapsed.as_secs_f64(),
        e2e_secs
    );
    let value = format!("{} msg/s", thousands(e2e_rate));
    match backend {
        // PostgreSQL's targets compare it with SQLite's run (see main).
        Backend::Postgres { .. } => report.row(sec, metric, value),
        Backend::Sqlite { .. } => {
            report.target(sec, metric, value, "≥ 10,000 /s", e2e_rate >= 10_000.0)
        }
    }
    let l = &e2e.latencies_us;
    report.row(
        sec,
        "  webhooks meanwhile: rate; latency p50 / p99 / p99.9",
        format!(
            "{} /s; {} / {} / {}",
            thousands(e2e.rate()),
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            ms(pct(l, 0.999))
        ),
    );
    report.row(
        sec,
        "  CPU: service per message (in + out, all instances)",
        format!("{:.0} µs", svc_cpu * 1e6 / delivered.max(1) as f64),
    );

    // The count check: the fake Market's counts and the store's.
    let hwm_e2e = services
        .iter()
        .map(|s| memory_kib(s.pid()).0)
        .max()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(300));
    let (requests_late, delivered_late) = fake_counts(market)?;
    let counts = backend.counts(&db)?;
    let store_delivered = counts.states.get("delivered").copied().unwrap_or(0);
    let not_delivered: Vec<String> = counts
        .states
        .iter()
        .filter(|(s, _)| s.as_str() != "delivered")
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    let ok = delivered_late == accepted
        && requests_late == delivered_late
        && requests == requests_late
        && store_delivered as u64 == accepted
        && counts.attempts as u64 == accepted
        && counts.doubled == 0
        && not_delivered.is_empty();
    report.target(
        sec,
        "count check: accepted = delivered (fake Market) = delivered (store)",
        format!(
            "{} = {} = {}",
            thousands(accepted as f64),
            thousands(delivered_late as f64),
            thousands(store_delivered as f64)
        ),
        "equal, none doubled",
        ok,
    );
    if !ok {
        report.fail(format!(
            "count check: accepted {accepted}, fake Market requests {requests_late} \
             (200: {delivered_late}), store delivered {store_delivered}, attempts {}, \
             deliveries with >1 delivered attempt {}, other states [{}]",
            counts.attempts,
            counts.doubled,
            not_delivered.join(", ")
        ));
    }
    report.row(
        sec,
        "  requests the fake Market received / answered 200",
        format!(
            "{} / {}",
            thousands(requests_late as f64),
            thousands(delivered_late as f64)
        ),
    );
    for svc in services.iter_mut() {
        svc.stop();
    }
    fake.stop();
    Ok((hwm_e2e, e2e_rate))
}
