//! Warm templates: a snapshot of a booted, idle sandbox (kernel up, agent
//! listening, no container yet), restored for each new container instead
//! of booting the guest again. Restored VMs map the template's memory file
//! copy-on-write, so they also share its pages.
//!
//! A template is keyed by everything that shapes the idle guest: husk's
//! version and snapshot format, the kernel (canonical path, size, inode,
//! mtime and ctime: an in-place rewrite moves ctime), the agent's disk
//! (named by the agent's digest), the command line, memory and vCPUs. A
//! new kernel or agent therefore gets a new template; `husk template
//! prune` removes the old ones.
//!
//! The template has the sandbox's devices, each in a slot the container
//! fills at restore:
//! - a root disk: a 1 MiB placeholder (`/dev/vdb`), which the guest never
//!   mounts; a restore puts the container's image in that slot and raises
//!   a configuration-change interrupt, and the agent waits for the new
//!   size and drops the placeholder's cached blocks before it mounts it;
//! - NICs: taps in a network namespace of the template VM's own (gone
//!   with it), and MACs of the template's ([`nic_mac`]); a restore puts
//!   each NIC on the container's tap, and the agent gives the guest's
//!   interface the container's MAC when it configures it;
//! - shares: an empty read-only directory served by virtiofsd, tagged as
//!   the container's shares are (`husk0`, ...); the guest never mounts
//!   them, so the snapshot holds no FUSE state, and a restore gives each
//!   slot a virtiofsd of the container's directory. Guest memory is then
//!   a copy in a memfd (virtiofsd maps it) rather than a copy-on-write
//!   mapping of the template's.
//!
//! So the key holds the shape too: whether there is a root disk, and how
//! many NICs and shares.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_vmm::config::Console;
use husk_vmm::snapshot::{self, RestoreOptions};
use sha2::{Digest, Sha256};

use crate::sandbox::SandboxConfig;
use crate::{paths, RuntimeError};

mod build;

/// Disk index of the container's root (after the agent's disk).
const ROOTFS_DISK: usize = 1;

/// Where templates live: `$HUSK_ROOT/templates`.
pub fn dir() -> PathBuf {
    paths::root().join("templates")
}

/// Whether templates are on: `HUSK_TEMPLATE=off|0|false|no` turns them
/// off for every caller (`husk run --no-template` for one run).
pub fn enabled_by_env() -> bool {
    !crate::env_off("HUSK_TEMPLATE")
}

/// The MAC of a template's NIC `index` (locally administered; the agent
/// replaces it with the container's).
pub fn nic_mac(index: usize) -> String {
    format!("02:68:75:73:6b:{:02x}", index & 0xff)
}

/// What a template is keyed by, as text: the husk, kernel and agent it
/// runs (`build`), and the VM shape (`shape`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyText {
    /// husk's version, snapshot format and binary, the kernel, the agent's
    /// disk, the command line: a template of another build is stale.
    pub build: String,
    /// Memory, vCPUs, whether there is a root disk, NICs and shares: one
    /// template per shape.
    pub shape: String,
}

