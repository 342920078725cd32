//! Snapshots: a paused VM written to two files and brought back in a new
//! process. `state.json` holds everything that is not guest RAM (the VM
//! config as built, vCPU and irqchip state, the kvm-clock, the UART and
//! every virtio transport); `memory` is guest RAM, region after region, with
//! holes where a page is all zeroes. A restore maps `memory` copy-on-write,
//! so VMs restored from one snapshot share its unmodified pages through the
//! page cache.
//!
//! The format is versioned; a snapshot from another format version, a CPU
//! with another vendor or signature, or a memory file of the wrong size is
//! refused with one line.

mod restore;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

pub use restore::{build_restored, build_restored_then, ClockMode, RestoreOptions};

/// What `state.json` says it is.
pub const FORMAT: &str = "husk-snapshot";
/// The state format this husk writes and reads. 2: virtio-blk offers
/// `size_max` and enforces it (a guest saved under 1 never acked it, and
/// may send longer segments). 3: the vsock receive queue is at most 64
/// entries (a guest saved under 2 set up 256).
pub const VERSION: u32 = 3;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file read (a 32-vCPU VM's is well under 2 MiB).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Errors writing or reading a snapshot. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Not a husk snapshot at all.
    #[error("{0} is not a husk snapshot state file ({1})")]
    NotASnapshot(String, String),
    /// Another version of the format.
    #[error("{path} is snapshot format version {got}; this husk ({husk}) reads version {want} only: take the snapshot again")]
    Version {
        /// The state file.
        path: String,
        /// Its version.
        got: u32,
        /// What this husk reads.
        want: u32,
        /// This husk's version.
        husk: &'static str,
    },
    /// The state file is larger than any real one.
    #[error("{0} is larger than {MAX_STATE_BYTES} bytes: not a husk snapshot")]
    TooLarge(String),
    /// The memory file does not match the VM's memory size.
    #[error("{path} holds {got} bytes but the snapshot's VM has {want} bytes of memory (truncated or from another snapshot?)")]
    MemorySize {
        /// The memory file.
        path: String,
        /// Its size.
        got: u64,
        /// Guest RAM size.
        want: u64,
    },
    /// The state does not describe a VM husk can build.
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
    /// The host CPU is not the one the snapshot was taken on.
    #[error("the snapshot was taken on another CPU: {0}")]
    Cpu(String),
    /// What this VM has cannot be saved.
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
}

/// Everything but guest RAM.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Always `FORMAT`.
    pub format: String,
    /// `VERSION` when written.
    pub version: u32,
    /// The husk that wrote it.
    pub husk_version: String,
    /// The VM's config as built (random MACs resolved).
    pub config: VmConfig,
    /// The guest command line it booted with.
    pub cmdline: String,
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// irqchip, PIT and clock.
    pub vm: VmState,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Each virtio transport, in slot order.
    pub devices: Vec<TransportState>,
}

/// Just enough of a state file to tell its format and version.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

impl Snapshot {
    /// Writes the state to `out` and syncs it.
    pub fn write_to(&self, out: &mut File) -> Result<(), SnapshotError> {
        let io = |e| SnapshotError::Io("writing the state file".into(), e);
        let json = serde_json::to_vec(self).map_err(|e| io(e.into()))?;
        out.set_len(0).map_err(io)?;
        out.write_all_at(&json, 0).map_err(io)?;
        out.sync_all().map_err(io)
    }

