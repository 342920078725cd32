//! The peers husk is measured against and what starting them takes: which
//! are installed, an OCI bundle of a busybox tree that husk, runc and crun
//! all run, a VM whose console is watched for a marker (a VMM that dies is
//! reported at once with its last stderr line), and the memory a set of
//! processes holds.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag (see `check_interrupted`),
/// so that a benchmark stopped by the user still stops the containers and
/// VMs it started (detached ones do not get the terminal's SIGINT).
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // the sigaction struct is fully initialized.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// An error once SIGINT or SIGTERM came.
pub fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// `bin` as found on PATH (or as given, if it holds a slash).
pub fn which(bin: &str) -> Option<PathBuf> {
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// A peer that is not measured, and why (printed, and kept in the JSON).
#[derive(Debug, Clone)]
pub struct Skipped {
    pub name: String,
    pub why: String,
}

impl Skipped {
    pub fn new(name: &str, why: impl Into<String>) -> Self {
        let s = Self {
            name: name.into(),
            why: why.into(),
        };
        eprintln!("note: {} is not measured: {}", s.name, s.why);
        s
    }

    pub fn json(list: &[Skipped]) -> serde_json::Value {
        list.iter()
            .map(|s| serde_json::json!({"name": s.name, "why": s.why}))
            .collect()
    }
}

/// Builds `dir/rootfs`: /bin/busybox and a link per applet.
pub fn busybox_tree(dir: &Path, busybox: &Path) -> Result<PathBuf, String> {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .map_err(|e| format!("{}: {e}", busybox.display()))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("{}: {e}", busybox.display()))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    Ok(root)
}

/// An OCI bundle in `dir` (made by `husk spec`, runc's defaults) running
/// `args` without a terminal in the read-only `rootfs`; `annotations` are
/// added (husk reads its own, runc and crun ignore them).
pub fn oci_bundle(
    dir: &Path,
    rootfs: &Path,
    args: &[&str],
    annotations: &[(&str, &str)],
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let o = Command::new(husk)
        .args(["spec", "--bundle"])
        .arg(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "husk spec: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    cfg["process"]["args"] = serde_json::json!(args);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["root"]["path"] = serde_json::json!(rootfs);
    cfg["root"]["readonly"] = serde_json::json!(true);
    for (k, v) in annotations {
        cfg["annotations"][*k] = serde_json::json!(v);
    }
    std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())?;
    Ok(dir.to_path_buf())
}

/// A command running the OCI runtime `bin`. crun refuses the v1+v2
/// "hybrid" cgroup layout ("cgroups in hybrid mode not supported"), so on
/// such hosts it runs in a private mount namespace without the cgroup2
/// mount, where it uses the v1 controllers as runc does.
pub fn oci_runtime(bin: &Path) -> Command {
    let hybrid = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace().nth(2) == Some("cgroup2")
                    && !l.contains(" /sys/fs/cgroup cgroup2 ")
            })
        })
        .unwrap_or(false);
    let is_crun = bin.file_name().is_some_and(|n| n == "crun");
    if !(hybrid && is_crun) {
        return Command::new(bin);
    }
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "for m in $(awk '$3 == \"cgroup2\" { print $2 }' /proc/self/mounts); do umount \"$m\" || exit 1; done; exec \"$0\" \"$@\"",
        )
        .arg(bin);
    c
}

