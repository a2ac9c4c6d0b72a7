//! Driving webhooks over many keep-alive connections and waiting for their deliveries: rate, latency percentiles, errors.

use super::*;

#[derive(Default)]
pub(crate) struct LoadResult {
    /// 202 with a queued delivery.
    pub(crate) accepted: u64,
    pub(crate) other: BTreeMap<u16, u64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) latencies_us: Vec<u32>,
    pub(crate) elapsed: Duration,
    /// CPU seconds the generator (this process) used meanwhile.
    pub(crate) generator_cpu: f64,
}

impl LoadResult {
    pub(crate) fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }
}

pub(crate) async fn exchange(
    stream: &mut tokio::net::TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(u16, bool), String> {
    stream.write_all(req).await.map_err(|e| e.to_string())?;
    buf.clear();
    loop {
        if let Some(head) = parse_head(buf) {
            let head = head?;
            let need = head.len + head.content_length.ok_or("no content-length")?;
            if buf.len() >= need {
                let queued = find(&buf[head.len..need], b"\"queued\"").is_some();
                return Ok((head.status, queued));
            }
        }
        let n = stream.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed by the service".into());
        }
    }
}

/// Posts webhooks `0..max` over `connections` keep-alive connections
/// (spread over `addrs`: several instances) until all are sent or `secs`
/// have passed.
pub(crate) fn run_load(
    addrs: &[SocketAddr],
    hooks: &Webhooks,
    connections: usize,
    secs: f64,
    max: u64,
) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let next = Cell::new(0u64);
    let result = RefCell::new(LoadResult::default());
    let cpu_before = cpu_secs("self");
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    rt.block_on(async {
        // Each connection's future takes these by reference.
        let (next, result) = (&next, &result);
        let conn = |k: usize| async move {
            let addr = addrs[k % addrs.len()];
            let mut stream: Option<tokio::net::TcpStream> = None;
            let mut buf = Vec::with_capacity(4096);
            let mut latencies = Vec::with_capacity(4096);
            loop {
                let i = next.get();
                if i >= max || Instant::now() >= deadline {
                    break;
                }
                next.set(i + 1);
                let req = hooks.request(i);
                if stream.is_none() {
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true).ok();
                            stream = Some(s);
                        }
                        Err(e) => {
                            {
                                let mut r = result.borrow_mut();
                                r.errors += 1;
                                r.first_error.get_or_insert(format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let s = stream.as_mut().unwrap();
                let t0 = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(30), exchange(s, &req, &mut buf))
                        .await;
                let took = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let mut r = result.borrow_mut();
                match answer {
                    Ok(Ok((202, true))) => {
                        r.accepted += 1;
                        latencies.push(took);
                    }
                    Ok(Ok((status, _))) => {
                        *r.other.entry(status).or_default() += 1;
                        latencies.push(took);
                        if r.first_error.is_none() {
                            r.first_error = Some(format!(
                                "status {status}: {}",
                                String::from_utf8_lossy(&buf[..buf.len().min(600)])
                            ));
                        }
                    }
                    Ok(Err(e)) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                        stream = None;
                    }
                    Err(_) => {
                        r.errors += 1;
                        r.first_error.get_or_insert("no answer in 30 s".into());
                        stream = None;
                    }
                }
            }
            result.borrow_mut().latencies_us.extend(latencies);
        };
        futures_util::future::join_all((0..connections).map(conn)).await;
    });
    let mut r = result.into_inner();
    r.elapsed = started.elapsed();
    r.generator_cpu = cpu_secs("self") - cpu_before;
    r.latencies_us.sort_unstable();
    r
}

pub(crate) fn check_load(report: &mut Report, phase: &str, r: &LoadResult) {
    if r.errors > 0 || !r.other.is_empty() {
        report.fail(format!(
            "{phase}: {} transport errors, other statuses {:?}; first: {}",
            r.errors,
            r.other,
            r.first_error.as_deref().unwrap_or("-")
        ));
    }
}

/// Waits until the fake Market has `expected` messages answered 200:
/// stops when it has them, when nothing moved for 30 s, or after `limit`.
pub(crate) fn wait_delivered(
    market: SocketAddr,
    expected: u64,
    limit: Duration,
) -> Result<(u64, u64, Instant), String> {
    let started = Instant::now();
    let mut last = (0, 0);
    let mut moved = Instant::now();
    loop {
        let counts = fake_counts(market)?;
        if counts.1 >= expected {
            return Ok((counts.0, counts.1, Instant::now()));
        }
        if counts != last {
            last = counts;
            moved = Instant::now();
        }
        if moved.elapsed() > Duration::from_secs(30) || started.elapsed() > limit {
            return Ok((counts.0, counts.1, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ───────────────────────── phases ─────────────────────────
