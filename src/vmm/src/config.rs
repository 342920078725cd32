//! VM configuration: the same serde types serve `husk vm --config FILE`
//! and the command-line flags. Unknown fields are rejected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout;
use crate::devices::virtio::block::ID_BYTES;
use crate::devices::virtio::fs::{valid_tag, TAG_LEN as FS_TAG_LEN};
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::vsock::{MAX_UDS_PATH, MIN_GUEST_CID};
use crate::seccomp::SeccompMode;

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 1;
/// The generic guest command line used when none is given: serial console,
/// reboot through the i8042 (the VM ends on reboot), no reboot delay after
/// a panic, one UART only (no probing for COM2-4).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Console {
    /// husk's stdout; husk's stdin feeds the guest's serial input.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for Console {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(Console::Stdout),
            "none" => Ok(Console::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Console::File(PathBuf::from(p))),
                _ => Err(format!(
                    "invalid console {s:?}: expected stdout, none or file:PATH"
                )),
            },
        }
    }
}

impl TryFrom<String> for Console {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Console> for String {
    fn from(c: Console) -> String {
        c.to_string()
    }
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Console::Stdout => write!(f, "stdout"),
            Console::None => write!(f, "none"),
            Console::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_true() -> bool {
    true
}

/// Everything needed to boot one micro-VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel (vmlinux ELF). None: the kernel built by tools/build-guest-kernel.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Guest command line; None: `DEFAULT_CMDLINE`.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Serial console destination.
    #[serde(default)]
    pub console: Console,
    /// Add the guest command-line workarounds on kvm_pvm hosts.
    #[serde(default = "default_true")]
    pub pvm_workarounds: bool,
    /// virtio-blk disks, /dev/vda first.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on taps, eth0 first.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device whose host side is a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Host directories shared through virtio-fs (a virtiofsd each).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Seccomp filters on the VMM's threads (`HUSK_SECCOMP` overrides).
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// A control socket (pause, resume, snapshot, stop; see `api`).
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Jail the VMM once the VM is built (see `jail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailConfig>,
}

/// One shared host directory: `tag=TAG,dir=DIR[,ro]` on the command line.
/// The guest mounts it with `mount -t virtiofs TAG MOUNTPOINT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The tag the guest mounts (1 to 36 printable bytes, unique per VM).
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
    /// The guest cannot change anything under `dir` (enforced by the
    /// backend, not only by the guest's mount).
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for FsConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut fs = FsConfig {
            tag: String::new(),
            dir: PathBuf::new(),
            read_only: false,
        };
        for part in s.split(',') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match (key, value) {
                ("tag", Some(t)) => fs.tag = t.to_string(),
                ("dir", Some(d)) if !d.is_empty() => fs.dir = PathBuf::from(d),
                ("ro" | "readonly", v) => fs.read_only = on_off(key, v)?,
                _ => {
                    return Err(format!(
                        "invalid fs {s:?}: expected tag=TAG,dir=DIR[,ro], got {part:?}"
                    ))
                }
            }
        }
        if fs.dir.as_os_str().is_empty() {
            return Err(format!("invalid fs {s:?}: dir=DIR is required"));
        }
        fs.validate()?;
        Ok(fs)
    }
}

impl FsConfig {
    /// Checks the tag.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.tag;
        if !valid_tag(t) {
            return Err(format!(
                "invalid fs tag {t:?}: 1 to {FS_TAG_LEN} printable characters without spaces"
            ));
        }
        Ok(())
    }
}

/// One virtio-blk disk: `path=IMG[,ro][,id=NAME][,direct]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file (or block device).
    pub path: PathBuf,
    /// The guest sees a read-only disk; writes fail.
    #[serde(default)]
    pub read_only: bool,
    /// Serial number the guest reads (/sys/block/vdX/serial), at most 20 bytes.
    #[serde(default)]
    pub id: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
}

fn on_off(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(format!(
            "invalid value {other:?} for {key}: expected on or off"
        )),
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            id: None,
            direct: false,
        };
        for part in s.split(',') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match (key, value) {
                ("path", Some(p)) if !p.is_empty() => disk.path = PathBuf::from(p),
                ("ro" | "readonly", v) => disk.read_only = on_off(key, v)?,
                ("direct", v) => disk.direct = on_off(key, v)?,
                ("id", Some(id)) => disk.id = Some(id.to_string()),
                _ => {
                    return Err(format!(
                    "invalid disk {s:?}: expected path=IMG[,ro][,id=NAME][,direct], got {part:?}"
                ))
                }
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(format!("invalid disk {s:?}: path=IMG is required"));
        }
        Ok(disk)
    }
}

