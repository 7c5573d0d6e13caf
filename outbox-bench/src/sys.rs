//! What the machine is doing: load, compilers running, CPU time of Postgres
//! and of this process, peak RSS. Linux `/proc` only; every reader returns
//! `None` (or 0) where `/proc` is not there instead of failing the run.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util_free::CancelFlag;

/// `/proc` reports CPU times in USER_HZ clock ticks, which is 100 on every
/// Linux ABI we run on.
const TICKS_PER_SEC: f64 = 100.0;

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> Option<[f64; 3]> {
    let s = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// How many `rustc` processes run right now (compiles disturb timings).
pub(crate) fn rustc_count() -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == "rustc")
        })
        .count()
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS, so that each
/// measured point reports its own peak (`echo 5 > /proc/self/clear_refs`).
pub(crate) fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kb(key: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size of this process since the last reset, in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    status_kb("VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// Current resident set size of this process, in MiB.
pub(crate) fn rss_mib() -> Option<f64> {
    status_kb("VmRSS:").map(|kb| kb as f64 / 1024.0)
}

/// `(ppid, utime + stime, cutime + cstime)` in ticks, from `/proc/<pid>/stat`.
fn proc_stat(pid: &str) -> Option<(i64, u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] state, f[1] ppid, f[11] utime, f[12] stime, f[13] cutime, f[14] cstime
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((f.get(1)?.parse().ok()?, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// The postmaster of the backend `backend_pid`, if that process is on this
/// machine and is a PostgreSQL process.
pub(crate) fn postmaster_of(backend_pid: i32) -> Option<i64> {
    let comm = fs::read_to_string(format!("/proc/{backend_pid}/comm")).ok()?;
    if !comm.starts_with("postgres") {
        return None;
    }
    let (ppid, _, _) = proc_stat(&backend_pid.to_string())?;
    Some(ppid)
}

/// CPU seconds used so far by a whole PostgreSQL cluster: the postmaster,
/// its live children, and (through `cutime`) its children that exited, e.g.
/// the backends of connections closed during the run.
fn postgres_cpu_secs(postmaster: i64) -> Option<f64> {
    let (_, own, reaped) = proc_stat(&postmaster.to_string())?;
    let mut ticks = own + reaped;
    let dir = fs::read_dir("/proc").ok()?;
    for e in dir.filter_map(Result::ok) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some((ppid, t, _)) = proc_stat(&name)
            && ppid == postmaster
        {
            ticks += t;
        }
    }
    Some(ticks as f64 / TICKS_PER_SEC)
}

/// CPU seconds used so far by every process named `comm` (e.g. the local
/// Kafka broker `tansu`), with their reaped children.
fn named_cpu_secs(comm: &str) -> Option<f64> {
    let dir = fs::read_dir("/proc").ok()?;
    let mut ticks = 0;
    let mut found = false;
    for e in dir.filter_map(Result::ok) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm)
            && let Some((_, t, c)) = proc_stat(&name)
        {
            ticks += t + c;
            found = true;
        }
    }
    found.then_some(ticks as f64 / TICKS_PER_SEC)
}

/// Bytes written to block devices so far (all whole disks, `/proc/diskstats`).
fn disk_written_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/diskstats").ok()?;
    let mut sectors = 0;
    for l in s.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // major minor name reads ... field 10 (index 9) = sectors written
        let Some(name) = f.get(2) else { continue };
        let whole = (name.starts_with("vd") || name.starts_with("sd") || name.starts_with("xvd"))
            && !name.ends_with(|c: char| c.is_ascii_digit())
            || (name.starts_with("nvme") && !name.contains('p'));
        if whole {
            sectors += f.get(9).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(sectors * 512)
}

/// Busy and total CPU seconds of the whole machine (all cores), `/proc/stat`.
fn machine_cpu_secs() -> Option<(f64, f64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest* are inside user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((
        (total - idle) as f64 / TICKS_PER_SEC,
        total as f64 / TICKS_PER_SEC,
    ))
}

/// The process names of the bus servers a point may drive (their CPU is
/// part of the workload, not a disturbance): the local Kafka broker,
/// RabbitMQ's Erlang VM, NATS, Redis.
const BUS_SERVERS: [&str; 4] = ["tansu", "beam.smp", "nats-server", "redis-server"];

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnap {
    at: Instant,
    bench: Option<f64>,
    postgres: Option<f64>,
    /// The bus servers: the local Kafka broker (`tansu`), RabbitMQ
    /// (`beam.smp`), `nats-server`, `redis-server`.
    buses: Option<f64>,
    machine: Option<(f64, f64)>,
    disk_written: Option<u64>,
}

impl CpuSnap {
    pub(crate) fn take(postmaster: Option<i64>) -> Self {
        Self {
            at: Instant::now(),
            bench: proc_stat("self").map(|(_, t, _)| t as f64 / TICKS_PER_SEC),
            postgres: postmaster.and_then(postgres_cpu_secs),
            buses: BUS_SERVERS
                .iter()
                .filter_map(|c| named_cpu_secs(c))
                .reduce(|a, b| a + b),
            machine: machine_cpu_secs(),
            disk_written: disk_written_bytes(),
        }
    }

    /// `self` with PostgreSQL's counter read from `settled`, a snapshot taken
    /// once the workload's backends have exited: a backend's CPU reaches the
    /// postmaster's reaped-children counter only when it is reaped, so a
    /// snapshot taken right at the end of the workload would miss the CPU of
    /// backends that were exiting then (and count it as "other").
    pub(crate) fn with_postgres_from(mut self, settled: &Self) -> Self {
        if settled.postgres.is_some() {
            self.postgres = settled.postgres;
        }
        self
    }

    /// CPU used between `self` and `later`: seconds of CPU and the share of
    /// one core (1.0 = one core busy the whole time), for the bench process,
    /// the PostgreSQL cluster, and the whole machine (the rest is "other").
    pub(crate) fn delta(&self, later: &Self) -> Value {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        let bench = d(self.bench, later.bench);
        let pg = d(self.postgres, later.postgres);
        let buses = d(self.buses, later.buses);
        let (busy, total) = match (self.machine, later.machine) {
            (Some((b0, t0)), Some((b1, t1))) => (Some(b1 - b0), Some(t1 - t0)),
            _ => (None, None),
        };
        let cores = |x: Option<f64>| x.map(|v| round(v / wall, 3));
        let other = match (busy, bench, pg) {
            (Some(b), Some(x), Some(p)) => Some((b - x - p - buses.unwrap_or(0.0)).max(0.0)),
            _ => None,
        };
        let disk = match (self.disk_written, later.disk_written) {
            (Some(a), Some(b)) => Some(round(b.saturating_sub(a) as f64 / 1e6 / wall, 1)),
            _ => None,
        };
        json!({
            "wall_s": round(wall, 3),
            "bench_cpu_s": bench.map(|v| round(v, 3)),
            "postgres_cpu_s": pg.map(|v| round(v, 3)),
            "bus_servers_cpu_s": buses.map(|v| round(v, 3)),
            "machine_busy_cpu_s": busy.map(|v| round(v, 3)),
            "other_cpu_s": other.map(|v| round(v, 3)),
            "bench_cores": cores(bench),
            "postgres_cores": cores(pg),
            "bus_servers_cores": cores(buses),
            "other_cores": cores(other),
            "disk_write_mb_s": disk,
            "machine_busy_cores": cores(busy),
            "machine_cores": match (total, self.machine) {
                (Some(t), Some(_)) => Some(round(t / wall, 2)),
                _ => None,
            },
        })
    }
}

/// Rounds to `digits` decimals (for readable JSON).
pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// Samples the number of running `rustc` processes every 500 ms while a
/// point runs, so a result disturbed by a compile can be recognized.
#[derive(Debug)]
pub(crate) struct LoadWatch {
    start_load: Option<[f64; 3]>,
    start_rustc: usize,
    max_rustc: Arc<AtomicUsize>,
    stop: CancelFlag,
    task: JoinHandle<()>,
}

impl LoadWatch {
    pub(crate) fn start() -> Self {
        let max_rustc = Arc::new(AtomicUsize::new(0));
        let stop = CancelFlag::default();
        let (m, s) = (max_rustc.clone(), stop.clone());
        let start_rustc = rustc_count();
        m.store(start_rustc, Ordering::Relaxed);
        let task = tokio::spawn(async move {
            while !s.is_set() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                m.fetch_max(rustc_count(), Ordering::Relaxed);
            }
        });
        Self {
            start_load: loadavg(),
            start_rustc,
            max_rustc,
            stop,
            task,
        }
    }

    /// Stops sampling; returns the load report and the most `rustc`
    /// processes seen at once.
    pub(crate) async fn finish(self) -> (Value, usize) {
        self.stop.set();
        let _ = self.task.await;
        let end_rustc = rustc_count();
        let max = self.max_rustc.load(Ordering::Relaxed).max(end_rustc);
        (
            json!({
                "loadavg_start": self.start_load,
                "loadavg_end": loadavg(),
                "rustc_start": self.start_rustc,
                "rustc_end": end_rustc,
                "rustc_max": max,
            }),
            max,
        )
    }
}

