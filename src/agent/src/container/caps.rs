//! Linux capabilities: names, numbers and applying the five OCI sets.

use std::io;

use crate::sys;

/// Capability names (without `CAP_`), indexed by number (capability.h).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability name, with or without `CAP_`, any case.
pub fn cap_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES.iter().position(|n| *n == bare).map(|i| i as u32)
}

/// The highest capability number this agent knows.
pub const LAST_KNOWN_CAP: u32 = NAMES.len() as u32 - 1;

/// The five sets as bitmasks, plus the kernel's highest capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
    /// `/proc/sys/kernel/cap_last_cap`.
    pub last_cap: u32,
}

/// Drops from the bounding set every capability not in `sets.bounding`.
/// Needs CAP_SETPCAP, so it runs before the uid change.
pub fn drop_bounding(sets: &CapSets) -> io::Result<()> {
    for cap in 0..=sets.last_cap {
        if sets.bounding & (1 << cap) == 0 {
            match sys::capbset_drop(cap) {
                Ok(()) => {}
                // A capability the kernel does not have.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Sets effective/permitted/inheritable, then the ambient set (which must be
/// a subset of permitted and inheritable). Runs after the uid change.
pub fn apply(sets: &CapSets) -> io::Result<()> {
    sys::capset(sets.effective, sets.permitted, sets.inheritable)?;
    // Kernels without ambient capabilities (< 4.3) fail with EINVAL; there is
    // nothing to clear then.
    if let Err(e) = sys::cap_ambient_clear() {
        if e.raw_os_error() != Some(libc::EINVAL) || sets.ambient != 0 {
            return Err(e);
        }
    }
    for cap in 0..=sets.last_cap {
        if sets.ambient & (1 << cap) != 0 {
            sys::cap_ambient_raise(cap)?;
        }
    }
    Ok(())
}

/// Reads `/proc/sys/kernel/cap_last_cap`, capped to what the agent knows.
pub fn kernel_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(LAST_KNOWN_CAP, |n: u32| n.min(LAST_KNOWN_CAP))
}
