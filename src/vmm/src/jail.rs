//! The VMM's jail, in the spirit of Firecracker's jailer, entered once the
//! VM is built (kernel loaded, /dev/kvm, disks, taps, virtiofsd and
//! sockets open) and before any thread that serves the guest starts, so
//! that every such thread inherits it:
//!
//! - cgroups, when asked (existing cgroup directories, v2 or one per v1
//!   hierarchy: husk joins them and never creates or removes one);
//! - rlimits: open files (2048 unless asked) and, when asked, file size
//!   (SIGXFSZ ignored, so a write past it fails instead of killing the VMM);
//! - a mount namespace of its own whose root is an empty read-only tmpfs
//!   holding only the jail directory, at its own path (so the VMM's paths
//!   stay valid: the vsock socket, the control socket, the console file,
//!   snapshots written there), and a procfs that shows only the VMM's own
//!   processes (`/proc/self/fd` is how the vsock muxer connects without
//!   following symlinks);
//! - optionally an empty network namespace (taps opened before keep
//!   working; Unix sockets are reached by path);
//! - optionally a PID namespace of its own ([`pidns`]: entered first, by
//!   forking before the VM exists, since KVM ties a VM to its creator's
//!   address space);
//! - a dedicated uid and gid, with no supplementary groups, no capability
//!   and an empty bounding set.
//!
//! The jail directory must already belong to the jail's uid and be
//! writable by it alone (husk changes no ownership but that of the sockets
//! and console file it creates there), and the process must be single
//! threaded when it enters: namespaces and credentials are per thread in
//! Linux, so a thread started before would stay outside.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sys::{c_path, fstat, open_path};

pub mod pidns;

/// Open files a jailed VMM may hold unless asked otherwise (Firecracker's
/// jailer default).
pub const DEFAULT_NOFILE: u64 = 2048;
/// The fewest open files a jail may allow: the VM's own descriptors.
const MIN_NOFILE: u64 = 64;
/// Where cgroups are.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A jail: `dir=DIR,uid=N,gid=N[,netns][,pidns][,nofile=N][,fsize=BYTES][,cgroup=PATH]...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The only host directory the VMM keeps (at the same path).
    pub dir: PathBuf,
    /// The uid the VMM runs as (not 0).
    pub uid: u32,
    /// The gid the VMM runs as (not 0).
    pub gid: u32,
    /// A new, empty network namespace.
    #[serde(default)]
    pub netns: bool,
    /// A new PID namespace, the VMM its PID 1 (see [`pidns`]).
    #[serde(default)]
    pub pidns: bool,
    /// RLIMIT_NOFILE.
    #[serde(default = "default_nofile")]
    pub nofile: u64,
    /// RLIMIT_FSIZE in bytes, when set.
    #[serde(default)]
    pub fsize: Option<u64>,
    /// Cgroup directories under /sys/fs/cgroup to join (v2, or one per v1
    /// hierarchy).
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

fn default_nofile() -> u64 {
    DEFAULT_NOFILE
}

/// Why the VMM could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail's settings are wrong.
    #[error("invalid jail: {0}")]
    Invalid(String),
    /// A step failed.
    #[error("cannot jail the VMM: {0}: {1}")]
    Step(String, #[source] io::Error),
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |e| JailError::Step(what, e)
}

/// An absolute path without `.` or `..`.
fn plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn number<T: FromStr>(key: &str, v: Option<&str>) -> Result<T, String> {
    v.and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("invalid jail {key}: expected a number"))
}

impl FromStr for JailConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut dir, mut uid, mut gid) = (None, None, None);
        let mut jail = JailConfig {
            dir: PathBuf::new(),
            uid: 0,
            gid: 0,
            netns: false,
            pidns: false,
            nofile: DEFAULT_NOFILE,
            fsize: None,
            cgroups: Vec::new(),
        };
        for part in s.split(',') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match key {
                "dir" => dir = value.map(PathBuf::from),
                "uid" => uid = Some(number("uid", value)?),
                "gid" => gid = Some(number("gid", value)?),
                "netns" if value.is_none() => jail.netns = true,
                "pidns" if value.is_none() => jail.pidns = true,
                "nofile" => jail.nofile = number("nofile", value)?,
                "fsize" => jail.fsize = Some(number("fsize", value)?),
                "cgroup" => jail.cgroups.push(value.map(PathBuf::from).unwrap_or_default()),
                _ => {
                    return Err(format!(
                        "invalid jail option {part:?}: expected dir=DIR,uid=N,gid=N[,netns][,pidns][,nofile=N][,fsize=BYTES][,cgroup=PATH]..."
                    ))
                }
            }
        }
        let (Some(dir), Some(uid), Some(gid)) = (dir, uid, gid) else {
            return Err("a jail needs dir=DIR, uid=N and gid=N".into());
        };
        jail.dir = dir;
        jail.uid = uid;
        jail.gid = gid;
        jail.validate()?;
        Ok(jail)
    }
}

