//! Processes whose CPU and memory the summary reports (`--watch NAME=PID`),
//! read from /proc: the load generator itself is always `loadgen`, and the
//! whole machine's busy time is `machine` (more than the sum of the others
//! means something else was running, e.g. a build).

use serde_json::{json, Value};

use crate::stats::round3;

/// A process named on the command line.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

pub fn parse_watch(s: &str) -> Result<Watched, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
    let pid = pid.parse().map_err(|e| format!("bad pid in {s:?}: {e}"))?;
    Ok(Watched {
        name: name.to_owned(),
        pid,
    })
}

/// Processes whose CPU and memory the summary reports.
pub struct Watch {
    procs: Vec<(String, String)>,
    ticks_per_s: f64,
}

impl Watch {
    pub fn new(watched: &[Watched]) -> Self {
        let mut procs = vec![("loadgen".to_owned(), "self".to_owned())];
        procs.extend(watched.iter().map(|w| (w.name.clone(), w.pid.to_string())));
        Self {
            procs,
            ticks_per_s: clock_ticks_per_second(),
        }
    }

    /// CPU seconds used so far by each process (user + system).
    pub fn cpu(&self) -> Vec<(String, Option<f64>)> {
        self.procs
            .iter()
            .map(|(name, pid)| (name.clone(), cpu_ticks(pid).map(|t| t / self.ticks_per_s)))
            .chain(std::iter::once(("machine".to_owned(), self.machine_cpu())))
            .collect()
    }

    /// CPU seconds used by the whole machine, every process included, so
    /// a run disturbed by something else (a build) shows in the summary.
    fn machine_cpu(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<f64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
        let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
        Some(busy / self.ticks_per_s)
    }

    pub fn rss(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (name, pid) in &self.procs {
            out.insert(name.clone(), json!(rss_kib(pid)));
        }
        Value::Object(out)
    }
}

pub fn cpu_json(
    before: &[(String, Option<f64>)],
    after: &[(String, Option<f64>)],
    window: f64,
) -> Value {
    let mut out = serde_json::Map::new();
    for ((name, b), (_, a)) in before.iter().zip(after) {
        let v = match (b, a) {
            (Some(b), Some(a)) if window > 0.0 => json!(round3((a - b) / window)),
            _ => Value::Null,
        };
        out.insert(name.clone(), v);
    }
    Value::Object(out)
}

/// utime + stime from /proc/PID/stat, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from /proc/PID/status, in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The kernel's clock tick (AT_CLKTCK from the auxiliary vector; 100 on
/// every Linux build in practice, which is the fallback).
fn clock_ticks_per_second() -> f64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 100.0;
    };
    auxv.chunks_exact(16)
        .find_map(|pair| {
            let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
            let value = u64::from_ne_bytes(pair[8..].try_into().ok()?);
            (key == AT_CLKTCK && value > 0).then_some(value as f64)
        })
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_parse() {
        let w = parse_watch("router=42").unwrap();
        assert_eq!((w.name.as_str(), w.pid), ("router", 42));
        assert!(parse_watch("router").is_err());
        assert!(parse_watch("router=x").is_err());
    }

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_ticks("self").is_some());
        assert!(rss_kib("self").unwrap() > 0);
    }
}
