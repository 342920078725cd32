//! `husk run`: one container in a fresh micro-VM, docker-run style: stdio
//! relayed, signals forwarded, the container's exit status returned.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_proto::{
    Client, CreateContainer, ExitStatus, GuestFile, ProcessRef, ResizeTty, Rootfs, Scratch,
};

use crate::clock::GuestClock;
use crate::net::HostNetwork;
use crate::relay::{
    self, attach_stdio, forward_signals, terminal_size, watch_winsize, Opening, Relays,
};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::shares::{self, ShareSet, Volume};
use crate::spec::{self, RunSpec};
use crate::{paths, RuntimeError};
use husk_vmm::seccomp::SeccompMode;

/// Container id inside the sandbox.
pub const CONTAINER_ID: &str = "run";
/// Signals `husk run` forwards to the container.
pub(crate) const FORWARDED: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
/// How long output may still come after the agent said a background
/// process holds it open.
pub(crate) const UNDRAINED_GRACE: Duration = Duration::from_secs(1);

/// The container's root filesystem.
#[derive(Debug, Clone)]
pub enum Root {
    /// A directory, turned into a cached read-only ext4 image.
    Dir(PathBuf),
    /// A read-only ext4 disk already built (an OCI image's, from the store).
    Disk(PathBuf),
    /// A directory shared live through virtio-fs: the container writes
    /// into it (as under runc).
    Share(PathBuf),
}

/// The container's root as the VM gets it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestRoot {
    /// A read-only ext4 disk (`/dev/vdb`) under an overlay whose upper
    /// layer is guest memory.
    Disk(PathBuf),
    /// A directory shared through virtio-fs (one of the session's shares),
    /// given as its guest path: the writable root itself.
    Share(PathBuf),
}

impl GuestRoot {
    /// The disk the VM needs for it, if any.
    fn disk(&self) -> Option<PathBuf> {
        match self {
            GuestRoot::Disk(p) => Some(p.clone()),
            GuestRoot::Share(_) => None,
        }
    }

    /// What the agent mounts.
    fn rootfs(&self) -> Rootfs {
        match self {
            GuestRoot::Disk(p) => Rootfs {
                device: crate::sandbox::ROOTFS_DEVICE.into(),
                fstype: "ext4".into(),
                read_only: true,
                size_bytes: std::fs::metadata(p).ok().map(|m| m.len()),
            },
            GuestRoot::Share(dir) => Rootfs {
                device: dir.clone(),
                fstype: "bind".into(),
                read_only: false,
                size_bytes: None,
            },
        }
    }
}

/// `husk run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The container's root filesystem.
    pub root: Root,
    /// Process and limits.
    pub spec: RunSpec,
    /// Container name, unique among running containers; None: anonymous.
    pub name: Option<String>,
    /// Keep stdin open and relay it.
    pub interactive: bool,
    /// Guest kernel; None: default.
    pub kernel: Option<PathBuf>,
    /// Agent binary; None: default.
    pub agent: Option<PathBuf>,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
    /// Host directories bound into the container (`-v`).
    pub volumes: Vec<Volume>,
    /// Seccomp filters on the VMM's threads.
    pub seccomp: SeccompMode,
    /// Restore a warm template instead of booting the guest.
    pub template: bool,
}

/// What happened to the container.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunOutcome {
    /// Its exit status (128+N for signal N).
    pub status: ExitStatus,
    /// CLOCK_MONOTONIC ns of the VM's first KVM_RUN; None if it never ran.
    pub first_run_ns: Option<u64>,
    /// The guest's clock (the agent's stamps) on the host's; None if the
    /// agent sent no stamp.
    pub guest_clock: Option<GuestClock>,
    /// The VM was restored from a template: the agent's start and ready
    /// stamps are the template's, from before the snapshot.
    pub restored: bool,
    /// CLOCK_MONOTONIC ns when the agent first answered a handshake.
    pub answered_ns: Option<u64>,
    /// The agent's steps creating the container (guest clock).
    pub setup: Vec<husk_proto::SetupStep>,
}