/// Runs `c` (named `what` in errors) to completion: its wall time in
/// seconds, or an error with its last stderr line. Its stdout is discarded and its stderr goes to a file,
/// not a pipe: a runtime's `create` leaves a process behind (husk's VMM,
/// runc's init) that inherits them and would hold a pipe open.
pub fn timed(mut c: Command, what: &str) -> Result<f64, String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let err_path = std::env::temp_dir().join(format!(
        "husk-bench-{}-stderr-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let err_file =
        std::fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let t0 = Instant::now();
    let status = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .status();
    let wall = t0.elapsed().as_secs_f64();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    let status = status.map_err(|e| format!("{what}: {e}"))?;
    if !status.success() {
        return Err(format!("{what} failed ({status}): {}", last_line(&err)));
    }
    Ok(wall)
}

pub fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// QEMU's microvm machine with what the guest kernel can use: no firmware
/// tables, virtio-mmio devices announced on its command line, modern (1.x)
/// virtio-mmio. `-cpu host` without IA32_ARCH_CAPABILITIES: kvm_pvm hosts
/// on AMD refuse that MSR and QEMU aborts at start (the guest kernel does
/// not need it; husk does not expose it either).
pub const QEMU_MICROVM: &[&str] = &[
    "-M",
    "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
    "-global",
    "virtio-mmio.force-legacy=false",
    "-enable-kvm",
    "-cpu",
    "host,-arch-capabilities",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
];

/// QEMU microvm shaped as husk's sandbox VM: the same memory, one vCPU,
/// `kernel` booted with `cmdline` (default: husk's) plus what husk adds on
/// this host (the kvm_pvm workarounds). `qemu` is the QEMU command.
pub fn qemu_sandbox(mut qemu: Command, kernel: &Path, cmdline: Option<String>) -> Command {
    let cfg = husk_vmm::config::VmConfig {
        cmdline,
        ..Default::default()
    };
    let line = husk_vmm::config::guest_cmdline(&cfg, husk_vmm::vstate::kvm::is_pvm_host());
    let mem = husk_runtime::run::vm_mem_mib(None).to_string();
    qemu.args(QEMU_MICROVM)
        .args(["-m", &mem, "-smp", "1"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-append")
        .arg(line);
    qemu
}

/// A VM (husk or QEMU) whose console is on its stdout, started and
/// watched until a line contains `marker`.
pub struct ConsoleVm {
    pub child: Child,
    /// When the process was spawned and when the marker line came.
    pub spawned: Instant,
    pub marker_at: Instant,
}

impl ConsoleVm {
    /// Spawns `cmd` and waits up to `timeout` for `marker`. A VMM that
    /// exits first is reported at once, with its status and last stderr
    /// line.
    pub fn start(mut cmd: Command, marker: &str, timeout: Duration) -> Result<Self, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let name = cmd.get_program().to_string_lossy().into_owned();
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let (tx, rx) = mpsc::channel::<Instant>();
        let stdout = child.stdout.take();
        let wanted = marker.to_string();
        std::thread::spawn(move || {
            let Some(out) = stdout else { return };
            let mut sent = false;
            // Reads to the end (the console keeps going after the marker)
            // so that the VMM never blocks on a full pipe.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent && line.contains(&wanted) {
                    sent = tx.send(Instant::now()).is_ok();
                }
            }
        });
        let mut stderr = child.stderr.take();
        let (etx, erx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            let _ = etx.send(s);
        });
        let deadline = spawned + timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(marker_at) => {
                    return Ok(Self {
                        child,
                        spawned,
                        marker_at,
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = erx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
                return Err(format!(
                    "{name} died ({status}) before {marker:?}: {}",
                    last_line(&err)
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let err = erx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
                return Err(format!(
                    "{name}: no {marker:?} within {}s; stderr: {}",
                    timeout.as_secs(),
                    last_line(&err)
                ));
            }
        }
    }

    /// Seconds from spawn to the marker.
    pub fn to_marker(&self) -> f64 {
        (self.marker_at - self.spawned).as_secs_f64()
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process below `root` in the process tree (not `root` itself).
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The field after the command name (which may hold spaces).
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent {
            if ppid == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Proportional set size of `pid` in KiB (0 if it is gone).
pub fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Pss:")).map(kib))
        .unwrap_or(0)
}

/// The kernel's own memory that VMs and processes make it hold and that no
/// process's PSS shows, system-wide, KiB: page tables (KVM's secondary
/// ones included, `SecPageTables`) and kernel stacks, from /proc/meminfo.
pub fn kernel_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    kernel_kib_of(&text)
}

fn kernel_kib_of(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "PageTables" | "SecPageTables" | "KernelStack").then(|| kib(v))
        })
        .sum()
}

/// Resident KiB of `pid` (VmRSS; 0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(kib))
        .unwrap_or(0)
}

/// Resident and proportional KiB of a VMM's guest RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestRam {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// The guest RAM of VMM process `pid` with `mem_mib` of guest memory.
pub fn guest_ram(pid: u32, mem_mib: u64) -> Option<GuestRam> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    guest_ram_from_smaps(&smaps, mem_mib)
}