/// Cores busy on the whole machine, averaged over `over`.
pub(crate) async fn busy_cores(over: Duration) -> Option<f64> {
    let (b0, _) = machine_cpu_secs()?;
    let t0 = Instant::now();
    tokio::time::sleep(over).await;
    let (b1, _) = machine_cpu_secs()?;
    Some((b1 - b0) / t0.elapsed().as_secs_f64().max(1e-9))
}

/// Waits up to `max` until the machine is quiet: no `rustc` runs and fewer
/// than `max_busy` cores are busy (over 2 s). Returns what it saw last:
/// (rustc processes, busy cores).
pub(crate) async fn wait_for_quiet(max: Duration, max_busy: f64) -> (usize, f64) {
    let deadline = Instant::now() + max;
    let mut warned = false;
    loop {
        let n = rustc_count();
        let busy = if n == 0 {
            busy_cores(Duration::from_secs(2)).await.unwrap_or(0.0)
        } else {
            f64::NAN
        };
        let quiet = n == 0 && busy < max_busy;
        if quiet || Instant::now() >= deadline {
            return (n, if busy.is_nan() { 0.0 } else { busy });
        }
        if !warned {
            eprintln!(
                "outbox-bench: machine busy ({n} rustc, {busy:.2} cores busy); waiting up to {max:?} \
                 for it to quiet down (< {max_busy} cores)"
            );
            warned = true;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// A tiny one-way stop flag (no extra dependency).
mod tokio_util_free {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Debug, Clone, Default)]
    pub(crate) struct CancelFlag(Arc<AtomicBool>);

    impl CancelFlag {
        pub(crate) fn set(&self) {
            self.0.store(true, Ordering::Relaxed);
        }

        pub(crate) fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}