/// Guest memory for a container with `limit` bytes: the limit plus room
/// for the guest kernel and agent, at least 256 MiB.
pub fn vm_mem_mib(limit: Option<u64>) -> u64 {
    match limit {
        Some(l) => (l.div_ceil(1 << 20) + 128).max(256),
        None => 256,
    }
}

/// Runs the container; returns its exit status.
pub fn run(o: &RunOptions) -> Result<RunOutcome, RuntimeError> {
    let mut spec = spec::build(&o.spec)?;
    let mut share_set = ShareSet::default();
    let root = match &o.root {
        Root::Dir(dir) => {
            GuestRoot::Disk(husk_image::ext4::image_for_dir(dir, &paths::image_cache())?)
        }
        Root::Disk(disk) => GuestRoot::Disk(disk.clone()),
        Root::Share(dir) => GuestRoot::Share(share_set.add(dir, false, "rootfs")?),
    };
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for v in &o.volumes {
        let what = format!("volume {}", v.container);
        let source = share_set.add(&v.host, v.read_only, &what)?;
        mounts.push(shares::bind_mount(&v.container, &source, v.read_only)?);
    }
    spec.set_mounts(Some(mounts));
    let (run_dir, _name_lock) = match &o.name {
        Some(n) => {
            let (dir, lock) = paths::claim_name(n)?;
            (dir, Some(lock))
        }
        None => (paths::new_run_dir("run")?, None),
    };
    // The VM's process enters a jail of its own (uid, mount namespace) once
    // the VM is built; this one keeps root to remove the run dir after it.
    let jail_id =
        crate::runc::create::jail_enabled_by_env().then(|| crate::runc::store::jail_id(&run_dir));
    let cfg = SessionConfig {
        spec,
        root,
        mem_mib: vm_mem_mib(o.spec.memory),
        vcpus: vcpus_for(o.spec.cpus),
        interactive: o.interactive,
        host_terminal: o.spec.tty,
        kernel: o.kernel.clone(),
        agent: o.agent.clone(),
        boot_timeout: o.boot_timeout,
        run_dir: run_dir.clone(),
        network: HostNetwork::default(),
        files: Vec::new(),
        shares: share_set,
        seccomp: o.seccomp,
        template: o.template,
        jail_id,
    };
    let outcome = crate::run_vm::supervise(&cfg);
    // Whatever happened in the VM's process, nothing of it stays.
    let _ = std::fs::remove_dir_all(&run_dir);
    outcome
}

/// `n` bytes from the host's RNG (getrandom(2): a jailed VMM has no
/// /dev).
fn host_random(n: usize) -> Result<Vec<u8>, RuntimeError> {
    let mut buf = vec![0u8; n];
    husk_vmm::sys::fill_random(&mut buf).map_err(|e| RuntimeError::Io("getrandom".into(), e))?;
    Ok(buf)
}

/// vCPUs for a CPU limit: enough whole CPUs, 1 to 32.
pub fn vcpus_for(cpus: Option<f64>) -> u8 {
    cpus.map(|c| c.ceil().clamp(1.0, 32.0) as u8).unwrap_or(1)
}

/// One container in a fresh VM, whose stdio is this process's fds 0-2.
/// `husk create` hands it to the VMM process as JSON (`DIR/vmm.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionConfig {
    /// The container's spec, as the agent gets it.
    pub spec: oci_spec::runtime::Spec,
    /// The container's root.
    pub root: GuestRoot,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Relay fd 0 to the container's stdin (EOF closes it).
    pub interactive: bool,
    /// The spec asks for a terminal and fd 0 is the user's: put it in raw
    /// mode and pass its size on.
    pub host_terminal: bool,
    /// Guest kernel; None: default.
    pub kernel: Option<PathBuf>,
    /// Agent binary; None: default.
    pub agent: Option<PathBuf>,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
    /// The VM's private directory (removed when the session ends).
    pub run_dir: PathBuf,
    /// Host interfaces the VM takes over.
    #[serde(default)]
    pub network: HostNetwork,
    /// Files for the spec's bind mounts of host files.
    #[serde(default)]
    pub files: Vec<GuestFile>,
    /// Host directories for the spec's bind mounts of host directories.
    #[serde(default)]
    pub shares: ShareSet,
    /// Seccomp filters on the VMM's threads.
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// Restore a warm template instead of booting the guest.
    #[serde(default = "crate::template::enabled_by_env")]
    pub template: bool,
    /// Jail the VMM process in `run_dir` as this uid and gid.
    #[serde(default)]
    pub jail_id: Option<u32>,
}