impl KeyText {
    /// The key: a digest of both.
    pub fn key(&self) -> String {
        Sha256::digest(self.text().as_bytes())
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Both, as stored next to the template (`KEY_FILE`).
    pub fn text(&self) -> String {
        format!("{}shape {}\n", self.build, self.shape)
    }

    /// Parses [`KeyText::text`].
    pub fn parse(text: &str) -> Option<Self> {
        let (build, shape) = text.rsplit_once("shape ")?;
        let shape = shape.strip_suffix('\n')?;
        (build.ends_with('\n') && !shape.contains('\n')).then(|| KeyText {
            build: build.to_string(),
            shape: shape.to_string(),
        })
    }
}

/// The file in a template's directory that holds its [`KeyText`].
pub const KEY_FILE: &str = "key.txt";

/// What `cfg`'s template is keyed by.
pub fn key_text(cfg: &SandboxConfig) -> Result<KeyText, RuntimeError> {
    let kernel = cfg
        .kernel
        .clone()
        .unwrap_or_else(husk_vmm::default_kernel_path);
    let io = |p: &Path| {
        let shown = p.display().to_string();
        move |e| RuntimeError::Io(shown, e)
    };
    let kernel = kernel.canonicalize().map_err(io(&kernel))?;
    let m = std::fs::metadata(&kernel).map_err(io(&kernel))?;
    let agent = cfg.agent_disk.canonicalize().map_err(io(&cfg.agent_disk))?;
    // The binary too: a rebuilt husk may model a device differently
    // without a new version (its saved queues would not fit).
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Io("current exe".into(), e))?;
    let x = std::fs::metadata(&exe).map_err(io(&exe))?;
    let pvm = husk_vmm::vstate::kvm::is_pvm_host();
    // The command line the guest gets, the host's workarounds included.
    let vm = husk_vmm::VmConfig {
        cmdline: Some(crate::sandbox::sandbox_cmdline()),
        ..Default::default()
    };
    let build = format!(
        "husk {} snapshot {} binary {}\nkernel {} {}\nagent-disk {}\ncmdline {}\npvm {}\n",
        env!("CARGO_PKG_VERSION"),
        snapshot::VERSION,
        file_identity(&x),
        kernel.display(),
        file_identity(&m),
        agent.display(),
        husk_vmm::config::guest_cmdline(&vm, pvm),
        pvm,
    );
    let shape = format!(
        "mem {} MiB, {} vCPU, root disk {}, {} NIC, {} share",
        cfg.mem_mib,
        cfg.vcpus,
        if cfg.rootfs_image.is_some() {
            "yes"
        } else {
            "no"
        },
        cfg.network.links.len(),
        cfg.shares.len(),
    );
    Ok(KeyText { build, shape })
}

