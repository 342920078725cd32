//! Starting a container process: fork an intermediate child that creates
//! (or joins) the namespaces and forks the real process, which becomes PID
//! 1 of a new pid namespace, sets itself up and waits for `start`.
//!
//! Parent and children talk over a close-on-exec SOCK_SEQPACKET pair:
//!
//! ```text
//! agent                 intermediate              process
//!   -- GO -------------->  unshare / setns
//!                          fork ------------------->
//!   <- PID(n) -----------  _exit(0)
//!   -- GO ----------------------------------------->  mounts, pivot_root, user...
//!   <- READY [pty master] --------------------------
//!   (init: join the device cgroup, see Cgroup::join_all_but_devices)
//!   -- START (init only) -------------------------->  execve
//!   <- end of stream (the socket closed on exec) ----
//! ```
//!
//! A failure on the way comes back as `ERROR(message)`. The children only
//! make system calls and small allocations (glibc's fork keeps malloc
//! usable); they never touch the agent's locks.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use husk_proto::{Rootfs, Scratch};

use super::caps;
use super::cgroup::{Cgroup, CgroupError};
use super::mounts::{self, secure_join, MountError};
use super::plan::{exec_failure, ContainerPlan, ProcessPlan};
use crate::marks;
use crate::reaper::ProcessTable;
use crate::sys::{self, Fork};

mod init;

const MSG_GO: u8 = b'G';
const MSG_START: u8 = b'S';
const MSG_PID: u8 = b'P';
const MSG_READY: u8 = b'R';
const MSG_ERROR: u8 = b'E';

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A system call in the agent failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The container's cgroup could not be joined.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The child reported a setup failure.
    #[error("{0}")]
    Child(String),
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> SpawnError {
    move |source| SpawnError::Sys { what, source }
}

/// The control channel to a child.
pub struct Channel(OwnedFd);

/// One channel message: tag, payload, passed descriptor.
type Message = (u8, Vec<u8>, Option<OwnedFd>);

/// The largest message; a longer payload is cut (an error message).
const MSG_MAX: usize = 4096;

impl Channel {
    /// Sends from a buffer on the stack: a container's init shares the
    /// agent's heap (see `vfork.rs`), and may be killed right after it
    /// sent something, so it must not be inside `malloc`/`free` then.
    fn send(&self, tag: u8, payload: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let mut msg = [0u8; MSG_MAX];
        let n = payload.len().min(MSG_MAX - 1);
        msg[0] = tag;
        msg[1..=n].copy_from_slice(&payload[..n]);
        sys::send_msg(self.0.as_raw_fd(), &msg[..=n], fd)
    }

    /// One message, or `None` once every child end is closed.
    fn recv(&self) -> io::Result<Option<Message>> {
        let mut buf = vec![0u8; MSG_MAX];
        let (n, fd) = sys::recv_msg(self.0.as_raw_fd(), &mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        let tag = buf.remove(0);
        Ok(Some((tag, buf, fd)))
    }

    /// Parent side: the pid a child reports with MSG_PID.
    fn expect_pid(&self, stage: &str) -> Result<libc::pid_t, SpawnError> {
        let (payload, _) = self.expect(MSG_PID, stage)?;
        payload
            .get(..4)
            .map(|b| libc::pid_t::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .filter(|&p| p > 0)
            .ok_or_else(|| SpawnError::Child("bad pid message".into()))
    }

    /// Parent side: waits for `expected`, turning ERROR and end of stream
    /// into errors.
    fn expect(&self, expected: u8, stage: &str) -> Result<(Vec<u8>, Option<OwnedFd>), SpawnError> {
        match self.recv().map_err(sys_err("read from child"))? {
            Some((tag, payload, fd)) if tag == expected => Ok((payload, fd)),
            Some((MSG_ERROR, msg, _)) => Err(SpawnError::Child(
                String::from_utf8_lossy(&msg).into_owned(),
            )),
            Some((tag, _, _)) => Err(SpawnError::Child(format!(
                "unexpected message {tag} {stage}"
            ))),
            None => Err(SpawnError::Child(format!("the child exited {stage}"))),
        }
    }

    /// Child side: reports `msg` and exits.
    fn fail(&self, msg: &str) -> ! {
        let _ = self.send(MSG_ERROR, msg.as_bytes(), None);
        sys::exit_now(1)
    }

    /// Child side: waits for `tag` from the parent; exits if the parent
    /// went away or sent something else. Allocates nothing (see `send`):
    /// the agent kills a container's init that waits here to delete it.
    fn wait_for(&self, tag: u8) {
        let mut buf = [0u8; 16];
        match sys::recv_msg(self.0.as_raw_fd(), &mut buf) {
            Ok((n, None)) if n > 0 && buf[0] == tag => {}
            _ => sys::exit_now(1),
        }
    }
}

/// What kind of process to start.
pub enum SpawnKind<'a> {
    /// A new container's init: new namespaces, root filesystem, mounts.
    Init {
        /// The container plan.
        plan: &'a ContainerPlan,
        /// Directory for the container's mounts (on the agent's tmpfs).
        staging: &'a Path,
        /// Root filesystem device.
        rootfs: &'a Rootfs,
        /// Scratch space.
        scratch: &'a Scratch,
    },
    /// An extra process in an existing container: namespaces to join, in
    /// order (mount last).
    Exec {
        /// (`/proc/<pid>/ns/<name>` descriptor, CLONE_NEW* type).
        namespaces: Vec<(OwnedFd, libc::c_int)>,
    },
}

/// Everything a spawn needs.
pub struct SpawnConfig<'a> {
    /// Init or exec.
    pub kind: SpawnKind<'a>,
    /// The process.
    pub process: &'a ProcessPlan,
    /// Descriptors for the process's stdin, stdout, stderr (ignored with a
    /// terminal).
    pub stdio: [RawFd; 3],
    /// The container's cgroup.
    pub cgroup: Option<&'a Cgroup>,
}

