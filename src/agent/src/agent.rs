//! The agent's request handlers and container bookkeeping.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use husk_proto::{
    ErrorBody, ErrorCode, Exec, ExitStatus, ProcessInfo, ProcessRef, Request, ResizeTty, Response,
    Signal, Timestamps,
};

use crate::container::caps::kernel_last_cap;
use crate::container::cgroup::{Cgroup, CgroupSystem};
use crate::container::child::SpawnKind;
use crate::container::plan::{exit_code_from_wait, plan_process, PlanError};
use crate::log;
use crate::marks;
use crate::reaper::ProcessTable;
use crate::state::{Container, CreateEnds, InFlight, Proc};
use crate::sys;

mod create;

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where per-container mount points are created (on a tmpfs).
    pub staging_dir: PathBuf,
    /// Reboot the guest once a container's init exited and its status was
    /// delivered (PID 1 mode).
    pub reboot_on_exit: bool,
    /// How long `Wait` (and the reboot) waits for output streams to drain.
    pub drain_timeout: Duration,
    /// How long the reboot after a container's exit waits for the host to
    /// close its control connections (the host stops the VM itself once it
    /// has read the exit status; rebooting earlier could lose the status
    /// while it is still in the guest's vsock queues).
    pub host_grace: Duration,
    /// Manage cgroups (off when none is mounted).
    pub cgroups: bool,
    /// glibc tunables added to every container process's environment (see
    /// `ProcessPlan::add_glibc_tunables`): what the guest kernel's
    /// command line gave the agent as `GLIBC_TUNABLES` (husk sets it on
    /// kvm_pvm hosts).
    pub glibc_tunables: Option<String>,
    /// Make one container cgroup ahead, before the agent is ready (so in a
    /// warm template), for the first create to take: making a cgroup (its
    /// controllers' state, a directory of files) is slow where guest kernel
    /// code is emulated. Its name is not the container's, which no one
    /// sees but the agent. The guest's agent only: nothing removes a spare
    /// no create took.
    pub spare_cgroup: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            staging_dir: PathBuf::from("/run/husk"),
            reboot_on_exit: false,
            drain_timeout: Duration::from_secs(5),
            host_grace: Duration::from_secs(30),
            cgroups: true,
            glibc_tunables: None,
            spare_cgroup: false,
        }
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
    }
}