/// Which file this is, and which version of it: size, inode, and the
/// modification and change times.
fn file_identity(m: &std::fs::Metadata) -> String {
    format!(
        "{} {} {}.{} {}.{}",
        m.len(),
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// The template key for `cfg`'s kernel, agent and VM shape.
pub fn key(cfg: &SandboxConfig) -> Result<String, RuntimeError> {
    Ok(key_text(cfg)?.key())
}

/// The template `key` for `cfg`, built first (one cold boot) if there is
/// none.
pub fn ensure(
    cfg: &SandboxConfig,
    text: &KeyText,
    boot_timeout: Duration,
) -> Result<PathBuf, RuntimeError> {
    let key = &text.key();
    let out = dir().join(key);
    let made =
        || out.join(snapshot::STATE_FILE).is_file() && out.join(snapshot::MEMORY_FILE).is_file();
    if made() {
        return Ok(out);
    }
    let base = dir();
    std::fs::create_dir_all(&base).map_err(|e| RuntimeError::Io(base.display().to_string(), e))?;
    // One build per key at a time: containers started together wait for
    // the first one's template rather than each booting one.
    let _building = wait_for_build(&base.join(format!(".{key}.lock")), key, boot_timeout)?;
    if made() {
        return Ok(out);
    }
    let work = base.join(format!(".build-{key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    paths::private_dir(&work)?;
    let built = build::build(cfg, &work, boot_timeout).and_then(|snap| {
        let p = snap.join(KEY_FILE);
        std::fs::write(&p, text.text())
            .map(|()| snap)
            .map_err(|e| RuntimeError::Io(p.display().to_string(), e))
    });
    let result = built.and_then(|snap| {
        // Another husk may have built the same template meanwhile: either
        // one will do, and a rename never exposes a half-written one.
        match std::fs::rename(&snap, &out) {
            Ok(()) => Ok(out.clone()),
            Err(_) if out.join(snapshot::STATE_FILE).is_file() => Ok(out.clone()),
            Err(e) => Err(RuntimeError::Io(out.display().to_string(), e)),
        }
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Takes the build lock `lock` of template `key`, waiting up to a build's
/// time (a boot and a snapshot) for another process's build to end.
fn wait_for_build(
    lock: &Path,
    key: &str,
    boot_timeout: Duration,
) -> Result<std::fs::File, RuntimeError> {
    let limit = boot_timeout * 2 + Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(f) = paths::try_lock(lock)? {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::Invalid(format!(
                "another process has been building template {key} for over {} s",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cfg`'s VM restored from its template (made first if there is none),
/// or None when it must boot instead. A template that cannot be made or
/// restored costs a cold boot, not the container: a warning says why, and
/// one that cannot be restored is removed so that the next run makes a
/// new one. A kernel or agent that cannot be read is left to the cold
/// boot to report; a device of the sandbox's own that cannot be opened (a
/// tap, a share's directory) fails the sandbox, as it would fail a boot.
pub fn try_restore(cfg: &SandboxConfig) -> Result<Option<husk_vmm::Vm>, RuntimeError> {
    let Ok(text) = key_text(cfg).inspect_err(|e| tracing::debug!("no template: {e}")) else {
        return Ok(None);
    };
    let Ok(dir) = ensure(cfg, &text, cfg.boot_timeout)
        .inspect_err(|e| tracing::warn!("booting without a template: {e}"))
    else {
        return Ok(None);
    };
    let mut connected = false;
    match restore(cfg, &dir, &mut connected) {
        Ok(vm) => Ok(Some(vm)),
        // The taps are connected, the jail perhaps entered: no going back
        // to a cold boot in this process.
        Err(e) if connected => Err(e),
        // The sandbox's own devices (its disk, taps, shares) or config: a
        // cold boot would fail the same way, and the template is fine.
        Err(
            e @ RuntimeError::Vm(
                husk_vmm::builder::BuildError::Virtio(_) | husk_vmm::builder::BuildError::Config(_),
            ),
        ) => Err(e),
        Err(e) => {
            tracing::warn!(
                "cannot restore template {}, removed; booting: {e}",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(&dir);
            Ok(None)
        }
    }
}

/// Builds `cfg`'s VM from the template in `dir`: its console, vsock
/// socket and root disk are the sandbox's own; its taps are connected
/// (`connected` says whether that began) before it enters its jail.
pub fn restore(
    cfg: &SandboxConfig,
    dir: &Path,
    connected: &mut bool,
) -> Result<husk_vmm::Vm, RuntimeError> {
    let opts = RestoreOptions {
        console: Console::File(cfg.run_dir.join("console.log")),
        api_sock: None,
        vsock_uds: Some(cfg.run_dir.join("vsock.sock")),
        seccomp: cfg.seccomp,
        disks: cfg
            .rootfs_image
            .iter()
            .map(|p| (ROOTFS_DISK, p.clone()))
            .collect(),
        nics: cfg.network.nics()?.into_iter().enumerate().collect(),
        shares: cfg.shares.iter().cloned().enumerate().collect(),
        // The agent sets the wall clock (`Request::Refresh`).
        clock: snapshot::ClockMode::Continue,
        jail: crate::sandbox::jail(cfg),
    };
    Ok(snapshot::build_restored_then(dir, &opts, &mut || {
        *connected = true;
        crate::sandbox::connect(cfg)
    })?)
}

/// One template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its key (the directory name).
    pub key: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Bytes it takes on disk (the memory file is sparse).
    pub disk_bytes: u64,
    /// Guest memory in MiB, from its state.
    pub mem_mib: u64,
    /// When it was made.
    pub created: std::time::SystemTime,
    /// What it was made for (None: unreadable, or made before husk kept it).
    pub made_for: Option<KeyText>,
}

impl Template {
    /// Whether it runs the husk, kernel and agent of `current` (the build
    /// part of a [`key_text`]): else it is stale.
    pub fn is_current(&self, current: &KeyText) -> bool {
        self.made_for
            .as_ref()
            .is_some_and(|t| t.build == current.build)
    }
}

/// Every template, oldest first.
pub fn list() -> Result<Vec<Template>, RuntimeError> {
    let base = dir();
    let entries = match std::fs::read_dir(&base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RuntimeError::Io(base.display().to_string(), e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let key = e.file_name().to_string_lossy().into_owned();
        let d = e.path();
        if key.starts_with('.') || !d.join(snapshot::STATE_FILE).is_file() {
            continue;
        }
        let mut disk_bytes = 0;
        let mut created = std::time::SystemTime::UNIX_EPOCH;
        for f in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
            if let Ok(m) = std::fs::metadata(d.join(f)) {
                disk_bytes += m.blocks() * 512;
                created = created.max(m.modified().unwrap_or(created));
            }
        }
        let mem_mib = std::fs::metadata(d.join(snapshot::MEMORY_FILE)).map_or(0, |m| m.len() >> 20);
        let made_for = std::fs::read_to_string(d.join(KEY_FILE))
            .ok()
            .and_then(|t| KeyText::parse(&t));
        out.push(Template {
            key,
            dir: d,
            disk_bytes,
            mem_mib,
            created,
            made_for,
        });
    }
    out.sort_by_key(|t| t.created);
    Ok(out)
}

/// Removes what template builds left behind when their process died
/// (`.build-KEY-PID` directories, `.placeholder-PID` files); returns the
/// paths removed. A build whose process is alive is left alone.
pub fn sweep_stale_builds() -> Vec<PathBuf> {
    sweep_stale_builds_in(&dir())
}

fn sweep_stale_builds_in(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".build-") || name.starts_with(".placeholder-")) {
            continue;
        }
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        let Some(pid) = pid.filter(|&p| p > 0) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// Removes a template (a running VM restored from it keeps its mapping).
pub fn remove(key: &str) -> Result<(), RuntimeError> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        return Err(RuntimeError::Invalid(format!(
            "invalid template key {key:?}"
        )));
    }
    let d = dir().join(key);
    if !d.join(snapshot::STATE_FILE).is_file() {
        return Err(RuntimeError::Invalid(format!("no template {key}")));
    }
    std::fs::remove_dir_all(&d).map_err(|e| RuntimeError::Io(d.display().to_string(), e))?;
    let _ = std::fs::remove_file(dir().join(format!(".{key}.lock")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> SandboxConfig {
        SandboxConfig {
            kernel: Some(dir.join("vmlinux")),
            agent_disk: dir.join("agent.ext4"),
            rootfs_image: Some(dir.join("root.ext4")),
            mem_mib: 256,
            vcpus: 1,
            run_dir: dir.join("run"),
            network: Default::default(),
            shares: Vec::new(),
            seccomp: Default::default(),
            template: true,
            boot_timeout: Duration::from_secs(1),
            jail_id: None,
        }
    }

    /// A fresh directory with what [`cfg`] names: a kernel holding
    /// `kernel` and an agent disk.
    fn key_inputs(tag: &str, kernel: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), kernel).unwrap();
        std::fs::write(dir.join("agent.ext4"), b"agent").unwrap();
        dir
    }

    #[test]
    fn the_key_follows_the_kernel_the_agent_and_the_vm_shape() {
        let dir = key_inputs("tkey", b"kernel one");
        let c = cfg(&dir);
        let k = key(&c).unwrap();
        assert_eq!(k.len(), 32);
        assert_eq!(key(&c).unwrap(), k, "stable");
        // Another VM shape.
        assert_ne!(
            key(&SandboxConfig {
                mem_mib: 512,
                ..c.clone()
            })
            .unwrap(),
            k
        );
        assert_ne!(
            key(&SandboxConfig {
                vcpus: 2,
                ..c.clone()
            })
            .unwrap(),
            k
        );
        // The devices the container fills at restore: how many matter,
        // not which.
        let with_share = SandboxConfig {
            shares: vec!["tag=husk0,dir=/tmp".parse().unwrap()],
            ..c.clone()
        };
        assert_ne!(key(&with_share).unwrap(), k);
        let other_share = SandboxConfig {
            shares: vec!["tag=husk0,dir=/var,ro".parse().unwrap()],
            ..c.clone()
        };
        assert_eq!(key(&other_share).unwrap(), key(&with_share).unwrap());
        let shared_root = SandboxConfig {
            rootfs_image: None,
            ..with_share.clone()
        };
        assert_ne!(key(&shared_root).unwrap(), key(&with_share).unwrap());
        let link = |veth: &str, mac: &str| crate::net::Link {
            veth: veth.into(),
            tap: "husktap0".into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: vec!["10.0.0.2/24".into()],
        };
        let nic = |l| SandboxConfig {
            network: crate::net::HostNetwork {
                links: vec![l],
                routes: Vec::new(),
            },
            ..c.clone()
        };
        let one = key(&nic(link("eth0", "02:42:ac:11:00:02"))).unwrap();
        assert_ne!(one, k);
        assert_eq!(key(&nic(link("net1", "02:42:ac:11:00:09"))).unwrap(), one);
        // The container's own disk and run dir do not matter.
        let other = SandboxConfig {
            rootfs_image: Some(dir.join("other.ext4")),
            run_dir: dir.join("elsewhere"),
            ..c.clone()
        };
        assert_eq!(key(&other).unwrap(), k);
        // Another agent disk (its name carries the agent's digest).
        std::fs::write(dir.join("agent2.ext4"), b"agent").unwrap();
        let agent2 = SandboxConfig {
            agent_disk: dir.join("agent2.ext4"),
            ..c.clone()
        };
        assert_ne!(key(&agent2).unwrap(), k);
        // The kernel rewritten in place, same size: its ctime moves on.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("vmlinux"), b"kernel two").unwrap();
        assert_ne!(key(&c).unwrap(), k);
        // A kernel that is not there has no key (the cold boot reports it).
        std::fs::remove_file(dir.join("vmlinux")).unwrap();
        assert!(key(&c).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_texts_round_trip_and_tell_build_from_shape() {
        let dir = key_inputs("tkt", b"kernel");
        let t = key_text(&cfg(&dir)).unwrap();
        assert_eq!(KeyText::parse(&t.text()), Some(t.clone()));
        assert_eq!(
            t.shape,
            "mem 256 MiB, 1 vCPU, root disk yes, 0 NIC, 0 share"
        );
        assert_eq!(t.key(), key(&cfg(&dir)).unwrap());
        for bad in ["", "shape x", "build\nshape a\nb\n", "build\nshape x"] {
            assert_eq!(KeyText::parse(bad), None, "{bad:?}");
        }
        // Another shape of the same build is current; another agent is not.
        let template = |made_for| Template {
            key: String::new(),
            dir: PathBuf::new(),
            disk_bytes: 0,
            mem_mib: 0,
            created: std::time::SystemTime::UNIX_EPOCH,
            made_for,
        };
        let other_shape = key_text(&SandboxConfig {
            vcpus: 2,
            ..cfg(&dir)
        })
        .unwrap();
        assert!(template(Some(other_shape)).is_current(&t));
        std::fs::write(dir.join("agent2.ext4"), b"agent").unwrap();
        let other_agent = key_text(&SandboxConfig {
            agent_disk: dir.join("agent2.ext4"),
            ..cfg(&dir)
        })
        .unwrap();
        assert!(!template(Some(other_agent)).is_current(&t));
        assert!(!template(None).is_current(&t));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn template_nics_have_local_unicast_macs_of_their_own() {
        let macs: Vec<husk_vmm::devices::virtio::net::MacAddr> =
            (0..4).map(|i| nic_mac(i).parse().unwrap()).collect();
        for (i, m) in macs.iter().enumerate() {
            assert_eq!(m.0[0] & 0x03, 0x02, "local unicast: {m}");
            assert!(!macs[..i].contains(m));
        }
    }

    #[test]
    fn remove_refuses_keys_that_are_paths() {
        for k in ["", "../x", ".build-1", "a/b"] {
            assert!(remove(k).is_err(), "{k:?}");
        }
    }

    #[test]
    fn stale_builds_are_swept_and_live_ones_kept() {
        let base = std::env::temp_dir().join(format!("husk-tpl-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        for d in [
            format!(".build-k-{dead}"),
            format!(".build-k-{live}"),
            "somekey".into(),
            ".build-nopid".into(),
        ] {
            std::fs::create_dir_all(base.join(d).join("snapshot")).unwrap();
        }
        std::fs::write(base.join(format!(".placeholder-{dead}")), b"").unwrap();
        let mut removed = sweep_stale_builds_in(&base);
        removed.sort();
        assert_eq!(
            removed,
            vec![
                base.join(format!(".build-k-{dead}")),
                base.join(format!(".placeholder-{dead}")),
            ]
        );
        for kept in [
            format!(".build-k-{live}"),
            "somekey".into(),
            ".build-nopid".into(),
        ] {
            assert!(base.join(kept).is_dir());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
