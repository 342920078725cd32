//! One cgroup per container, on cgroup v2 (the guest) or v1 (hybrid hosts,
//! where the host-side tests run): creation, `linux.resources`, joining,
//! OOM counts, stats, removal. The agent's own cgroup is the parent, so
//! nothing is created outside it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use husk_proto::Stats;
use oci_spec::runtime::LinuxResources;

mod resources;

use resources::write;
pub use resources::{
    device_rules, flat_keyed, resource_writes, shares_to_weight, CgroupWrite, DeviceRule,
};

/// v1 controllers the agent manages (cpuset is left alone: a new v1 cpuset
/// group has no cpus and could not be joined). `devices` has no v2
/// interface (v2 filters devices with BPF programs): the guest mounts it as
/// a v1 hierarchy next to cgroup2, and the agent uses it on either.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "devices"];

/// The v1 controller for device access rules.
const DEVICES: &str = "devices";

/// v2 controllers enabled for every container.
const V2_CONTROLLERS: &[&str] = &["memory", "pids"];

/// v2 controllers enabled once a container sets one of their limits (for
/// every container from then on). With `cpu` on, each cgroup's tasks are
/// a group of their own for the scheduler, whose per-level load tracking
/// at every enqueue, dequeue and tick slows every container where guest
/// kernel code is emulated (a warm `husk run -- true` took ~7% longer);
/// without it a container's tasks share the guest's run queue, and
/// `cpu.stat` still counts their time.
const V2_ON_DEMAND: &[&str] = &["cpu"];

/// A failed cgroup operation.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {what} {}: {source}", path.display())]
pub struct CgroupError {
    /// What was being done.
    pub what: String,
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The cgroup hierarchy the agent runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSystem {
    /// cgroup v2: the directory of the agent's own cgroup, and its
    /// directory in a v1 `devices` hierarchy if one is mounted.
    V2(PathBuf, Option<PathBuf>),
    /// cgroup v1: (controller, directory of the agent's own cgroup in that
    /// controller's hierarchy), for the controllers the agent manages.
    V1(Vec<(String, PathBuf)>),
}

impl CgroupSystem {
    /// Detects the hierarchy from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`; `None` when no usable cgroup fs is mounted.
    pub fn detect() -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::from_proc(&mountinfo, &cgroup)
    }

    /// [`CgroupSystem::detect`] on given file contents. v1 wins when any
    /// managed v1 controller other than `devices` is mounted (hybrid hosts
    /// keep their controllers there).
    pub fn from_proc(mountinfo: &str, proc_cgroup: &str) -> Option<Self> {
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            if pre.len() < 5 || post.len() < 3 {
                continue;
            }
            let (mount_root, mount_point) = (pre[3], pre[4]);
            match post[0] {
                "cgroup2" => {
                    let own = own_path(proc_cgroup, None)?;
                    v2 = Some(join_cgroup(mount_point, mount_root, &own));
                }
                "cgroup" => {
                    for c in post[2].split(',') {
                        if V1_CONTROLLERS.contains(&c) {
                            let Some(own) = own_path(proc_cgroup, Some(c)) else {
                                continue;
                            };
                            v1.push((c.to_owned(), join_cgroup(mount_point, mount_root, &own)));
                        }
                    }
                }
                _ => {}
            }
        }
        if v1.iter().any(|(c, _)| c != DEVICES) {
            return Some(CgroupSystem::V1(v1));
        }
        let devices = v1.into_iter().next().map(|(_, dir)| dir);
        v2.map(|own| CgroupSystem::V2(own, devices))
    }

    /// Creates the `<own>/husk` parent (enabling the v2 controllers on the
    /// way) ahead of the first container, so that it is done once, before
    /// the agent is ready (and so in a warm template), rather than while a
    /// container is created: each controller enabled populates kernfs
    /// directories, which is slow where guest kernel code is emulated.
    pub fn prepare(&self) -> Result<(), CgroupError> {
        let _parent = parent_lock();
        match self {
            CgroupSystem::V2(own, devices) => {
                Self::prepare_v2(own)?;
                devices
                    .iter()
                    .try_for_each(|dir| mkdir_all(&dir.join("husk")))
            }
            CgroupSystem::V1(own) => own
                .iter()
                .try_for_each(|(_, dir)| mkdir_all(&dir.join("husk"))),
        }
    }

    fn prepare_v2(own: &Path) -> Result<(), CgroupError> {
        let parent = own.join("husk");
        if !parent.is_dir() {
            mkdir_all(&parent)?;
            enable_v2_controllers(own);
            enable_v2_controllers(&parent);
        }
        Ok(())
    }

    /// Creates `<own>/husk/<name>` (every managed hierarchy on v1),
    /// enabling the v2 controllers on the way unless [`Self::prepare`] did.
    pub fn create(&self, name: &str) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError {
                what: "name".into(),
                path: PathBuf::from(name),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        self.create_named(name)
    }

    /// A cgroup made ahead for a container to come: `<own>/husk/.spare-PID`
    /// (no container name starts with a dot).
    pub fn spare(&self) -> Result<Cgroup, CgroupError> {
        self.create_named(&format!(".spare-{}", std::process::id()))
    }

    fn create_named(&self, name: &str) -> Result<Cgroup, CgroupError> {
        let _parent = parent_lock();
        match self {
            CgroupSystem::V2(own, devices) => {
                Self::prepare_v2(own)?;
                let own = std::iter::once((String::new(), own.clone()))
                    .chain(devices.iter().map(|d| (DEVICES.to_owned(), d.clone())));
                Self::create_in(true, own, name)
            }
            CgroupSystem::V1(own) => Self::create_in(false, own.iter().cloned(), name),
        }
    }

    /// `<dir>/husk/<name>` in each (controller, own dir).
    fn create_in(
        v2: bool,
        own: impl Iterator<Item = (String, PathBuf)>,
        name: &str,
    ) -> Result<Cgroup, CgroupError> {
        let mut cgroup = Cgroup {
            v2,
            dirs: Vec::new(),
        };
        for (controller, own_dir) in own {
            let dir = own_dir.join("husk").join(name);
            if let Err(e) = mkdir_all(&dir) {
                cgroup.remove_dirs(false);
                return Err(e);
            }
            cgroup.dirs.push((controller, dir));
        }
        Ok(cgroup)
    }
}