/// Finds guest RAM in an smaps text: a run of adjacent writable mappings whose sizes add up to the guest memory size (QEMU adds up to
/// 4 MiB of alignment). A run, not one mapping: madvise splits husk's
/// mapping, and husk maps the kernel's segments from its file into it.
fn guest_ram_from_smaps(smaps: &str, mem_mib: u64) -> Option<GuestRam> {
    // (start, end, writable, rss, pss)
    let mut maps: Vec<(u64, u64, bool, u64, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        let range = first
            .split_once('-')
            .filter(|(a, _)| !a.is_empty() && a.chars().all(|c| c.is_ascii_hexdigit()));
        if let Some((a, b)) = range {
            let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            else {
                continue;
            };
            // Private, or shared (memfd memory that virtiofsd maps too).
            let writable = parts.next().unwrap_or("").starts_with("rw");
            maps.push((start, end, writable, 0, 0));
        } else if let Some(m) = maps.last_mut() {
            if let Some(v) = line.strip_prefix("Rss:") {
                m.3 = kib(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                m.4 = kib(v);
            }
        }
    }
    let want = mem_mib << 20;
    let mut best: Option<GuestRam> = None;
    for i in 0..maps.len() {
        let mut size = 0;
        let mut ram = GuestRam::default();
        for j in i..maps.len() {
            let (start, end, writable, rss, pss) = maps[j];
            if !writable || (j > i && maps[j - 1].1 != start) {
                break;
            }
            size += end - start;
            ram.rss_kib += rss;
            ram.pss_kib += pss;
            if size > want + (4 << 20) {
                break;
            }
            if size >= want && best.is_none_or(|b| ram.rss_kib > b.rss_kib) {
                best = Some(ram);
            }
        }
    }
    best
}

pub fn kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

/// Bytes of disk that the files under `path` take (allocated blocks).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(dir) = std::fs::read_dir(path) {
            for e in dir.flatten() {
                total += disk_usage(&e.path());
            }
        }
    }
    total
}

/// The host CPU, for the reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_memory_sums_page_tables_and_stacks() {
        let meminfo = "MemTotal:       24000000 kB\nKernelStack:        1600 kB\nPageTables:         3340 kB\nSecPageTables:       100 kB\nSlab:  9999 kB\n";
        assert_eq!(kernel_kib_of(meminfo), 5040);
        assert!(kernel_kib() > 0, "this host's /proc/meminfo");
    }

    #[test]
    fn descendants_include_grandchildren() {
        let mut c = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let d = descendants(me);
            if d.len() >= 2 || Instant::now() > deadline {
                break d;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(found.contains(&(c.id() as i32)), "{found:?}");
        assert!(found.len() >= 2, "{found:?}");
        assert!(pss_kib(c.id() as i32) > 0);
        for p in found.iter().filter(|&&p| p != c.id() as i32) {
            // SAFETY: kill of the test's own grandchild.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn guest_ram_is_found_across_split_and_file_backed_mappings() {
        // A thread stack next to 128 MiB of guest RAM that is split by
        // madvise and holds a kernel segment mapped from its file.
        let smaps = "\
7eff00000000-7eff00800000 rw-p 00000000 00:00 0
Rss:                  64 kB
Pss:                  64 kB
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Rss:                1000 kB
Pss:                1000 kB
7f0001000000-7f0002000000 rw-p 00200000 fe:01 99     /var/lib/husk/kernel/vmlinux
Rss:                 300 kB
Pss:                 100 kB
7f0002000000-7f0008000000 rw-p 00000000 00:00 0
Rss:                 500 kB
Pss:                 500 kB
7f0008000000-7f0008001000 r--s 00000000 fe:01 1234    /usr/bin/husk
Rss:                   4 kB
Pss:                   4 kB
7f0009000000-7f0009100000 rw-p 00000000 00:00 0
Rss:                1024 kB
Pss:                1024 kB
";
        assert_eq!(
            guest_ram_from_smaps(smaps, 128),
            Some(GuestRam {
                rss_kib: 1800,
                pss_kib: 1600
            })
        );
        assert_eq!(guest_ram_from_smaps(smaps, 64), None);
        assert_eq!(guest_ram_from_smaps(smaps, 512), None);
    }

    #[test]
    fn which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("husk-no-such-binary").is_none());
        assert!(which("/bin/sh").is_some());
    }
}