impl JailConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), String> {
        if !plain_absolute(&self.dir) || self.dir == Path::new("/") {
            return Err(format!(
                "jail dir {:?} must be an absolute path other than / without . or ..",
                self.dir
            ));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err("a jail's uid and gid must not be 0".into());
        }
        if self.nofile < MIN_NOFILE {
            return Err(format!(
                "jail nofile {} is too low (at least {MIN_NOFILE})",
                self.nofile
            ));
        }
        for c in &self.cgroups {
            if !plain_absolute(c) || !c.starts_with(CGROUP_ROOT) || c == Path::new(CGROUP_ROOT) {
                return Err(format!(
                    "jail cgroup {c:?} must be a directory under {CGROUP_ROOT}"
                ));
            }
        }
        Ok(())
    }

    /// Checks that a path the jailed VMM keeps using (`what`) is inside
    /// the jail directory.
    pub fn check_inside(&self, what: &str, path: &Path) -> Result<(), String> {
        if plain_absolute(path) && path.starts_with(&self.dir) && path != self.dir {
            return Ok(());
        }
        Err(format!(
            "{what} {} must be inside the jail dir {} (the jailed VMM sees nothing else)",
            path.display(),
            self.dir.display()
        ))
    }

    /// Checks the host side of the jail (its directory, its cgroups) before
    /// anything is opened or created, so that a mistake there leaves
    /// nothing behind; `enter` checks again.
    pub fn precheck(&self) -> Result<(), JailError> {
        drop(self.open_dir()?);
        for c in &self.cgroups {
            let procs = c.join("cgroup.procs");
            std::fs::metadata(&procs).map_err(step(format!("cgroup {}", c.display())))?;
        }
        Ok(())
    }

    /// With `pidns`, forks into a new PID namespace ([`pidns::enter`]):
    /// returns in the child, which is to build the VM; the parent never
    /// returns. Call it first, single-threaded, before anything is opened.
    pub fn enter_pid_namespace(&self) -> Result<(), JailError> {
        if self.pidns {
            pidns::enter()
        } else {
            Ok(())
        }
    }

    /// Enters the jail. `created` are the files husk made in the jail
    /// directory (sockets, the console file), handed to the jail's uid.
    pub fn enter(&self, created: &[&Path]) -> Result<(), JailError> {
        require_single_thread("enter its jail")?;
        let dir = self.open_dir()?;
        for p in created {
            std::os::unix::fs::lchown(p, Some(self.uid), Some(self.gid))
                .map_err(step(format!("chown {}", p.display())))?;
        }
        for c in &self.cgroups {
            let procs = c.join("cgroup.procs");
            std::fs::write(&procs, std::process::id().to_string())
                .map_err(step(format!("join cgroup {}", c.display())))?;
        }
        set_rlimit(libc::RLIMIT_NOFILE, self.nofile).map_err(step("RLIMIT_NOFILE"))?;
        if let Some(bytes) = self.fsize {
            // SAFETY: setting a signal's disposition to SIG_IGN.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
            set_rlimit(libc::RLIMIT_FSIZE, bytes).map_err(step("RLIMIT_FSIZE"))?;
        }
        self.pivot(&dir)?;
        drop(dir);
        let death = ParentDeath::get();
        self.drop_privileges()?;
        death.rearm()?;
        pidns::supervisor_alive()
    }

    /// Opens the jail directory and checks that it belongs to the jail.
    fn open_dir(&self) -> Result<OwnedFd, JailError> {
        let name = self.dir.display().to_string();
        let fd = open_path(
            &self.dir,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .map_err(step(format!("jail dir {name}")))?;
        let st = fstat(&fd).map_err(step(format!("jail dir {name}")))?;
        if st.st_uid != self.uid || st.st_mode & 0o022 != 0 {
            return Err(JailError::Invalid(format!(
                "jail dir {name} must belong to uid {} and be writable by it alone (install -d -o {} -g {} -m 0700 {name})",
                self.uid, self.uid, self.gid
            )));
        }
        Ok(fd)
    }

    /// A mount namespace whose root is a read-only tmpfs holding only the
    /// jail directory (at its own path) and a procfs of the VMM's own
    /// processes; optionally an empty network namespace.
    fn pivot(&self, dir: &OwnedFd) -> Result<(), JailError> {
        let mut flags = libc::CLONE_NEWNS;
        if self.netns {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare(2) with namespace flags only.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(step("unshare")(io::Error::last_os_error()));
        }
        // Nothing done here propagates back to the host.
        mount(None, "/", None, libc::MS_SLAVE | libc::MS_REC, None)
            .map_err(step("make / a slave mount"))?;
        // The directory as this namespace sees it (a bind mount's source
        // must be in the caller's namespace), checked to be the one checked.
        let dir = reopen_same(&self.dir, dir)?;
        // The new root: a tmpfs over the jail directory itself (the
        // directory is still reachable through `dir`).
        let root = self.dir.clone();
        mount(
            Some("tmpfs"),
            &root,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        )
        .map_err(step("mount the jail's root tmpfs"))?;
        let inner = root.join(self.dir.strip_prefix("/").unwrap_or(&self.dir));
        std::fs::create_dir_all(&inner).map_err(step("make the jail dir's path"))?;
        let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
        mount(Some(&source), &inner, None, libc::MS_BIND, None)
            .map_err(step("bind the jail dir"))?;
        let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(
            None,
            &inner,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | nosuid,
            None,
        )
        .map_err(step("remount the jail dir nosuid,nodev,noexec"))?;
        let proc = root.join("proc");
        std::fs::create_dir(&proc).map_err(step("make /proc"))?;
        mount(
            Some("proc"),
            &proc,
            Some("proc"),
            nosuid,
            Some("hidepid=invisible,subset=pid"),
        )
        .map_err(step("mount /proc"))?;
        std::env::set_current_dir(&root).map_err(step("chdir to the jail's root"))?;
        let dot = c".";
        // SAFETY: pivot_root(2) with two NUL-terminated paths.
        if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
            return Err(step("pivot_root")(io::Error::last_os_error()));
        }
        // The old root now sits on top of the new one: detach it.
        // SAFETY: umount2(2) of a NUL-terminated path.
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(step("detach the host's root")(io::Error::last_os_error()));
        }
        std::env::set_current_dir("/").map_err(step("chdir /"))?;
        mount(
            None,
            "/",
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
            None,
        )
        .map_err(step("make the jail's root read-only"))
    }

    /// The jail's uid and gid, no supplementary group, no capability.
    fn drop_privileges(&self) -> Result<(), JailError> {
        // While CAP_SETPCAP is still held.
        crate::caps::drop_bounding().map_err(step("drop the bounding set"))?;
        let (u, g) = (self.uid as libc::c_long, self.gid as libc::c_long);
        // Raw syscalls: the process has one thread, and libc's wrappers
        // would signal every thread to follow.
        // SAFETY: setgroups(2) with an empty list.
        if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
            return Err(step("setgroups")(io::Error::last_os_error()));
        }
        // SAFETY: setresgid(2) with integer arguments.
        if unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) } != 0 {
            return Err(step(format!("setresgid {g}"))(io::Error::last_os_error()));
        }
        // SAFETY: setresuid(2) with integer arguments.
        if unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) } != 0 {
            return Err(step(format!("setresuid {u}"))(io::Error::last_os_error()));
        }
        crate::caps::drop_all().map_err(step("drop capabilities"))
    }
}

