//! `husk update`: new cgroup limits for a running container, applied by
//! the agent to the container's cgroup in the guest. The VM's own size is
//! fixed at create: a memory limit above it gives the container no more
//! than the VM has.

use std::io::Read;
use std::path::Path;

use husk_proto::UpdateResources;
use oci_spec::runtime::{
    LinuxCpu, LinuxCpuBuilder, LinuxMemory, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
};

use super::lifecycle::agent;
use super::store::Container;
use crate::run::CONTAINER_ID;
use crate::RuntimeError;

/// Largest `--resources` document read.
const MAX_RESOURCES_BYTES: u64 = 1 << 20;

/// runc update's flags (all optional; they override `--resources`).
#[derive(Debug, Clone, Default)]
pub struct UpdateFlags {
    /// `--resources FILE` or `-` (stdin): `linux.resources` JSON.
    pub resources: Option<String>,
    /// `--memory`, bytes (k/m/g suffixes).
    pub memory: Option<String>,
    /// `--memory-swap`.
    pub memory_swap: Option<String>,
    /// `--memory-reservation`.
    pub memory_reservation: Option<String>,
    /// `--cpu-share`.
    pub cpu_share: Option<u64>,
    /// `--cpu-quota`.
    pub cpu_quota: Option<i64>,
    /// `--cpu-period`.
    pub cpu_period: Option<u64>,
    /// `--cpuset-cpus`.
    pub cpuset_cpus: Option<String>,
    /// `--cpuset-mems`.
    pub cpuset_mems: Option<String>,
    /// `--pids-limit`.
    pub pids_limit: Option<i64>,
}

/// Parses a byte count the way runc does (`64m`, `1G`, `1024`, `-1`).
pub fn parse_bytes(s: &str) -> Result<i64, RuntimeError> {
    let bad = || RuntimeError::Invalid(format!("invalid size {s:?}"));
    if s.trim() == "-1" {
        return Ok(-1);
    }
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1i64 << 10),
        Some((i, 'm')) => (&t[..i], 1 << 20),
        Some((i, 'g')) => (&t[..i], 1 << 30),
        Some((i, 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if n.is_nan() || n < 0.0 || n * mult as f64 > i64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as i64)
}

fn read_resources(src: &str) -> Result<LinuxResources, RuntimeError> {
    let mut text = Vec::new();
    let r: Box<dyn Read> = if src == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(src).map_err(|e| RuntimeError::Io(src.into(), e))?)
    };
    r.take(MAX_RESOURCES_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| RuntimeError::Io(src.into(), e))?;
    if text.len() as u64 > MAX_RESOURCES_BYTES {
        return Err(RuntimeError::Invalid(format!(
            "--resources: larger than {MAX_RESOURCES_BYTES} bytes"
        )));
    }
    serde_json::from_slice(&text).map_err(|e| RuntimeError::Invalid(format!("--resources: {e}")))
}

fn invalid(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(e.to_string())
}

/// The resources the flags ask for.
pub fn resources(f: &UpdateFlags) -> Result<LinuxResources, RuntimeError> {
    let mut res = match &f.resources {
        Some(src) => read_resources(src)?,
        None => LinuxResources::default(),
    };
    let mut mem: LinuxMemory = res.memory().unwrap_or_default();
    let sizes = [
        (&f.memory, 0),
        (&f.memory_swap, 1),
        (&f.memory_reservation, 2),
    ];
    let mut touched = false;
    for (v, which) in sizes {
        let Some(v) = v else { continue };
        let n = parse_bytes(v)?;
        touched = true;
        let b = LinuxMemoryBuilder::default();
        let m = match which {
            0 => b.limit(n),
            1 => b.swap(n),
            _ => b.reservation(n),
        }
        .build()
        .map_err(invalid)?;
        mem.set_limit(m.limit().or(mem.limit()));
        mem.set_swap(m.swap().or(mem.swap()));
        mem.set_reservation(m.reservation().or(mem.reservation()));
    }
    if touched {
        res.set_memory(Some(mem));
    }
    if f.cpu_share.is_some()
        || f.cpu_quota.is_some()
        || f.cpu_period.is_some()
        || f.cpuset_cpus.is_some()
        || f.cpuset_mems.is_some()
    {
        let mut cpu: LinuxCpu = res.cpu().clone().unwrap_or_default();
        let mut b = LinuxCpuBuilder::default();
        if let Some(v) = f.cpu_share {
            b = b.shares(v);
        }
        if let Some(v) = f.cpu_quota {
            b = b.quota(v);
        }
        if let Some(v) = f.cpu_period {
            b = b.period(v);
        }
        if let Some(v) = &f.cpuset_cpus {
            b = b.cpus(v.clone());
        }
        if let Some(v) = &f.cpuset_mems {
            b = b.mems(v.clone());
        }
        let new = b.build().map_err(invalid)?;
        cpu.set_shares(new.shares().or(cpu.shares()));
        cpu.set_quota(new.quota().or(cpu.quota()));
        cpu.set_period(new.period().or(cpu.period()));
        cpu.set_cpus(new.cpus().clone().or(cpu.cpus().clone()));
        cpu.set_mems(new.mems().clone().or(cpu.mems().clone()));
        res.set_cpu(Some(cpu));
    }
    if let Some(n) = f.pids_limit {
        res.set_pids(Some(
            LinuxPidsBuilder::default()
                .limit(n)
                .build()
                .map_err(invalid)?,
        ));
    }
    Ok(res)
}

/// Applies new limits to a running container.
pub fn update(root: &Path, id: &str, f: &UpdateFlags) -> Result<(), RuntimeError> {
    let res = resources(f)?;
    let c = Container::open(root, id)?;
    c.require_agent()?;
    agent(&c.dir)?.update_resources(UpdateResources {
        container_id: CONTAINER_ID.into(),
        resources: Box::new(res),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_runc_reads_them() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("2kb").unwrap(), 2048);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        for bad in ["", "m", "x1", "-5", "1q"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_override_the_document() {
        let dir = std::env::temp_dir().join(format!("husk-update-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("r.json");
        // What dockerd sends on stdin.
        std::fs::write(
            &doc,
            r#"{"memory":{"limit":134217728,"swap":268435456},"cpu":{"shares":512,"quota":50000,"period":100000},"pids":{"limit":100}}"#,
        )
        .unwrap();
        let r = resources(&UpdateFlags {
            resources: Some(doc.display().to_string()),
            memory: Some("64m".into()),
            pids_limit: Some(50),
            ..Default::default()
        })
        .unwrap();
        let m = r.memory().unwrap();
        assert_eq!(m.limit(), Some(64 << 20));
        assert_eq!(m.swap(), Some(256 << 20));
        assert_eq!(r.cpu().clone().unwrap().shares(), Some(512));
        assert_eq!(r.pids().unwrap().limit(), 50);
        std::fs::write(&doc, "{\"memory\": 5}").unwrap();
        let f = UpdateFlags {
            resources: Some(doc.display().to_string()),
            ..Default::default()
        };
        assert!(resources(&f)
            .unwrap_err()
            .to_string()
            .starts_with("--resources"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