impl SessionConfig {
    /// Hands the run dir to the jail's uid and gid, if jailed: its only
    /// directory is its own.
    pub(crate) fn give_run_dir_to_jail(&self) -> Result<(), RuntimeError> {
        match self.jail_id {
            Some(id) => std::os::unix::fs::chown(&self.run_dir, Some(id), Some(id))
                .map_err(|e| RuntimeError::Io(self.run_dir.display().to_string(), e)),
            None => Ok(()),
        }
    }
}

/// What [`Session::set_up`] leaves: the control connection, the stdio
/// relays, the raw terminal, the agent's steps and the set-up's deadline.
type SetUp = (
    Client<UnixStream>,
    Relays,
    Option<husk_vmm::event_loop::RawTerminal>,
    Vec<husk_proto::SetupStep>,
    Instant,
);

/// Whether the container's process asks for a terminal.
fn tty_of(c: &SessionConfig) -> bool {
    c.spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false)
}

/// A container created in its VM, stdio attached; `start`, then `wait`.
pub struct Session {
    sandbox: Sandbox,
    control: Client<UnixStream>,
    relays: Relays,
    pty: bool,
    raw_terminal: Option<husk_vmm::event_loop::RawTerminal>,
    sigfd: OwnedFd,
    deadline: Instant,
    budget: u64,
    boot_timeout: Duration,
    /// Where `husk run` relays the signals processes send it.
    relayed_signals: Option<UnixStream>,
    /// The agent's steps creating the container.
    pub setup: Vec<husk_proto::SetupStep>,
}

impl Session {
    /// Boots the VM, creates the container (not started) and attaches its
    /// stdio to fds 0-2. `relayed`: where `husk run` relays the signals
    /// processes send it (see [`crate::run_vm`]), one byte each, instead of
    /// this process's own. With it, a signal for the container that comes
    /// before the container exists stops the VM and ends the session with
    /// [`RuntimeError::Interrupted`] (as a `husk run` killed by it would):
    /// a guest that hangs in its boot or in the create cannot hold `husk
    /// run` for its whole boot timeout. (A first run's template build
    /// comes before that and runs to its end.)
    pub fn create(c: &SessionConfig, relayed: Option<UnixStream>) -> Result<Self, RuntimeError> {
        let agent = paths::agent_binary(c.agent.as_deref())?;
        let agent_disk = paths::agent_disk(&agent)?;
        // Forwarded signals are blocked before any VMM thread exists, so
        // only our signalfd sees them.
        let sigfd = husk_vmm::event_loop::signalfd(&FORWARDED)
            .map_err(|e| RuntimeError::Io("signalfd".into(), e))?;
        let sandbox = Sandbox::boot(&SandboxConfig {
            kernel: c.kernel.clone(),
            agent_disk,
            rootfs_image: c.root.disk(),
            mem_mib: c.mem_mib,
            vcpus: c.vcpus,
            run_dir: c.run_dir.clone(),
            network: c.network.clone(),
            shares: c.shares.vm_config(),
            seccomp: c.seccomp,
            template: c.template,
            boot_timeout: c.boot_timeout,
            jail_id: c.jail_id,
        })?;
        if c.jail_id.is_some() {
            // Jailed, the VM running: from here this thread and the ones it
            // starts (stdio relays, signals, terminal size) talk to the
            // guest and relay; filtered as the VMM's own threads are.
            let mode = c
                .seccomp
                .or_env()
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
            husk_vmm::seccomp::install(husk_vmm::seccomp::ThreadKind::Protocol, mode)
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        }
        let done = AtomicBool::new(false);
        let caught = std::sync::atomic::AtomicI32::new(0);
        let set_up = std::thread::scope(|s| {
            let watcher = relayed.as_ref().map(|r| {
                s.spawn(|| {
                    relay::stop_on_signal(&sigfd, Some(r), &done, &caught, &|| sandbox.stop())
                })
            });
            let set_up = Self::set_up(c, &sandbox);
            done.store(true, Ordering::SeqCst);
            if let Some(w) = watcher {
                let _ = w.join();
            }
            set_up
        });
        match caught.load(Ordering::SeqCst) {
            0 => {}
            signal => return Err(RuntimeError::Interrupted(signal)),
        }
        let (control, relays, raw_terminal, setup, deadline) = set_up?;
        Ok(Session {
            sandbox,
            control,
            relays,
            pty: tty_of(c) && c.host_terminal,
            raw_terminal,
            sigfd,
            deadline,
            budget: c.boot_timeout.as_secs(),
            boot_timeout: c.boot_timeout,
            relayed_signals: relayed,
            setup,
        })
    }