/// The process's cgroup path for `controller` (v1) or the v2 entry (`None`).
fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_owned())
    })
}

/// mount point + (own path relative to the mount's root).
fn join_cgroup(mount_point: &str, mount_root: &str, own: &str) -> PathBuf {
    let rel = own.strip_prefix(mount_root).unwrap_or(own);
    let mut p = PathBuf::from(mount_point);
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
    }
    p
}

fn mkdir_all(p: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(p).map_err(|source| CgroupError {
        what: "create".into(),
        path: p.to_owned(),
        source,
    })
}

/// Held while a cgroup is made under the shared `husk/` parent and while
/// a removal takes that parent away with its last cgroup: otherwise the
/// parent could go between its mkdir (and, on v2, its controllers being
/// enabled) and the new cgroup's.
static PARENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn parent_lock() -> std::sync::MutexGuard<'static, ()> {
    PARENT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Best effort: a controller that cannot be enabled (e.g. a parent with
/// processes in it) only means its limits will fail to apply, loudly.
fn enable_v2_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for c in V2_CONTROLLERS {
        if available.split_whitespace().any(|a| a == *c) {
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    v2: bool,
    /// (controller, directory); one entry with an empty name on v2.
    dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    /// The cgroup's directories (one per hierarchy on v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut d: Vec<PathBuf> = self.dirs.iter().map(|(_, p)| p.clone()).collect();
        d.dedup();
        d
    }

    fn dir_for(&self, file: &str) -> Option<&Path> {
        let controller = file.split('.').next()?;
        if self.v2 && controller != DEVICES {
            return self.dirs.first().map(|(_, p)| p.as_path());
        }
        self.dirs
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
    }

    /// Applies `linux.resources`.
    pub fn apply(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let writes = resource_writes(self.v2, res).map_err(|msg| CgroupError {
            what: "resources".into(),
            path: PathBuf::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, msg),
        })?;
        self.write_all(writes)
    }

    /// Applies device rules (see [`device_rules`]) where a `devices`
    /// hierarchy is mounted; without one the guest has no device cgroup
    /// and nothing is written.
    pub fn apply_devices(&self, rules: &[DeviceRule]) -> Result<(), CgroupError> {
        if !self.dirs.iter().any(|(c, _)| c == DEVICES) {
            return Ok(());
        }
        let writes = rules.iter().map(|r| {
            let file = if r.allow {
                "devices.allow"
            } else {
                "devices.deny"
            };
            write(file, &r.rule)
        });
        self.write_all(writes.collect())
    }

    /// Each write in order; a file written more than once (device rules)
    /// is opened once: every write(2) to a cgroup file is one value, and
    /// an open and a path walk per rule are slow where guest kernel code
    /// is emulated.
    fn write_all(&self, writes: Vec<CgroupWrite>) -> Result<(), CgroupError> {
        if self.v2 {
            for w in &writes {
                self.enable_on_demand(&w.file);
            }
        }
        let mut open: Vec<(PathBuf, fs::File)> = Vec::new();
        for w in writes {
            let Some(dir) = self.dir_for(&w.file) else {
                if w.optional {
                    continue;
                }
                return Err(CgroupError {
                    what: format!("controller for {}", w.file),
                    path: PathBuf::new(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                });
            };
            let path = dir.join(&w.file);
            if w.optional && !path.exists() {
                continue;
            }
            let fail = |source| CgroupError {
                what: format!("write {:?} to", w.value),
                path: path.clone(),
                source,
            };
            let at = match open.iter().position(|(p, _)| *p == path) {
                Some(at) => at,
                None => {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(fail)?;
                    open.push((path.clone(), f));
                    open.len() - 1
                }
            };
            // One write(2): a cgroup file takes one value per call.
            let n = (&open[at].1).write(w.value.as_bytes()).map_err(fail)?;
            if n != w.value.len() {
                return Err(fail(io::Error::from(io::ErrorKind::WriteZero)));
            }
        }
        Ok(())
    }

    /// Enables the on-demand v2 controller of `file` (`cpu` of `cpu.max`)
    /// in `<own>` and `<own>/husk` unless the cgroup has the file already.
    /// Best effort: if that fails, the write itself fails, loudly.
    fn enable_on_demand(&self, file: &str) {
        let Some(controller) = file.split('.').next() else {
            return;
        };
        let Some((_, dir)) = self.dirs.first() else {
            return;
        };
        if !V2_ON_DEMAND.contains(&controller) || dir.join(file).exists() {
            return;
        }
        let husk = dir.parent();
        for d in [husk.and_then(Path::parent), husk].into_iter().flatten() {
            let _ = fs::write(d.join("cgroup.subtree_control"), format!("+{controller}"));
        }
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn join(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        self.join_where(pid, |_| true)
    }

    /// Moves `pid` into every hierarchy but `devices`: a container's init
    /// still mounts its root disk (which opens a block device) and makes
    /// its /dev nodes, and joins the device cgroup with
    /// [`Self::join_devices`] once that is done, before it runs anything
    /// of the container's.
    pub fn join_all_but_devices(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        self.join_where(pid, |c| c != DEVICES)
    }

    /// Moves `pid` into the `devices` hierarchy (if there is one).
    pub fn join_devices(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        self.join_where(pid, |c| c == DEVICES)
    }

    fn join_where(&self, pid: libc::pid_t, want: impl Fn(&str) -> bool) -> Result<(), CgroupError> {
        let mut dirs: Vec<&Path> = self
            .dirs
            .iter()
            .filter(|(c, _)| want(c))
            .map(|(_, d)| d.as_path())
            .collect();
        dirs.dedup();
        for dir in dirs {
            let path = dir.join("cgroup.procs");
            fs::write(&path, pid.to_string()).map_err(|source| CgroupError {
                what: format!("add pid {pid} to"),
                path,
                source,
            })?;
        }
        Ok(())
    }

    fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.dir_for(file)?.join(file)).ok()
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        self.read(file)?.trim().parse().ok()
    }

    /// OOM kills recorded so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        self.read(file)
            .and_then(|t| flat_keyed(&t, key))
            .unwrap_or(0)
    }

    /// Current usage.
    pub fn stats(&self) -> Stats {
        if self.v2 {
            Stats {
                memory_usage_bytes: self.read_u64("memory.current").unwrap_or(0),
                memory_max_usage_bytes: self.read_u64("memory.peak"),
                memory_limit_bytes: self.read_u64("memory.max"),
                cpu_usage_ns: self
                    .read("cpu.stat")
                    .and_then(|t| flat_keyed(&t, "usage_usec"))
                    .unwrap_or(0)
                    * 1000,
                pids_current: self.read_u64("pids.current"),
                oom_kills: self.oom_kills(),
            }
        } else {
            Stats {
                memory_usage_bytes: self.read_u64("memory.usage_in_bytes").unwrap_or(0),
                memory_max_usage_bytes: self.read_u64("memory.max_usage_in_bytes"),
                // v1 reports "unlimited" as a huge page-aligned number.
                memory_limit_bytes: self
                    .read_u64("memory.limit_in_bytes")
                    .filter(|&l| l < 1 << 62),
                cpu_usage_ns: self.read_u64("cpuacct.usage").unwrap_or(0),
                pids_current: self.read_u64("pids.current"),
                oom_kills: self.oom_kills(),
            }
        }
    }

    /// Removes the cgroup, waiting up to ~1 s for dying processes to leave;
    /// then the shared `husk` parent if it is empty.
    pub fn remove(&self) {
        self.remove_dirs(true);
    }

    /// [`Cgroup::remove`]; `lock`: take the parent lock to remove the
    /// parent (false: the caller holds it).
    fn remove_dirs(&self, lock: bool) {
        for dir in self.dirs() {
            for _ in 0..100 {
                match fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
            if let Some(parent) = dir.parent() {
                let _parent = lock.then(parent_lock);
                let _ = fs::remove_dir(parent);
            }
        }
    }
}