/// One virtio-net NIC: `tap=NAME[,mac=MAC]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host tap interface; created for the VM's lifetime if it does not exist.
    pub tap: String,
    /// Guest MAC address; a random locally administered one if absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() => tap = Some(t.to_string()),
                Some(("mac", m)) => mac = Some(m.parse()?),
                _ => {
                    return Err(format!(
                        "invalid net {s:?}: expected tap=NAME[,mac=MAC], got {part:?}"
                    ))
                }
            }
        }
        let tap = tap.ok_or_else(|| format!("invalid net {s:?}: tap=NAME is required"))?;
        Ok(NetConfig { tap, mac })
    }
}

/// The virtio-vsock device: `cid=N,uds=PATH` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more; 0-2 and 2^32-1 are reserved).
    pub guest_cid: u32,
    /// Unix socket husk listens on for host clients (`CONNECT <port>`);
    /// guest connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut cid = None;
        let mut uds = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => {
                    cid = Some(c.parse::<u32>().map_err(|_| {
                        format!("invalid vsock cid {c:?}: expected a number from {MIN_GUEST_CID}")
                    })?)
                }
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => {
                    return Err(format!(
                        "invalid vsock {s:?}: expected cid=N,uds=PATH, got {part:?}"
                    ))
                }
            }
        }
        let (Some(guest_cid), Some(uds_path)) = (cid, uds) else {
            return Err(format!(
                "invalid vsock {s:?}: cid=N and uds=PATH are both required"
            ));
        };
        let v = VsockConfig {
            guest_cid,
            uds_path,
        };
        v.validate()?;
        Ok(v)
    }
}

impl VsockConfig {
    /// Checks the CID and the socket path.
    pub fn validate(&self) -> Result<(), String> {
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(format!(
                "invalid vsock cid {}: 0, 1 and 2 (the host) and {} are reserved",
                self.guest_cid,
                u32::MAX
            ));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH {
            return Err(format!(
                "invalid vsock socket path {:?}: 1 to {MAX_UDS_PATH} bytes (room is left for _<port>)",
                self.uds_path
            ));
        }
        Ok(())
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: None,
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: DEFAULT_VCPUS,
            console: Console::Stdout,
            pvm_workarounds: true,
            disks: Vec::new(),
            net: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            seccomp: SeccompMode::On,
            api_sock: None,
            jail: None,
        }
    }
}

/// Errors reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {0}: {1}")]
    Read(String, #[source] std::io::Error),
    /// The config file is not valid JSON for `VmConfig`.
    #[error("invalid config {0}: {1}")]
    Parse(String, String),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(shown.clone(), e))?;
        Self::from_json(&text).map_err(|e| match e {
            ConfigError::Parse(_, m) => ConfigError::Parse(shown, m),
            other => other,
        })
    }

    /// Parses and validates JSON.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: VmConfig = serde_json::from_str(text)
            .map_err(|e| ConfigError::Parse("<json>".into(), e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// virtio devices the VM gets: disks, NICs, then vsock.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + self.net.len() + usize::from(self.vsock.is_some()) + self.fs.len()
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "vcpus must be between 1 and {}, got {}",
                layout::MAX_VCPUS,
                self.vcpus
            )));
        }
        if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Invalid(format!(
                "memory must be between {} and {} MiB, got {} MiB",
                layout::MIN_MEM_MIB,
                layout::MAX_MEM_MIB,
                self.mem_mib
            )));
        }
        if let Some(v) = &self.vsock {
            v.validate().map_err(ConfigError::Invalid)?;
        }
        for (i, f) in self.fs.iter().enumerate() {
            f.validate().map_err(ConfigError::Invalid)?;
            if self.fs[..i].iter().any(|g| g.tag == f.tag) {
                return Err(ConfigError::Invalid(format!(
                    "fs tag {:?} is used twice",
                    f.tag
                )));
            }
        }
        let devices = self.virtio_device_count();
        if devices > layout::VIRTIO_MMIO_SLOTS {
            return Err(ConfigError::Invalid(format!(
                "at most {} virtio devices (disks + NICs + vsock + shares), got {devices}",
                layout::VIRTIO_MMIO_SLOTS
            )));
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.disks {
            let Some(id) = &d.id else { continue };
            if id.len() > ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(ConfigError::Invalid(format!(
                    "invalid disk id {id:?}: 1 to {ID_BYTES} printable ASCII characters, no commas"
                )));
            }
            if !ids.insert(id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "disk id {id:?} is used twice"
                )));
            }
        }
        let mut taps = std::collections::HashSet::new();
        for n in &self.net {
            if !taps.insert(n.tap.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "tap {:?} is used twice",
                    n.tap
                )));
            }
        }
        if let Some(j) = &self.jail {
            j.validate().map_err(ConfigError::Invalid)?;
            for (what, path) in self.jail_kept_paths() {
                j.check_inside(what, path).map_err(ConfigError::Invalid)?;
            }
        }
        Ok(())
    }

    /// The paths a VMM keeps using once built (sockets it unlinks and
    /// connects next to, the console file it rotates): inside the jail
    /// directory when there is a jail.
    pub fn jail_kept_paths(&self) -> Vec<(&'static str, &Path)> {
        let mut kept = Vec::new();
        if let Some(p) = &self.api_sock {
            kept.push(("the control socket", p.as_path()));
        }
        if let Some(v) = &self.vsock {
            kept.push(("the vsock socket", v.uds_path.as_path()));
        }
        if let Console::File(p) = &self.console {
            kept.push(("the console file", p.as_path()));
        }
        kept
    }
}