    /// The container created in `sandbox`'s guest, its stdio attached.
    fn set_up(c: &SessionConfig, sandbox: &Sandbox) -> Result<SetUp, RuntimeError> {
        let budget = c.boot_timeout.as_secs();
        let deadline = Instant::now() + c.boot_timeout;
        // Replies to set-up requests are bounded; `wait` lifts the bound.
        let mut control = sandbox.control(deadline, budget, Some(c.boot_timeout))?;
        // Sent ahead of the create, which the agent serves after them (one
        // connection's requests in order): their round trips overlap it.
        // The container is started only once both are answered.
        let mut requests = Vec::new();
        if sandbox.restored() {
            // Siblings restored from one template share their RNG state;
            // the guest's clock went on from the template's time.
            let realtime_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            requests.push(husk_proto::Request::Refresh(husk_proto::Refresh {
                entropy: host_random(64)?,
                realtime_ns,
            }));
        }
        if !c.network.links.is_empty() {
            requests.push(husk_proto::Request::ConfigureNetwork(
                c.network.guest(sandbox.restored()),
            ));
        }
        // (collect stops at the first failure: nothing is sent after it)
        let ahead = requests
            .into_iter()
            .map(|r| control.send_ahead(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sandbox.explain(e.into()))?;
        let tty = tty_of(c);
        // The streams are opened while the agent creates the container:
        // their hellos wait in the guest until it exists, which saves their
        // round trips (each slow where the guest kernel is emulated).
        let opening = Opening::default();
        let wait_ms = u64::try_from(
            deadline
                .saturating_duration_since(Instant::now())
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let open = |kind| {
            let mut hello = Sandbox::hello(CONTAINER_ID, kind);
            hello.wait_ms = wait_ms;
            sandbox.stream(hello, deadline, budget, &|s| opening.add(s))
        };
        let (created, attached) = std::thread::scope(|s| {
            let streams = s.spawn(|| attach_stdio(&open, tty, c.interactive, c.host_terminal));
            let created = control.create_container(CreateContainer {
                container_id: CONTAINER_ID.into(),
                spec: Box::new(c.spec.clone()),
                rootfs: c.root.rootfs(),
                scratch: Scratch::Tmpfs { size_bytes: None },
                stdin: c.interactive,
                files: c.files.clone(),
                shares: c.shares.guest(),
            });
            if created.is_err() {
                opening.abort();
            }
            let attached = streams
                .join()
                .unwrap_or_else(|_| Err(RuntimeError::Invalid("stream thread panicked".into())));
            (created, attached)
        });
        for a in ahead {
            control.finish(a).map_err(|e| sandbox.explain(e.into()))?;
        }
        let created = created.map_err(|e| sandbox.explain(e.into()))?;
        let (relays, raw_terminal) = attached?;
        Ok((control, relays, raw_terminal, created.setup, deadline))
    }

    /// Starts the container and waits for it: what happened, with the
    /// VM's and the agent's stamps.
    pub fn run_to_end(mut self) -> Result<RunOutcome, RuntimeError> {
        self.start()?;
        let first_run_ns = self.first_run_ns();
        let guest_clock = self.guest_clock();
        let restored = self.sandbox.restored();
        let answered_ns = self.sandbox.answered_ns();
        let setup = std::mem::take(&mut self.setup);
        let status = self.wait()?;
        Ok(RunOutcome {
            status,
            first_run_ns,
            guest_clock,
            restored,
            answered_ns,
            setup,
        })
    }

    /// CLOCK_MONOTONIC ns of the VM's first KVM_RUN, once it happened.
    pub fn first_run_ns(&self) -> Option<u64> {
        self.sandbox.first_run_ns()
    }

    /// The guest's clock on the host's, once the agent answered.
    pub fn guest_clock(&self) -> Option<GuestClock> {
        self.sandbox.guest_clock()
    }

    /// The VM's vsock socket: other host processes reach the agent there.
    pub fn vsock_path(&self) -> PathBuf {
        self.sandbox.vsock_path()
    }

    /// Starts the container's process.
    pub fn start(&mut self) -> Result<(), RuntimeError> {
        self.control
            .start(CONTAINER_ID)
            .map_err(|e| self.sandbox.explain(e.into()))?;
        if self.pty {
            if let Some((rows, cols)) = terminal_size() {
                let _ = self.control.resize_tty(ResizeTty {
                    container_id: CONTAINER_ID.into(),
                    exec_id: None,
                    rows,
                    cols,
                });
            }
        }
        Ok(())
    }

    /// Forwards signals to the container until it exits, waits for its
    /// output, ends the VM; returns the container's exit status.
    pub fn wait(mut self) -> Result<ExitStatus, RuntimeError> {
        let done = Arc::new(AtomicBool::new(false));
        // Signal and resize replies are quick; an agent that does not
        // send one must not hang husk when the container ends.
        let reply = Some(self.boot_timeout);
        let forwarder = match self.sandbox.control(self.deadline, self.budget, reply) {
            Ok(c) => Some(forward_signals(
                self.sigfd,
                c,
                self.relayed_signals.take(),
                done.clone(),
            )),
            Err(e) => {
                tracing::warn!("signals will not be forwarded: {e}");
                None
            }
        };
        let resizer = match self.pty {
            true => match self.sandbox.control(self.deadline, self.budget, reply) {
                Ok(c) => Some(watch_winsize(c, None, done.clone())),
                Err(e) => {
                    tracing::warn!("terminal resizes will not be forwarded: {e}");
                    None
                }
            },
            false => None,
        };
        self.control
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| RuntimeError::Io("agent connection".into(), e))?;
        let status = self
            .control
            .wait(ProcessRef {
                container_id: CONTAINER_ID.into(),
                exec_id: None,
            })
            .map_err(|e| self.sandbox.explain(e.into()))?;
        done.store(true, Ordering::SeqCst);
        // The agent answered once the output reached its end (or gave up on
        // a background process holding it): wait for the last bytes in the
        // first case, briefly in the second.
        let drain = if status.output_drained {
            self.boot_timeout
        } else {
            UNDRAINED_GRACE
        };
        self.relays.wait(drain);
        drop(self.raw_terminal);
        for t in [forwarder, resizer].into_iter().flatten() {
            let _ = t.join();
        }
        // Nothing more is needed from the guest: end the VM now rather than
        // wait for it to reboot itself.
        if let Some(exit) = self.sandbox.stop_now() {
            if !exit.is_clean() {
                tracing::warn!("VM ended with: {exit}");
            }
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_memory_leaves_room_above_the_limit() {
        assert_eq!(vm_mem_mib(None), 256);
        assert_eq!(vm_mem_mib(Some(64 << 20)), 256);
        assert_eq!(vm_mem_mib(Some(512 << 20)), 640);
    }
}