/// A process set up and ready to exec.
pub struct Spawned {
    /// Its pid (the agent's pid namespace). Tracked by the process table.
    pub pid: libc::pid_t,
    /// The pty master when the process has a terminal.
    pub pty_master: Option<OwnedFd>,
    /// Its setup steps, the agent's included (the child's list).
    pub setup: Vec<husk_proto::SetupStep>,
    chan: Channel,
}

impl Spawned {
    /// Lets the process exec (`START` for a container's init) and waits
    /// until it did: the channel closes on a successful exec, and also when
    /// exec failed and the child exited 126/127.
    pub fn start(self, send_start: bool) -> Result<(), SpawnError> {
        if send_start {
            self.chan
                .send(MSG_START, &[], None)
                .map_err(sys_err("signal the container to start"))?;
        }
        match self.chan.recv().map_err(sys_err("read from child"))? {
            None => Ok(()),
            Some((MSG_ERROR, msg, _)) => Err(SpawnError::Child(
                String::from_utf8_lossy(&msg).into_owned(),
            )),
            Some((tag, _, _)) => Err(SpawnError::Child(format!(
                "unexpected message {tag} at exec"
            ))),
        }
    }
}

/// Forks and sets up a process up to its exec. On error nothing is left
/// running.
pub fn spawn(table: &ProcessTable, cfg: &SpawnConfig) -> Result<Spawned, SpawnError> {
    marks::mark("staging and stdio");
    let (parent_end, child_end) = sys::seqpacket_pair().map_err(sys_err("socketpair"))?;
    let chan = Channel(parent_end);
    if let SpawnKind::Init {
        plan,
        staging,
        rootfs,
        scratch,
    } = &cfg.kind
    {
        return init::spawn(
            table,
            cfg,
            plan,
            staging,
            rootfs,
            scratch,
            chan,
            Channel(child_end),
        );
    }
    // SAFETY: the child branch runs `intermediate`, which only makes
    // system calls and small allocations and leaves through `_exit`.
    let fork = unsafe { table.fork_tracked() }.map_err(sys_err("fork"))?;
    let middle = match fork {
        Fork::Child => {
            drop(chan);
            intermediate(cfg, Channel(child_end))
        }
        Fork::Parent(pid) => pid,
    };
    drop(child_end);
    let result = spawn_parent(table, cfg, chan, middle);
    if result.is_err() {
        let _ = sys::kill(middle, libc::SIGKILL);
        table.wait(middle);
    }
    result
}

/// The container process once it reported READY (its setup steps and pty
/// master); killed and reaped if its setup failed.
fn spawned(
    table: &ProcessTable,
    pid: libc::pid_t,
    chan: Channel,
    ready: Result<(Vec<u8>, Option<OwnedFd>), SpawnError>,
) -> Result<Spawned, SpawnError> {
    match ready {
        Ok((steps, pty_master)) => Ok(Spawned {
            pid,
            pty_master,
            setup: marks::decode(&steps),
            chan,
        }),
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            table.wait(pid);
            Err(e)
        }
    }
}

fn spawn_parent(
    table: &ProcessTable,
    cfg: &SpawnConfig,
    chan: Channel,
    middle: libc::pid_t,
) -> Result<Spawned, SpawnError> {
    if let Some(cg) = cfg.cgroup {
        cg.join(middle)?;
    }
    chan.send(MSG_GO, &[], None)
        .map_err(sys_err("signal the child"))?;
    let pid = chan.expect_pid("before forking the container process")?;
    // The intermediate has exited (or is exiting); once reaped, `pid` is
    // ours (PID 1 or subreaper).
    table.wait(middle);
    table.track(pid);
    let ready = chan
        .send(MSG_GO, &[], None)
        .map_err(sys_err("signal the container process"))
        .and_then(|()| chan.expect(MSG_READY, "during setup"));
    spawned(table, pid, chan, ready)
}