/// The extra guest command line for kvm_pvm hosts: the `husk_pvm` switch
/// that turns on the guest kernel's platform patches, plus features the
/// emulator cannot run (see resources/guest/README.md).
///
/// And `GLIBC_TUNABLES` for init's environment (the kernel passes words it
/// does not know to init; husk's agent hands it on to every container
/// process): the guest's user mode runs natively in the *host's* XCR0 (kvm_pvm
/// does not load a guest XCR0, even with CR4.OSXSAVE set), so CPUID and
/// xgetbv offer AVX and AVX-512, while the guest kernel, without XSAVE,
/// switches tasks saving x87/SSE state only: the upper halves of the
/// vector registers pass from process to process. glibc's AVX string
/// functions then crash at random; with these tunables glibc picks its SSE
/// ones. Code that uses AVX regardless of glibc is still exposed.
pub const PVM_CMDLINE: &str = concat!(
    "husk_pvm mitigations=off clearcpuid=xsave,popcnt,smap,erms,fsrm,fsgsbase,invpcid,cx16 noreplace-smp rodata=off percpu_alloc=page clocksource=kvm-clock ",
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-FMA,-FMA4,-AVX_Fast_Unaligned_Load"
);

/// The full guest command line for `cfg`.
pub fn guest_cmdline(cfg: &VmConfig, pvm_host: bool) -> String {
    let mut line = cfg
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if pvm_host && cfg.pvm_workarounds {
        line.push(' ');
        line.push_str(PVM_CMDLINE);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c = VmConfig::from_json(
            r#"{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","mem_mib":256,
                "vcpus":2,"console":"file:/tmp/c.log","pvm_workarounds":false}"#,
        )
        .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.console, Console::File("/tmp/c.log".into()));
        assert!(!c.pvm_workarounds);
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let c = VmConfig::from_json("{}").unwrap();
        assert_eq!(c, VmConfig::default());
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let unknown = VmConfig::from_json(r#"{"kernal":"/k"}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `kernal`"), "{unknown}");
        assert!(VmConfig::from_json(r#"{"vcpus":0}"#).is_err());
        assert!(VmConfig::from_json(r#"{"vcpus":33}"#).is_err());
        assert!(VmConfig::from_json(r#"{"vcpus":300}"#).is_err());
        assert!(VmConfig::from_json(r#"{"mem_mib":1}"#).is_err());
        assert!(VmConfig::from_json(r#"{"console":"tty"}"#).is_err());
        assert!(VmConfig::from_json(r#"{"console":"file:"}"#).is_err());
        assert!(VmConfig::from_json("[1,2]").is_err());
        assert!(VmConfig::from_json("{").is_err());
    }

    #[test]
    fn disks_and_nics_parse_from_json() {
        let c = VmConfig::from_json(
            r#"{"disks":[{"path":"/a.img","read_only":true,"id":"root"},{"path":"/b.img","direct":true}],
                "net":[{"tap":"tap0","mac":"02:00:00:00:00:01"},{"tap":"tap1"}]}"#,
        )
        .unwrap();
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[0].read_only && !c.disks[0].direct);
        assert_eq!(c.disks[0].id.as_deref(), Some("root"));
        assert!(c.disks[1].direct && !c.disks[1].read_only);
        assert_eq!(c.net[0].mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(c.net[1].mac, None);
        for bad in [
            r#"{"disks":[{"path":"/a","readonly":true}]}"#,
            r#"{"disks":[{"read_only":true}]}"#,
            r#"{"net":[{"tap":"t","mac":"01:00:00:00:00:01"}]}"#,
            r#"{"net":[{"tap":"t","bridge":"br0"}]}"#,
            r#"{"disks":[{"path":"/a","id":"x"},{"path":"/b","id":"x"}]}"#,
            r#"{"disks":[{"path":"/a","id":"123456789012345678901"}]}"#,
            r#"{"net":[{"tap":"t"},{"tap":"t"}]}"#,
        ] {
            assert!(VmConfig::from_json(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..20).map(|i| format!(r#"{{"path":"/d{i}"}}"#)).collect();
        let json = format!(r#"{{"disks":[{}]}}"#, many.join(","));
        assert!(VmConfig::from_json(&json).is_err());
    }

    #[test]
    fn disk_and_net_flags_parse() {
        let d: DiskConfig = "path=/x.img,ro,id=data,direct".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/x.img".into(),
                read_only: true,
                id: Some("data".into()),
                direct: true
            }
        );
        let d: DiskConfig = "path=/x.img,direct=on,ro=off".parse().unwrap();
        assert!(d.direct && !d.read_only);
        for bad in [
            "",
            "ro",
            "path=",
            "path=/x,rw",
            "path=/x,direct=yes",
            "/x.img",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:09".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.unwrap().to_string(), "02:00:00:00:00:09");
        for bad in [
            "",
            "tap=",
            "mac=02:00:00:00:00:09",
            "tap=t,mac=zz",
            "tap=t,x=1",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vsock_parses_from_json_and_flags_and_is_validated() {
        let c =
            VmConfig::from_json(r#"{"vsock":{"guest_cid":3,"uds_path":"/run/v.sock"}}"#).unwrap();
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/run/v.sock".into()
            })
        );
        assert_eq!(VmConfig::from_json("{}").unwrap().vsock, None);
        let long = "x".repeat(MAX_UDS_PATH + 1);
        for bad in [
            r#"{"vsock":{"guest_cid":2,"uds_path":"/v"}}"#.to_string(),
            r#"{"vsock":{"guest_cid":4294967295,"uds_path":"/v"}}"#.to_string(),
            r#"{"vsock":{"guest_cid":-1,"uds_path":"/v"}}"#.to_string(),
            r#"{"vsock":{"guest_cid":3}}"#.to_string(),
            r#"{"vsock":{"guest_cid":3,"uds_path":""}}"#.to_string(),
            r#"{"vsock":{"guest_cid":3,"uds_path":"/v","port":1}}"#.to_string(),
            format!(r#"{{"vsock":{{"guest_cid":3,"uds_path":"{long}"}}}}"#),
        ] {
            assert!(VmConfig::from_json(&bad).is_err(), "{bad}");
        }
        let v: VsockConfig = "cid=42,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.guest_cid, 42);
        assert_eq!(v.uds_path, Path::new("/tmp/v.sock"));
        let v: VsockConfig = "uds=/tmp/v.sock,cid=3".parse().unwrap();
        assert_eq!(v.guest_cid, 3);
        for bad in [
            "",
            "cid=3",
            "uds=/v",
            "cid=2,uds=/v",
            "cid=0,uds=/v",
            "cid=x,uds=/v",
            "cid=3,uds=",
            "cid=3,uds=/v,extra=1",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
        // The vsock device takes a virtio slot.
        let disks: Vec<String> = (0..layout::VIRTIO_MMIO_SLOTS)
            .map(|i| format!(r#"{{"path":"/d{i}"}}"#))
            .collect();
        let json = format!(
            r#"{{"disks":[{}],"vsock":{{"guest_cid":3,"uds_path":"/v"}}}}"#,
            disks.join(",")
        );
        assert!(VmConfig::from_json(&json).is_err());
    }

    #[test]
    fn console_round_trips() {
        for s in ["stdout", "none", "file:/x/y"] {
            assert_eq!(s.parse::<Console>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn pvm_cmdline_is_added_only_on_pvm_hosts() {
        let c = VmConfig::default();
        assert_eq!(guest_cmdline(&c, false), DEFAULT_CMDLINE);
        let line = guest_cmdline(&c, true);
        assert!(line.starts_with(DEFAULT_CMDLINE));
        assert!(line.contains(" husk_pvm "));
        let off = VmConfig {
            pvm_workarounds: false,
            cmdline: Some("root=/dev/vda".into()),
            ..Default::default()
        };
        assert_eq!(guest_cmdline(&off, true), "root=/dev/vda");
        assert!(guest_cmdline(&c, true).len() < layout::CMDLINE_MAX_SIZE);
    }
}