/// The signal a process asked for when its parent dies (PR_SET_PDEATHSIG),
/// which a change of credentials clears, and the parent it was for.
struct ParentDeath {
    signal: libc::c_int,
    parent: libc::pid_t,
}

impl ParentDeath {
    fn get() -> Self {
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
        // SAFETY: getppid(2) has no preconditions.
        let parent = unsafe { libc::getppid() };
        ParentDeath { signal, parent }
    }

    /// Asks for the signal again; an error if the parent is gone already.
    fn rearm(&self) -> Result<(), JailError> {
        if self.signal == 0 {
            return Ok(());
        }
        // SAFETY: prctl(2) with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, self.signal) };
        // SAFETY: getppid(2) has no preconditions.
        if unsafe { libc::getppid() } != self.parent {
            return Err(JailError::Invalid(
                "the process that started the VMM is gone".into(),
            ));
        }
        Ok(())
    }
}

/// `path` opened again (`O_PATH`), if it is still the directory `was`.
fn reopen_same(path: &Path, was: &OwnedFd) -> Result<OwnedFd, JailError> {
    let name = path.display().to_string();
    let fd = open_path(path, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .map_err(step(format!("jail dir {name}")))?;
    let (a, b) = (fstat(was), fstat(&fd));
    match (a, b) {
        (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) => Ok(fd),
        (Err(e), _) | (_, Err(e)) => Err(step(format!("jail dir {name}"))(e)),
        _ => Err(JailError::Invalid(format!(
            "jail dir {name} was replaced while the VM was built"
        ))),
    }
}

/// An error unless the process is single-threaded: namespaces and
/// credentials are per thread, and a fork copies only the calling one.
fn require_single_thread(what: &str) -> Result<(), JailError> {
    let threads = single_threaded().map_err(step("count threads"))?;
    if threads != 1 {
        return Err(JailError::Invalid(format!(
            "the VMM must {what} single-threaded ({threads} threads)"
        )));
    }
    Ok(())
}

/// The process's thread count, given a moment to drop to 1: a thread
/// just joined may still be listed until the kernel has released it.
fn single_threaded() -> io::Result<usize> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let n = thread_count()?;
        if n == 1 || std::time::Instant::now() >= deadline {
            return Ok(n);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The process's thread count.
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Threads: line"))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit(2) reads the struct we pass.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mount(
    source: Option<&str>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let cstr = |s: Option<&str>| -> io::Result<Option<CString>> {
        s.map(|s| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL")))
            .transpose()
    };
    let (source, fstype, data) = (cstr(source)?, cstr(fstype)?, cstr(data)?);
    let target = c_path(target.as_ref())?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount(2) with NUL-terminated strings or nulls that outlive
    // the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let j: JailConfig = "dir=/run/j,uid=4242,gid=4243,netns,pidns,nofile=128,fsize=1048576,cgroup=/sys/fs/cgroup/husk/a"
            .parse()
            .unwrap();
        assert_eq!(j.dir, Path::new("/run/j"));
        assert_eq!((j.uid, j.gid, j.netns, j.nofile), (4242, 4243, true, 128));
        assert!(j.pidns);
        assert_eq!(j.fsize, Some(1 << 20));
        assert_eq!(j.cgroups, [Path::new("/sys/fs/cgroup/husk/a")]);
        let two: JailConfig =
            "dir=/j,uid=1,gid=1,cgroup=/sys/fs/cgroup/pids/a,cgroup=/sys/fs/cgroup/memory/a"
                .parse()
                .unwrap();
        assert_eq!(two.cgroups.len(), 2);
        let d: JailConfig = "dir=/run/j,uid=1,gid=2".parse().unwrap();
        assert_eq!(
            (d.netns, d.pidns, d.nofile, d.fsize),
            (false, false, DEFAULT_NOFILE, None)
        );
        assert!(d.cgroups.is_empty());
        for (spec, says) in [
            ("dir=/run/j,uid=1", "needs"),
            ("dir=/,uid=1,gid=1", "other than /"),
            ("dir=run/j,uid=1,gid=1", "absolute"),
            ("dir=/run/../etc,uid=1,gid=1", "without . or .."),
            ("dir=/run/j,uid=0,gid=1", "not be 0"),
            ("dir=/run/j,uid=1,gid=1,nofile=3", "too low"),
            ("dir=/run/j,uid=x,gid=1", "invalid jail uid"),
            ("dir=/run/j,uid=1,gid=1,cgroup=/etc", "under /sys/fs/cgroup"),
            ("dir=/run/j,uid=1,gid=1,cgroup", "under /sys/fs/cgroup"),
            (
                "dir=/run/j,uid=1,gid=1,cgroup=/sys/fs/cgroup",
                "under /sys/fs/cgroup",
            ),
            ("dir=/run/j,uid=1,gid=1,netns=yes", "invalid jail option"),
            ("dir=/run/j,uid=1,gid=1,chroot=/x", "invalid jail option"),
        ] {
            let e = spec.parse::<JailConfig>().unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn kept_paths_must_be_inside() {
        let j: JailConfig = "dir=/run/j,uid=1,gid=1".parse().unwrap();
        assert!(j.check_inside("x", Path::new("/run/j/v.sock")).is_ok());
        assert!(j.check_inside("x", Path::new("/run/j/a/b")).is_ok());
        for p in [
            "/run/j",
            "/run/jx/v.sock",
            "/run/j/../k",
            "v.sock",
            "/tmp/v",
        ] {
            let e = j
                .check_inside("the vsock socket", Path::new(p))
                .unwrap_err();
            assert!(e.contains("must be inside the jail dir /run/j"), "{p}: {e}");
        }
    }

    #[test]
    fn a_process_with_threads_is_refused() {
        let j: JailConfig = "dir=/run/husk-no-such-jail,uid=1,gid=1".parse().unwrap();
        // The test harness runs this on a thread of its own.
        let e = j.enter(&[]).unwrap_err().to_string();
        assert!(e.contains("single-threaded"), "{e}");
    }
}