/// The intermediate child of an exec: join the namespaces (a pid
/// namespace is entered by the children of who joined it), then fork the
/// real process.
fn intermediate(cfg: &SpawnConfig, chan: Channel) -> ! {
    let mut keep = vec![chan.0.as_raw_fd()];
    keep.extend_from_slice(&cfg.stdio);
    if let SpawnKind::Exec { namespaces } = &cfg.kind {
        keep.extend(namespaces.iter().map(|(fd, _)| fd.as_raw_fd()));
    }
    marks::mark("fork");
    sys::close_fds_except(&keep);
    sys::reset_signals();
    chan.wait_for(MSG_GO);
    marks::mark("cgroup join");
    if let SpawnKind::Exec { namespaces } = &cfg.kind {
        for (fd, nstype) in namespaces {
            if let Err(e) = sys::setns(fd, *nstype) {
                chan.fail(&format!("join namespace {nstype:#x}: {e}"));
            }
        }
    }
    // SAFETY: single-threaded child; the grandchild only execs or _exits.
    match unsafe { sys::fork() } {
        Err(e) => chan.fail(&format!("fork: {e}")),
        Ok(Fork::Child) => {
            marks::mark("namespaces, fork");
            container_process(cfg, &chan, "reparent", 0)
        }
        Ok(Fork::Parent(pid)) => {
            if chan.send(MSG_PID, &pid.to_le_bytes(), None).is_err() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            sys::exit_now(0)
        }
    }
}

/// The container process: waits for GO (marked as `go`), enters the
/// `late` namespaces, sets up, reports ready, waits for start, execs.
fn container_process(cfg: &SpawnConfig, chan: &Channel, go: &'static str, late: i32) -> ! {
    chan.wait_for(MSG_GO);
    marks::mark(go);
    if late != 0 {
        if let Err(e) = sys::unshare(late) {
            chan.fail(&format!("unshare namespaces: {e}"));
        }
    }
    let master = match setup(cfg) {
        Ok(master) => master,
        Err(msg) => chan.fail(&msg),
    };
    marks::mark("process");
    // Everything the exec needs is made now: from READY on the agent may
    // kill this process (see `Channel::send`).
    let exec_args = sys::ExecArgs::new(&cfg.process.args, &cfg.process.env);
    // Commands not there are dropped now, by a lookup each (runc too looks
    // the command up before it waits for start): an execve that fails
    // still builds the new image's memory and copies the arguments before
    // it opens the file (Linux before 6.8), milliseconds per $PATH entry
    // where guest kernel code is emulated.
    let candidates: Vec<&CStr> = cfg
        .process
        .exec_candidates
        .iter()
        .map(CString::as_c_str)
        .filter(|c| !sys::is_missing(c))
        .collect();
    let steps = marks::encode();
    let master_fd = master.as_ref().map(|m| m.as_raw_fd());
    if chan.send(MSG_READY, &steps, master_fd).is_err() {
        sys::exit_now(1);
    }
    drop(master);
    if matches!(cfg.kind, SpawnKind::Init { .. }) {
        chan.wait_for(MSG_START);
    }
    exec(cfg.process, &candidates, &exec_args)
}