    /// Reads and checks the state file `path`.
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let name = path.display().to_string();
        let f = File::open(path).map_err(|e| SnapshotError::Io(name.clone(), e))?;
        let mut bytes = Vec::new();
        f.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| SnapshotError::Io(name.clone(), e))?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge(name));
        }
        let header: Header = serde_json::from_slice(&bytes)
            .map_err(|e| SnapshotError::NotASnapshot(name.clone(), e.to_string()))?;
        if header.format != FORMAT {
            return Err(SnapshotError::NotASnapshot(
                name,
                format!("format {:?}", header.format),
            ));
        }
        if header.version != VERSION {
            return Err(SnapshotError::Version {
                path: name,
                got: header.version,
                want: VERSION,
                husk: env!("CARGO_PKG_VERSION"),
            });
        }
        let snap: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|e| SnapshotError::NotASnapshot(name, e.to_string()))?;
        snap.check()?;
        Ok(snap)
    }

    /// The state describes the VM its config does.
    fn check(&self) -> Result<(), SnapshotError> {
        let bad = |m: String| Err(SnapshotError::Inconsistent(m));
        self.config
            .validate()
            .map_err(|e| SnapshotError::Inconsistent(e.to_string()))?;
        if self.mem_bytes != self.config.mem_mib << 20 {
            return bad(format!(
                "{} bytes of memory for a {} MiB VM",
                self.mem_bytes, self.config.mem_mib
            ));
        }
        if self.vcpus.len() != usize::from(self.config.vcpus) {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            ));
        }
        if self.devices.len() != self.config.virtio_device_count() {
            return bad(format!(
                "{} device states for {} virtio devices",
                self.devices.len(),
                self.config.virtio_device_count()
            ));
        }
        if !self.vm.well_formed() {
            return bad("irqchip state".into());
        }
        Ok(())
    }

    /// Refuses a host CPU of another vendor or family/model/stepping than
    /// the snapshot's, or one that lacks a feature the guest was shown.
    pub fn check_cpu(&self, host: &CpuId) -> Result<(), SnapshotError> {
        let Some(first) = self.vcpus.first() else {
            return Ok(());
        };
        let find = |entries: &[kvm_bindings::kvm_cpuid_entry2], f: u32, i: u32| {
            entries
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
        };
        let host = host.as_slice();
        let saved = first.cpuid.as_slice();
        let (Some(hv), Some(sv)) = (find(host, 0, 0), find(saved, 0, 0)) else {
            return Err(SnapshotError::Cpu("no CPUID leaf 0".into()));
        };
        if (hv.ebx, hv.ecx, hv.edx) != (sv.ebx, sv.ecx, sv.edx) {
            return Err(SnapshotError::Cpu("the CPU vendor differs".into()));
        }
        if let (Some(h), Some(s)) = (find(host, 1, 0), find(saved, 1, 0)) {
            if h.eax != s.eax {
                return Err(SnapshotError::Cpu(format!(
                    "CPU signature {:#x}, snapshot {:#x}",
                    h.eax, s.eax
                )));
            }
        }
        // Feature leaves: every bit the guest saw must be one KVM offers here.
        for (f, i) in [(7u32, 0u32), (0xd, 1), (0x8000_0001, 0)] {
            if let (Some(h), Some(s)) = (find(host, f, i), find(saved, f, i)) {
                for (name, hv, sv) in [
                    ("ebx", h.ebx, s.ebx),
                    ("ecx", h.ecx, s.ecx),
                    ("edx", h.edx, s.edx),
                ] {
                    if sv & !hv != 0 {
                        return Err(SnapshotError::Cpu(format!(
                            "CPUID leaf {f:#x}.{i} {name} bits {:#x} are missing here",
                            sv & !hv
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes guest RAM to `out`, region after region, leaving all-zero pages
/// as holes; syncs the file. Returns the bytes actually written.
pub fn write_memory(mem: &GuestMemoryMmap, out: &File) -> Result<u64, SnapshotError> {
    let io = |e| SnapshotError::Io("writing the memory file".into(), e);
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(0).map_err(io)?;
    out.set_len(total).map_err(io)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(start + done))
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let at = offset + done + (i * PAGE) as u64;
                    out.write_all_at(page, at).map_err(io)?;
                    written += page.len() as u64;
                }
            }
            done += n as u64;
        }
        offset += len;
    }
    out.sync_all().map_err(io)?;
    Ok(written)
}

/// Maps the memory file over every region of `mem` (fresh, untouched
/// anonymous memory of the snapshot's size), copy-on-write.
pub fn map_memory(mem: &GuestMemoryMmap, file: &File, path: &Path) -> Result<(), SnapshotError> {
    check_memory_size(mem, file, path)?;
    let name = path.display().to_string();
    let mut offset = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let mapped = crate::vstate::memory::map_file(mem, start, file, offset, region.len())
            .map_err(|e| SnapshotError::Io(name.clone(), std::io::Error::other(e.to_string())))?;
        if !mapped {
            return Err(SnapshotError::Io(
                name,
                std::io::Error::other("cannot map it over guest memory"),
            ));
        }
        offset += region.len();
    }
    Ok(())
}

/// The memory file `file` (at `path`) is as large as `mem`.
fn check_memory_size(mem: &GuestMemoryMmap, file: &File, path: &Path) -> Result<(), SnapshotError> {
    let name = path.display().to_string();
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let got = file
        .metadata()
        .map_err(|e| SnapshotError::Io(name.clone(), e))?
        .len();
    if got != total {
        return Err(SnapshotError::MemorySize {
            path: name,
            got,
            want: total,
        });
    }
    Ok(())
}

/// Copies the memory file into `mem` (fresh memory of the snapshot's
/// size, e.g. a memfd a vhost-user backend maps), region after region;
/// the file's holes (all-zero pages) are skipped, so only the pages the
/// snapshot holds are backed.
pub fn load_memory(mem: &GuestMemoryMmap, file: &File, path: &Path) -> Result<(), SnapshotError> {
    check_memory_size(mem, file, path)?;
    let name = path.display().to_string();
    let io = |e| SnapshotError::Io(name.clone(), e);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut at = offset;
        while let Some((data, hole)) = data_extent(file, at, offset + len).map_err(io)? {
            let mut pos = data;
            while pos < hole {
                let n = (hole - pos).min(CHUNK as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos).map_err(io)?;
                mem.write_slice(&buf[..n], GuestAddress(start + (pos - offset)))
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                pos += n as u64;
            }
            at = hole;
        }
        offset += len;
    }
    Ok(())
}

/// The first stretch of data in `file` at or after `from` and before
/// `end`: (its start, its end), or None when only holes are left.
fn data_extent(file: &File, from: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    if from >= end {
        return Ok(None);
    }
    let seek = |whence, at: u64| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: lseek(2) on an fd `file` owns; no memory is involved.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `at`.
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let Some(data) = seek(libc::SEEK_DATA, from)?.filter(|&d| d < end) else {
        return Ok(None);
    };
    let hole = seek(libc::SEEK_HOLE, data)?.unwrap_or(end).min(end);
    Ok(Some((data, hole)))
}

/// Opens (creating) the two files of a snapshot in `dir`, which must not
/// exist yet; on error nothing is left behind.
pub fn create_files(dir: &Path) -> Result<(File, File), SnapshotError> {
    let name = dir.display().to_string();
    std::fs::create_dir(dir).map_err(|e| SnapshotError::Io(name.clone(), e))?;
    let open = |f: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(f))
            .map_err(|e| SnapshotError::Io(dir.join(f).display().to_string(), e))
    };
    match (open(STATE_FILE), open(MEMORY_FILE)) {
        (Ok(s), Ok(m)) => Ok((s, m)),
        (Err(e), _) | (_, Err(e)) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
