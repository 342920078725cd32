//! What a container's cgroup is given, as file writes: `linux.resources`
//! for v1 or v2 (runc's conversions), the v1 device rules in runc's order;
//! and reading flat keyed files. Pure: the parent module writes them.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};

use crate::container::plan::DevicePlan;

/// One value to write into a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    /// File name, e.g. `memory.max`; its prefix names the controller.
    pub file: String,
    /// Value.
    pub value: String,
    /// Skipped when the kernel lacks the file (e.g. swap accounting).
    pub optional: bool,
}

pub(super) fn write(file: &str, value: impl ToString) -> CgroupWrite {
    CgroupWrite {
        file: file.to_owned(),
        value: value.to_string(),
        optional: false,
    }
}

fn optional(file: &str, value: impl ToString) -> CgroupWrite {
    CgroupWrite {
        optional: true,
        ..write(file, value)
    }
}

/// runc's conversion of cgroup v1 cpu shares (2..262144) to a v2 weight
/// (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// The files and values that implement `linux.resources` (memory, cpu,
/// pids, and `unified` on v2), in the order to write them.
pub fn resource_writes(v2: bool, res: &LinuxResources) -> Result<Vec<CgroupWrite>, String> {
    let mut out = Vec::new();
    if let Some(m) = res.memory() {
        let limit = m.limit().filter(|&l| l != 0);
        if v2 {
            if let Some(l) = limit {
                out.push(write("memory.max", max_or(l)));
            }
            match (m.swap(), limit) {
                (Some(-1), _) => out.push(optional("memory.swap.max", "max")),
                (Some(swap), Some(l)) if l > 0 && swap > 0 => {
                    if swap < l {
                        return Err(format!("memory.swap ({swap}) is below memory.limit ({l})"));
                    }
                    out.push(optional("memory.swap.max", swap - l));
                }
                _ => {}
            }
            if let Some(r) = m.reservation().filter(|&r| r != 0) {
                out.push(write("memory.low", max_or(r)));
            }
        } else {
            if let Some(l) = limit {
                out.push(write("memory.limit_in_bytes", l));
            }
            if let Some(swap) = m.swap().filter(|&s| s != 0) {
                if let (Some(l), true) = (limit, swap > 0) {
                    if swap < l {
                        return Err(format!("memory.swap ({swap}) is below memory.limit ({l})"));
                    }
                }
                out.push(optional("memory.memsw.limit_in_bytes", swap));
            }
            if let Some(r) = m.reservation().filter(|&r| r != 0) {
                out.push(write("memory.soft_limit_in_bytes", r));
            }
            if let Some(s) = m.swappiness() {
                if s > 100 {
                    return Err(format!("memory.swappiness {s} is above 100"));
                }
                out.push(optional("memory.swappiness", s));
            }
            if m.disable_oom_killer() == Some(true) {
                out.push(write("memory.oom_control", 1));
            }
        }
    }
    if let Some(c) = res.cpu() {
        if v2 {
            if let Some(s) = c.shares().filter(|&s| s != 0) {
                out.push(write("cpu.weight", shares_to_weight(s)));
            }
            if c.quota().is_some() || c.period().is_some() {
                let period = c.period().filter(|&p| p != 0).unwrap_or(100_000);
                let quota = match c.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_owned(),
                };
                out.push(write("cpu.max", format!("{quota} {period}")));
            }
        } else {
            if let Some(s) = c.shares().filter(|&s| s != 0) {
                out.push(write("cpu.shares", s));
            }
            if let Some(p) = c.period().filter(|&p| p != 0) {
                out.push(write("cpu.cfs_period_us", p));
            }
            if let Some(q) = c.quota().filter(|&q| q != 0) {
                out.push(write("cpu.cfs_quota_us", if q < 0 { -1 } else { q }));
            }
        }
    }
    if let Some(p) = res.pids() {
        let value = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".to_owned()
        };
        out.push(write("pids.max", value));
    }
    if let Some(unified) = res.unified() {
        if !v2 {
            return Err("linux.resources.unified needs cgroup v2".into());
        }
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.contains('/') || !k.contains('.') || k.starts_with("cgroup.") {
                return Err(format!("bad unified cgroup key {k:?}"));
            }
            out.push(write(k, v));
        }
    }
    Ok(out)
}

/// One line for a v1 `devices.allow` (`allow`) or `devices.deny` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    /// Which file.
    pub allow: bool,
    /// `TYPE MAJOR:MINOR ACCESS`, or `a` for every device.
    pub rule: String,
}

/// runc's default device rules, allowed after the spec's: mknod of any
/// node, and the nodes every container gets (null, random, full, tty,
/// zero, urandom, console, pty slaves, ptmx).
const DEFAULT_DEVICE_RULES: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:8 rwm",
    "c 1:7 rwm",
    "c 5:0 rwm",
    "c 1:5 rwm",
    "c 1:9 rwm",
    "c 5:1 rwm",
    "c 136:* rwm",
    "c 5:2 rwm",
];

/// The device cgroup of a container, in runc's order: deny everything,
/// then `linux.resources.devices` in order, then the defaults, then read,
/// write and mknod of each `linux.devices` character or block node.
pub fn device_rules(
    spec_rules: &[LinuxDeviceCgroup],
    devices: &[DevicePlan],
) -> Result<Vec<DeviceRule>, String> {
    let deny_all = DeviceRule {
        allow: false,
        rule: "a".into(),
    };
    let mut out = vec![deny_all];
    for r in spec_rules {
        let access = r.access().as_deref().unwrap_or("rwm");
        if access.is_empty() || !access.chars().all(|c| "rwm".contains(c)) {
            return Err(format!("device rule access {access:?} (r, w, m)"));
        }
        let typ = match r.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => {
                out.push(DeviceRule {
                    allow: r.allow(),
                    rule: "a".into(),
                });
                continue;
            }
            LinuxDeviceType::C | LinuxDeviceType::U => 'c',
            LinuxDeviceType::B => 'b',
            // FIFOs are not devices: nothing to allow or deny.
            LinuxDeviceType::P => continue,
        };
        let num = |n: Option<i64>| match n {
            Some(n) if n >= 0 => n.to_string(),
            _ => "*".to_owned(),
        };
        out.push(DeviceRule {
            allow: r.allow(),
            rule: format!("{typ} {}:{} {access}", num(r.major()), num(r.minor())),
        });
    }
    out.extend(DEFAULT_DEVICE_RULES.iter().map(|r| DeviceRule {
        allow: true,
        rule: (*r).to_owned(),
    }));
    for d in devices {
        let typ = match d.kind {
            libc::S_IFCHR => 'c',
            libc::S_IFBLK => 'b',
            _ => continue,
        };
        out.push(DeviceRule {
            allow: true,
            rule: format!("{typ} {}:{} rwm", d.major, d.minor),
        });
    }
    Ok(out)
}

fn max_or(v: i64) -> String {
    if v < 0 {
        "max".to_owned()
    } else {
        v.to_string()
    }
}

/// Reads `key N` from a flat keyed file such as `memory.events`.
pub fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}
