//! `husk events`: the container's resource usage as runc prints it, from
//! the agent's view of the container's cgroup in the guest: once with
//! `--stats`, else every interval (plus an `oom` event whenever the
//! container's OOM-kill count grows) until the container stops.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use husk_proto::Stats;

use super::lifecycle::agent;
use super::store::Container;
use crate::run::CONTAINER_ID;
use crate::RuntimeError;

/// Parses a Go-style duration as runc's `--interval` takes it (`5s`,
/// `500ms`, `1m`, `1h`, or plain seconds).
pub fn parse_interval(s: &str) -> Result<Duration, RuntimeError> {
    let bad = || RuntimeError::Invalid(format!("invalid interval {s:?}: e.g. 5s, 500ms"));
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One event line in runc's format.
fn event(kind: &str, id: &str, stats: Option<&Stats>) -> String {
    let mut e = serde_json::json!({"type": kind, "id": id});
    if let Some(s) = stats {
        e["data"] = serde_json::json!({
            "cpu": {"usage": {"total": s.cpu_usage_ns}},
            "memory": {"usage": {
                "usage": s.memory_usage_bytes,
                "max": s.memory_max_usage_bytes.unwrap_or(0),
                "limit": s.memory_limit_bytes.unwrap_or(0),
            }},
            "pids": {"current": s.pids_current.unwrap_or(0)},
        });
    }
    e.to_string()
}

/// Prints events for container `id` to `out`.
pub fn events(
    root: &Path,
    id: &str,
    once: bool,
    interval: Duration,
    out: &mut dyn Write,
) -> Result<(), RuntimeError> {
    let c = Container::open(root, id)?;
    c.require_agent()?;
    let dir = c.dir.clone();
    drop(c);
    let mut client = agent(&dir)?;
    let mut ooms = None;
    loop {
        let stats = match client.stats(CONTAINER_ID) {
            Ok(s) => s,
            // The container (or its VM) is gone: the stream ends.
            Err(_) if !once => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let w = |line: String, out: &mut dyn Write| {
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .map_err(|e| RuntimeError::Io("stdout".into(), e))
        };
        if ooms.is_some_and(|n| stats.oom_kills > n) {
            w(event("oom", id, None), out)?;
        }
        ooms = Some(stats.oom_kills);
        w(event("stats", id, Some(&stats)), out)?;
        if once {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_events() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "0s", "-1s", "5x", "s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
        let s = Stats {
            memory_usage_bytes: 10,
            memory_max_usage_bytes: Some(20),
            memory_limit_bytes: None,
            cpu_usage_ns: 5,
            pids_current: Some(2),
            oom_kills: 0,
        };
        let e: serde_json::Value = serde_json::from_str(&event("stats", "c1", Some(&s))).unwrap();
        assert_eq!(e["type"], "stats");
        assert_eq!(e["data"]["memory"]["usage"]["usage"], 10);
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 5);
        assert_eq!(e["data"]["pids"]["current"], 2);
    }
}