fn step<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Everything between fork and exec; returns the pty master, if any.
fn setup(cfg: &SpawnConfig) -> Result<Option<OwnedFd>, String> {
    let p = cfg.process;
    step(sys::setsid(), "setsid")?;
    let mut pty = None;
    if let SpawnKind::Init {
        plan,
        staging,
        rootfs,
        scratch,
    } = &cfg.kind
    {
        let root = Path::new("/");
        let private = libc::MS_REC | libc::MS_PRIVATE;
        step(
            sys::mount(None, root, None, private, None),
            "make / private",
        )?;
        let root = mounts::mount_rootfs(staging, rootfs, scratch).map_err(|e| e.to_string())?;
        marks::mark("rootfs");
        let cgroup_dirs = cfg.cgroup.map(Cgroup::dirs).unwrap_or_default();
        mount_err(mounts::mount_all(&root, plan, &cgroup_dirs))?;
        marks::mark("mounts");
        let cwd = step(secure_join(&root, &p.cwd), "resolve cwd")?;
        step(fs::create_dir_all(&cwd), "create cwd")?;
        mount_err(mounts::setup_dev(&root, plan))?;
        marks::mark("devices");
        if p.terminal {
            let (master, slave) = step(sys::open_pty(&root.join("dev/pts/ptmx")), "open pty")?;
            mount_err(mounts::bind_console(&root, slave.as_raw_fd()))?;
            pty = Some((master, slave));
        }
        mount_err(mounts::enter_root(&root))?;
        marks::mark("pivot_root");
        // Before finish_root makes /proc/sys read-only, as runc does.
        for (key, value) in &plan.sysctls {
            let path = Path::new("/proc/sys").join(key);
            step(
                fs::write(&path, value),
                &format!("sysctl {}", key.display()),
            )?;
        }
        marks::mark("sysctls");
        mount_err(mounts::finish_root(plan))?;
        marks::mark("masked and read-only paths");
        if let Some(h) = &plan.hostname {
            step(sys::sethostname(h), "sethostname")?;
        }
        if let Some(d) = &plan.domainname {
            step(sys::setdomainname(d), "setdomainname")?;
        }
    } else if p.terminal {
        pty = Some(step(sys::open_pty(Path::new("/dev/pts/ptmx")), "open pty")?);
    }

    match &pty {
        Some((_, slave)) => {
            for fd in 0..3 {
                step(sys::dup2(slave.as_raw_fd(), fd), "dup2 tty")?;
            }
            step(sys::set_controlling_tty(0), "set controlling tty")?;
            if let Some((rows, cols)) = p.console_size {
                step(sys::set_winsize(0, rows, cols), "set tty size")?;
            }
        }
        None => {
            for (target, &fd) in cfg.stdio.iter().enumerate() {
                step(sys::dup2(fd, target as RawFd), "dup2 stdio")?;
            }
        }
    }
    step(sys::cloexec_from(3), "close descriptors")?;
    setup_process(p)?;
    Ok(pty.map(|(master, _)| master))
}

fn mount_err(r: Result<(), MountError>) -> Result<(), String> {
    r.map_err(|e| e.to_string())
}

/// rlimits, stdio ownership, user, capabilities, cwd, no_new_privs.
fn setup_process(p: &ProcessPlan) -> Result<(), String> {
    for &(resource, soft, hard) in &p.rlimits {
        step(sys::setrlimit(resource, soft, hard), "setrlimit")?;
    }
    if let Some(adj) = p.oom_score_adj {
        step(
            fs::write("/proc/self/oom_score_adj", adj.to_string()),
            "oom_score_adj",
        )?;
    }
    // Pipes and the tty belong to the process's user, so that it can reopen
    // /dev/stdout and friends; /dev/null and other files are left alone.
    for fd in 0..3 {
        if owned_by_process(fd) {
            step(sys::fchown(fd, p.uid, p.gid), "chown stdio")?;
        }
    }
    // Without no_new_privs installing a filter needs CAP_SYS_ADMIN: before
    // the capabilities go (what follows must be allowed by the profile, as
    // with runc); with it, after no_new_privs is set, the last thing before
    // the process reports ready.
    if let (Some(s), false) = (&p.seccomp, p.no_new_privs) {
        step(s.install(), "install seccomp filter")?;
    }
    if let Some(c) = &p.caps {
        step(caps::drop_bounding(c), "drop bounding capabilities")?;
        step(sys::set_keepcaps(true), "keep capabilities")?;
    }
    step(sys::setgroups(&p.additional_gids), "setgroups")?;
    step(sys::setgid_all(p.gid), "setgid")?;
    step(sys::setuid_all(p.uid), "setuid")?;
    if let Some(c) = &p.caps {
        step(sys::set_keepcaps(false), "keep capabilities")?;
        step(caps::apply(c), "set capabilities")?;
    }
    if let Some(mask) = p.umask {
        sys::umask(mask);
    }
    step(
        std::env::set_current_dir(&p.cwd),
        &format!("chdir to {}", p.cwd.display()),
    )?;
    if p.no_new_privs {
        step(sys::set_no_new_privs(), "no_new_privs")?;
        if let Some(s) = &p.seccomp {
            step(s.install(), "install seccomp filter")?;
        }
    }
    Ok(())
}

fn owned_by_process(fd: RawFd) -> bool {
    sys::isatty(fd) || sys::is_fifo(fd)
}

/// `execvp` by hand over the precomputed candidates; on failure writes the
/// reason to the process's stderr and exits 127 or 126.
fn exec(p: &ProcessPlan, candidates: &[&CStr], args: &sys::ExecArgs) -> ! {
    let mut errno = libc::ENOENT;
    let mut saw_eacces = false;
    for candidate in candidates {
        let e = sys::execve(candidate, args);
        match e.raw_os_error().unwrap_or(libc::ENOENT) {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => saw_eacces = true,
            other => {
                errno = other;
                break;
            }
        }
    }
    if errno == libc::ENOENT && saw_eacces {
        errno = libc::EACCES;
    }
    let (code, msg) = exec_failure(&p.arg0, p.arg0_is_path, errno);
    sys::write_all_fd(2, format!("{msg}\n").as_bytes());
    sys::exit_now(code)
}
