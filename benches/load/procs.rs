//! The service and the fake Market as child processes: start, wait until ready, stop, and their memory and CPU.

use super::*;

pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub(crate) fn alive(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(format!(
                "{} exited ({status}); its log ({}) ends:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            )),
            _ => Err(format!("{} is not running", self.name)),
        }
    }

    /// SIGTERM (graceful), then SIGKILL after the grace period. Returns how
    /// long it took and whether SIGTERM was enough.
    pub(crate) fn stop(&mut self) -> (Duration, bool) {
        let Some(mut child) = self.child.take() else {
            return (Duration::ZERO, true);
        };
        let started = Instant::now();
        // SAFETY: kill(2) on the id of a child we have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let grace = Duration::from_secs(STOP_GRACE_SECS.load(std::sync::atomic::Ordering::Relaxed));
        while started.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return (started.elapsed(), true);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        log(format!(
            "{} did not stop on SIGTERM in {} s; killing it",
            self.name,
            grace.as_secs()
        ));
        let _ = child.kill();
        let _ = child.wait();
        (started.elapsed(), false)
    }
}

/// How long `Proc::stop` waits after SIGTERM.
pub(crate) static STOP_GRACE_SECS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(15);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Children die with this process, however it ends (Ctrl-C, a panic, a kill).
pub(crate) fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub(crate) fn wait_ready(
    proc_: &mut Proc,
    addr: SocketAddr,
    path: &str,
) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        proc_.alive()?;
        if let Ok((200, _)) = http(addr, "GET", path, &[], b"") {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("{} did not answer {path} within 60 s", proc_.name))
}

pub(crate) fn start_fake(dir: &Path) -> Result<(Proc, SocketAddr), String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.join(format!("fake-market-{}.log", addr.port()));
    let out = File::create(&log_path).map_err(|e| e.to_string())?;
    let child = die_with_parent(&mut Command::new(bin()))
        .args(["fake-market", "--listen", &addr.to_string()])
        .args(["--hourly-limit", "0", "--max-in-flight", "0"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin().display()))?;
    let mut p = Proc {
        name: "fake-market",
        child: Some(child),
        log: log_path,
    };
    wait_ready(&mut p, addr, "/_fake/stats")?;
    Ok((p, addr))
}

/// The build `start_service` runs instead of `bin()`, while set: the
/// baseline of `BENCH_BASELINE_BIN` (the fake Market stays this build's).
pub(crate) static SERVE_BIN: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

pub(crate) fn serve_bin() -> PathBuf {
    SERVE_BIN
        .lock()
        .ok()
        .and_then(|b| b.clone())
        .unwrap_or_else(|| bin().to_path_buf())
}

/// Starts `chatbridge serve` on the store `storage_url`; returns it once
/// `/healthz` answers.
pub(crate) fn start_service(
    dir: &Path,
    storage_url: &str,
    market: SocketAddr,
    hourly_limit: &str,
) -> Result<(Proc, SocketAddr, Instant, Duration), String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.join(format!("service-{}.log", addr.port()));
    let out = File::create(&log_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(serve_bin());
    cmd.current_dir(ROOT)
        .args(["serve", "--config", "config"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out);
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATBRIDGE__") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CHATBRIDGE__STORAGE__URL", storage_url)
        .env("CHATBRIDGE__SERVER__LISTEN", addr.to_string())
        .env("CHATBRIDGE__MARKET__BASE_URL", format!("http://{market}"))
        .env("CHATBRIDGE__MARKET__API_KEY", API_KEY)
        .env("CHATBRIDGE__MARKET__HOURLY_LIMIT", hourly_limit)
        .env("CHATBRIDGE__MARKET__MAX_IN_FLIGHT", "4");
    let spawned = Instant::now();
    let child = die_with_parent(&mut cmd)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", serve_bin().display()))?;
    let mut p = Proc {
        name: "chatbridge serve",
        child: Some(child),
        log: log_path,
    };
    let ready = wait_ready(&mut p, addr, "/healthz")?;
    Ok((p, addr, spawned, ready))
}

/// `(VmHWM, VmRSS)` in KiB.
pub(crate) fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

// ───────────────────────── HTTP (hand-rolled, HTTP/1.1, loopback) ─────────────────────────
