//! Phase "disk" (fdatasync latency in the stores' folder) and phase "render" (routes and templates per second, in process).

use super::*;

/// Appends 4 KiB and fdatasyncs it, `n` times, in the store's folder.
pub(crate) fn fsync_latency(
    report: &mut Report,
    dir: &Path,
    n: usize,
    when: &str,
) -> Result<(), String> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        lat.push(t0.elapsed().as_micros() as u32);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    report.row(
        "disk (the store's directory)",
        format!("fsync {when}: append 4 KiB + fdatasync, n={n}"),
        format!("p50 {}  p99 {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99))),
    );
    Ok(())
}

pub(crate) fn render_rate(report: &mut Report, sample: &Value, secs: f64) -> Result<(), String> {
    let pipeline = Pipeline::load(&Path::new(ROOT).join("config"))
        .map_err(|p| format!("loading config/: {}", p.join("; ")))?;
    let meta = EventMeta {
        source: "oms".into(),
        event_type: "order.shipped".into(),
        id: "evt-1001".into(),
        received_at: to_rfc3339(now_ms()),
        business_id: None,
    };
    // Routing + business/chat id templates + the text, as ingest does.
    let planned = pipeline.plan(sample, &meta);
    if planned.len() != 1 || planned[0].rendered.is_err() {
        return Err("order_shipped does not render for the sample event".into());
    }
    let budget = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < budget {
        for _ in 0..100 {
            let p = pipeline.plan(sample, &meta);
            std::hint::black_box(&p);
        }
        n += 100;
    }
    let plan_rate = n as f64 / t0.elapsed().as_secs_f64();
    let context = EventContext::new(sample.clone(), &meta);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < budget {
        for _ in 0..100 {
            let text = pipeline
                .renderer
                .render_text("order_shipped", context.context())
                .map_err(|e| e.to_string())?;
            std::hint::black_box(&text);
        }
        n += 100;
    }
    let text_rate = n as f64 / t0.elapsed().as_secs_f64();
    report.row(
        "render (in process, 1 thread)",
        "order_shipped: route + ids + text (Pipeline::plan)",
        format!("{} /s per core", thousands(plan_rate)),
    );
    report.row(
        "render (in process, 1 thread)",
        "order_shipped: text only (Renderer::render_text)",
        format!("{} /s per core", thousands(text_rate)),
    );
    Ok(())
}