fn plan_err(e: PlanError) -> ErrorBody {
    match e {
        PlanError::Invalid(_) => err(ErrorCode::InvalidRequest, e.to_string()),
        PlanError::Unsupported(_) => err(ErrorCode::Unsupported, e.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent: containers and the handlers of every request.
pub struct Agent {
    cfg: AgentConfig,
    table: Arc<ProcessTable>,
    cgroups: Option<CgroupSystem>,
    /// See [`AgentConfig::spare_cgroup`].
    spare_cgroup: Mutex<Option<Cgroup>>,
    cap_last_cap: u32,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    /// Create requests that ended, for streams waiting on their container.
    creates: CreateEnds,
    /// Open control connections from the host.
    hosts: InFlight,
    started_ns: u64,
    ready_ns: AtomicU64,
    on_shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Agent {
    /// An agent that started at `started_ns` (CLOCK_BOOTTIME); `on_shutdown`
    /// runs after `Shutdown` killed everything (PID 1: reboot).
    pub fn new(
        cfg: AgentConfig,
        table: Arc<ProcessTable>,
        started_ns: u64,
        on_shutdown: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Self> {
        let cgroups = if cfg.cgroups {
            CgroupSystem::detect()
        } else {
            None
        };
        if let Some(Err(e)) = cgroups.as_ref().map(CgroupSystem::prepare) {
            log!("cgroups: {e}");
        }
        let spare_cgroup = match cgroups.as_ref().filter(|_| cfg.spare_cgroup) {
            Some(system) => system.spare().map_err(|e| log!("cgroups: {e}")).ok(),
            None => None,
        };
        Arc::new(Agent {
            cfg,
            table,
            cgroups,
            spare_cgroup: Mutex::new(spare_cgroup),
            cap_last_cap: kernel_last_cap(),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            creates: CreateEnds::default(),
            hosts: InFlight::default(),
            started_ns,
            ready_ns: AtomicU64::new(started_ns),
            on_shutdown,
        })
    }

    /// Counts a control connection as open until the guard drops.
    pub fn host_attached(self: &Arc<Self>) -> HostGuard {
        self.hosts.begin();
        HostGuard(Arc::clone(self))
    }

    /// Records the moment the agent listens.
    pub fn set_ready(&self) {
        self.ready_ns.store(sys::boottime_ns(), Ordering::Relaxed);
    }

    fn base_timestamps(&self) -> Timestamps {
        Timestamps {
            agent_started_ns: self.started_ns,
            agent_ready_ns: self.ready_ns.load(Ordering::Relaxed),
            ..Timestamps::default()
        }
    }

    /// Handles every request except `Wait` and `Shutdown`, which the
    /// connection handles itself (see `server.rs`).
    pub fn handle(self: &Arc<Self>, req: Request) -> Result<Response, ErrorBody> {
        match req {
            Request::CreateContainer(c) => self.create(c).map(Response::Created),
            Request::Start(r) => self.start(&r.container_id).map(Response::Started),
            Request::Exec(e) => self.exec(e).map(Response::ExecStarted),
            Request::Signal(s) => self.signal(&s).map(|()| Response::Signaled),
            Request::ResizeTty(r) => self.resize(&r).map(|()| Response::TtyResized),
            Request::Stats(r) => self.stats(&r.container_id).map(Response::Stats),
            Request::Wait(r) => self.wait(&r).map(|(_, s)| Response::Exited(s)),
            Request::UpdateResources(u) => self.update(&u).map(|()| Response::ResourcesUpdated),
            Request::ConfigureNetwork(n) => crate::net::configure(&n)
                .map(|()| Response::NetworkConfigured)
                .map_err(|e| err(ErrorCode::SetupFailed, format!("network: {e}"))),
            Request::Shutdown => Ok(Response::ShuttingDown),
            Request::Refresh(r) => refresh(&r).map(|()| Response::Refreshed),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ErrorBody> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no container {id:?}")))
    }

    /// The process a request names.
    pub fn find_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Result<Arc<Proc>, ErrorBody> {
        let c = self.container(container_id)?;
        c.process(exec_id).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!(
                    "no exec {:?} in container {container_id:?}",
                    exec_id.unwrap_or_default()
                ),
            )
        })
    }

    /// [`Self::find_process`] for a stream the host opened, maybe while the
    /// container is still being created (to save the round trips after
    /// the create): an init process's stream waits up to `wait` for its
    /// container, and is answered as soon as a create of it has ended.
    pub fn find_stream_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        wait: Duration,
    ) -> Result<Arc<Proc>, ErrorBody> {
        if exec_id.is_some() || wait.is_zero() {
            return self.find_process(container_id, exec_id);
        }
        self.creates
            .wait_for(container_id, wait, || self.find_process(container_id, None))
    }

    /// A thread that records the process's exit (and, for a container's
    /// init, cleans up and possibly ends the VM).
    pub(super) fn watch(
        self: &Arc<Self>,
        container: Arc<Container>,
        proc: Arc<Proc>,
        is_init: bool,
    ) {
        let agent = Arc::clone(self);
        let spawned = thread::Builder::new().name("watch".into()).spawn(move || {
            let status = agent.table.wait(proc.pid);
            let exited_ns = sys::boottime_ns();
            let (exit_code, signal) = exit_code_from_wait(status);
            let oom_killed = container
                .cgroup
                .as_ref()
                .is_some_and(|cg| cg.oom_kills() > container.oom_baseline);
            let status = ExitStatus {
                exit_code,
                signal,
                oom_killed,
                output_drained: false,
                timestamps: Timestamps::default(),
            };
            if !is_init {
                proc.set_exit(status, exited_ns);
                return;
            }
            // Without a pid namespace the kernel does not kill the rest.
            for p in container.exec_procs() {
                if p.exit_status().is_none() {
                    let _ = sys::kill(p.pid, libc::SIGKILL);
                }
            }
            // When the VM ends with the container, tearing down its
            // mounts and cgroup serves no one: report at once. Otherwise
            // clean up first, so that whoever waited finds nothing left
            // behind (the mounts go when the namespace is let go).
            if !agent.cfg.reboot_on_exit {
                drop(lock(&container.mount_ns).take());
                if let Some(cg) = &container.cgroup {
                    cg.remove();
                }
                let _ = fs::remove_dir(agent.cfg.staging_dir.join(&container.id));
                let _ = fs::remove_dir_all(Path::new(husk_proto::FILES_DIR).join(&container.id));
            }
            proc.set_exit(status, exited_ns);
            if agent.cfg.reboot_on_exit {
                proc.wait_delivered();
                proc.relays.wait_idle(agent.cfg.drain_timeout);
                if !agent.hosts.wait_idle(agent.cfg.host_grace) {
                    log!("the host kept its control connection open; rebooting anyway");
                }
                log!(
                    "container {} exited with {exit_code}; rebooting",
                    container.id
                );
                agent.power_off();
            }
        });
        if let Err(e) = spawned {
            log!("cannot start a watcher thread: {e}");
        }
    }

    fn start(&self, id: &str) -> Result<ProcessInfo, ErrorBody> {
        let c = self.container(id)?;
        let spawned = c.take_pending().ok_or_else(|| {
            err(
                ErrorCode::InvalidState,
                format!("container {id:?} was already started"),
            )
        })?;
        spawned
            .start(true)
            .map_err(|e| err(ErrorCode::SetupFailed, e.to_string()))?;
        c.init.set_exec_time(sys::boottime_ns());
        Ok(ProcessInfo {
            pid: c.init.pid,
            timestamps: c.init.timestamps(),
            setup: Vec::new(),
        })
    }

    fn exec(self: &Arc<Self>, req: Exec) -> Result<ProcessInfo, ErrorBody> {
        let c = self.container(&req.container_id)?;
        check_id(&req.exec_id)?;
        if c.has_exec(&req.exec_id) {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("exec {:?} exists", req.exec_id),
            ));
        }
        if c.init.exit_status().is_some() || lock(&c.pending_start).is_some() {
            return Err(err(
                ErrorCode::InvalidState,
                format!("container {:?} is not running", c.id),
            ));
        }
        marks::start();
        let mut plan = plan_process(&req.process, self.cap_last_cap).map_err(plan_err)?;
        self.add_platform_env(&mut plan);
        // runc applies the container's profile to exec'd processes too.
        plan.seccomp = c.seccomp.clone();
        let mut namespaces = Vec::new();
        for (name, flag) in [
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("net", libc::CLONE_NEWNET),
            ("pid", libc::CLONE_NEWPID),
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("mnt", libc::CLONE_NEWNS),
        ] {
            if c.clone_flags & flag != 0 {
                let path = PathBuf::from(format!("/proc/{}/ns/{name}", c.init.pid));
                let fd = sys::open_ro(&path).map_err(|e| {
                    err(
                        ErrorCode::InvalidState,
                        format!("container {:?}: {}: {e}", c.id, path.display()),
                    )
                })?;
                namespaces.push((fd, flag));
            }
        }
        let kind = SpawnKind::Exec { namespaces };
        marks::mark("plan and namespaces");
        let (proc, mut spawned) = self.spawn_proc(kind, &plan, req.stdin, c.cgroup.as_ref())?;
        let setup = std::mem::take(&mut spawned.setup);
        if !c.insert_exec(&req.exec_id, Arc::clone(&proc)) {
            let _ = sys::kill(proc.pid, libc::SIGKILL);
            self.table.wait(proc.pid);
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("exec {:?} exists", req.exec_id),
            ));
        }
        self.watch(Arc::clone(&c), Arc::clone(&proc), false);
        spawned
            .start(false)
            .map_err(|e| err(ErrorCode::SetupFailed, e.to_string()))?;
        proc.set_exec_time(sys::boottime_ns());
        Ok(ProcessInfo {
            pid: proc.pid,
            timestamps: proc.timestamps(),
            setup,
        })
    }

    fn signal(&self, s: &Signal) -> Result<(), ErrorBody> {
        if !(1..=64).contains(&s.signal) {
            return Err(err(
                ErrorCode::InvalidRequest,
                format!("bad signal number {}", s.signal),
            ));
        }
        let proc = self.find_process(&s.container_id, s.exec_id.as_deref())?;
        if proc.exit_status().is_some() {
            return Err(err(ErrorCode::InvalidState, "the process has exited"));
        }
        sys::kill(proc.pid, s.signal)
            .map_err(|e| err(ErrorCode::InvalidState, format!("kill: {e}")))
    }

    /// Blocks until the process exited and its attached output drained.
    pub fn wait(&self, r: &ProcessRef) -> Result<(Arc<Proc>, ExitStatus), ErrorBody> {
        let proc = self.find_process(&r.container_id, r.exec_id.as_deref())?;
        let mut status = proc.wait_exit();
        status.output_drained = proc.relays.wait_idle(self.cfg.drain_timeout);
        proc.close_unattached();
        Ok((proc, status))
    }

    fn resize(&self, r: &ResizeTty) -> Result<(), ErrorBody> {
        let proc = self.find_process(&r.container_id, r.exec_id.as_deref())?;
        let master = proc
            .pty_control
            .as_ref()
            .ok_or_else(|| err(ErrorCode::InvalidState, "the process has no terminal"))?;
        sys::set_winsize(master.as_raw_fd(), r.rows, r.cols)
            .map_err(|e| err(ErrorCode::Internal, format!("resize: {e}")))
    }

    fn update(&self, u: &husk_proto::UpdateResources) -> Result<(), ErrorBody> {
        let c = self.container(&u.container_id)?;
        let Some(cg) = &c.cgroup else {
            return Err(err(
                ErrorCode::Unsupported,
                "the guest has no cgroups to apply limits with",
            ));
        };
        cg.apply(&u.resources)
            .map_err(|e| err(ErrorCode::SetupFailed, e.to_string()))
    }

    fn stats(&self, id: &str) -> Result<husk_proto::Stats, ErrorBody> {
        let c = self.container(id)?;
        if c.init.exit_status().is_some() {
            return Err(err(
                ErrorCode::InvalidState,
                format!("container {id:?} has exited"),
            ));
        }
        c.cgroup
            .as_ref()
            .map(Cgroup::stats)
            .ok_or_else(|| err(ErrorCode::Unsupported, "no cgroup hierarchy in the guest"))
    }

    /// Kills every container process (after `Shutdown` was answered), then
    /// runs the shutdown hook.
    pub fn shutdown(&self) {
        let containers: Vec<_> = lock(&self.containers).values().cloned().collect();
        for c in &containers {
            for p in c.exec_procs().iter().chain(Some(&c.init)) {
                if p.exit_status().is_none() {
                    let _ = sys::kill(p.pid, libc::SIGKILL);
                }
            }
        }
        for c in &containers {
            // A never-started init dies with its channel.
            drop(c.take_pending());
            c.init.wait_exit();
        }
        (self.on_shutdown)();
    }

    fn power_off(&self) {
        sys::sync();
        let e = sys::reboot();
        log!("reboot failed: {e}");
    }

    /// The shutdown hook for PID 1: sync and reboot.
    pub fn reboot_hook() -> Box<dyn Fn() + Send + Sync> {
        Box::new(|| {
            sys::sync();
            let e = sys::reboot();
            log!("reboot failed: {e}");
        })
    }
}

/// A host control connection, counted while it is open.
pub struct HostGuard(Arc<Agent>);

impl Drop for HostGuard {
    fn drop(&mut self) {
        self.0.hosts.end();
    }
}

/// Reseeds the RNG and sets the wall clock (a VM restored from a template).
fn refresh(r: &husk_proto::Refresh) -> Result<(), ErrorBody> {
    if r.entropy.len() > husk_proto::MAX_ENTROPY {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("at most {} bytes of entropy", husk_proto::MAX_ENTROPY),
        ));
    }
    sys::add_entropy(&r.entropy)
        .map_err(|e| err(ErrorCode::Internal, format!("reseeding the RNG: {e}")))?;
    sys::set_realtime(r.realtime_ns)
        .map_err(|e| err(ErrorCode::InvalidRequest, format!("setting the clock: {e}")))
}

/// Ids become path components and cgroup names.
fn check_id(id: &str) -> Result<(), ErrorBody> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorCode::InvalidRequest,
            format!("bad id {id:?}: use 1-128 of [A-Za-z0-9_.-], not starting with '.'"),
        ))
    }
}
