//! A sandbox: one micro-VM whose PID 1 is husk's agent, with a read-only
//! rootfs disk and a vsock device whose host side is a Unix socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::Client;
use husk_proto::{read_frame, write_frame};
use husk_proto::{StreamHello, StreamReply};
use husk_proto::{CONTROL_PORT, PROTOCOL_VERSION, STDIO_PORT};
use husk_vmm::builder::FirstRunProbe;
use husk_vmm::config::{Console, DiskConfig, FsConfig, VmConfig, VsockConfig};
use husk_vmm::devices::legacy::console_log;
use husk_vmm::seccomp::SeccompMode;
use husk_vmm::vstate::vcpu::{monotonic_ns, ExitLatch};
use husk_vmm::{ConsoleInputSource, VmExit};

use crate::clock::GuestClock;
use crate::net::HostNetwork;
use crate::{uds, RuntimeError};

/// The guest CID of every sandbox (each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;

/// How to build a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Guest kernel; None: the default one.
    pub kernel: Option<PathBuf>,
    /// The agent's disk (`paths::agent_disk`), the guest's root: `/dev/vda`.
    pub agent_disk: PathBuf,
    /// Read-only ext4 image of the container's root (`/dev/vdb`); None when
    /// the root is a share.
    pub rootfs_image: Option<PathBuf>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Private directory for the vsock socket and the console log.
    pub run_dir: PathBuf,
    /// Host interfaces the VM takes over (a NIC each).
    pub network: HostNetwork,
    /// Host directories shared through virtio-fs.
    pub shares: Vec<FsConfig>,
    /// Seccomp filters on the VMM's threads.
    pub seccomp: SeccompMode,
    /// Restore a warm template instead of booting.
    pub template: bool,
    /// How long a template's first boot may take.
    pub boot_timeout: Duration,
    /// Jail the VMM process in `run_dir` as this uid and gid (see
    /// `husk_vmm::jail`); `run_dir` must then belong to it.
    pub jail_id: Option<u32>,
}

/// The VM of a sandbox whose vsock socket is `uds`.
pub(crate) fn vm_config(
    cfg: &SandboxConfig,
    uds: &std::path::Path,
) -> Result<VmConfig, RuntimeError> {
    Ok(VmConfig {
        kernel: cfg.kernel.clone(),
        cmdline: Some(sandbox_cmdline()),
        mem_mib: cfg.mem_mib,
        vcpus: cfg.vcpus,
        console: Console::File(cfg.run_dir.join("console.log")),
        disks: std::iter::once((&cfg.agent_disk, "agent"))
            .chain(cfg.rootfs_image.iter().map(|p| (p, "rootfs")))
            .map(|(path, id)| DiskConfig {
                path: path.clone(),
                read_only: true,
                id: Some(id.into()),
                direct: false,
            })
            .collect(),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.to_path_buf(),
        }),
        net: cfg.network.nics()?,
        fs: cfg.shares.clone(),
        seccomp: cfg.seccomp,
        jail: jail(cfg),
        ..Default::default()
    })
}

/// The jail of a sandbox's VMM process: its run dir, its uid and gid.
pub(crate) fn jail(cfg: &SandboxConfig) -> Option<husk_vmm::jail::JailConfig> {
    cfg.jail_id.map(|id| husk_vmm::jail::JailConfig {
        dir: cfg.run_dir.clone(),
        uid: id,
        gid: id,
        netns: false,
        // The sandbox's VMM is a thread of a process that runs others (the
        // agent protocol, stdio): it cannot fork into a PID namespace. Its
        // uid of its own keeps it from signalling anything else.
        pidns: false,
        nofile: husk_vmm::jail::DEFAULT_NOFILE,
        fsize: None,
        cgroups: Vec::new(),
    })
}

/// Once the taps exist, before the VMM is jailed: the guest's NICs reach
/// the host's links.
pub(crate) fn connect(cfg: &SandboxConfig) -> Result<(), String> {
    cfg.network.connect().map_err(|e| e.to_string())
}

/// The guest command line of every sandbox VM (before husk's per-host and
/// per-device additions): the default, `quiet`, and the agent's disk as the
/// read-only root with the agent as init. On kvm_pvm hosts each boot
/// message costs ~5-9 ms of emulated formatting and port writes (about 1 s
/// per boot); warnings, errors and panics still reach console.log.
pub fn sandbox_cmdline() -> String {
    format!(
        "{} quiet root={AGENT_DEVICE} ro rootfstype=ext4 init={}",
        husk_vmm::config::DEFAULT_CMDLINE,
        crate::paths::AGENT_IN_DISK
    )
}

/// The guest device of the agent's disk (the first disk).
pub const AGENT_DEVICE: &str = "/dev/vda";
/// The guest device of the container's root disk (after the agent's).
pub const ROOTFS_DEVICE: &str = "/dev/vdb";

/// `HUSK_PROFILE=FILE[:HZ]`: sample the guest's instruction pointer (HZ
/// per second, default 1000) and write the samples to FILE when the VM
/// stops, as `husk vm --profile` does (`husk bench profile --container`).
fn profile_request() -> Option<(PathBuf, u32)> {
    let v = std::env::var_os("HUSK_PROFILE")?;
    let v = v.to_string_lossy();
    let (path, hz) = v
        .rsplit_once(':')
        .and_then(|(p, hz)| Some((p, hz.parse().ok()?)))
        .unwrap_or((&*v, 1000));
    (!path.is_empty()).then(|| (PathBuf::from(path), hz))
}

/// A running sandbox VM. Dropping it stops the VM and removes its run dir.
pub struct Sandbox {
    thread: Option<JoinHandle<VmExit>>,
    latch: Arc<ExitLatch>,
    first_run: FirstRunProbe,
    /// The tightest guest-clock estimate from control handshakes so far.
    clock: Mutex<Option<GuestClock>>,
    uds: PathBuf,
    run_dir: PathBuf,
    restored: bool,
    /// CLOCK_MONOTONIC ns of the first completed handshake (0: none yet).
    answered_ns: std::sync::atomic::AtomicU64,
}

impl Sandbox {
    /// Boots the VM (the guest console goes to `run_dir/console.log`).
    /// The sandbox owns `run_dir` from here: it is removed when the VM
    /// cannot be built, as when the sandbox is dropped.
    pub fn boot(cfg: &SandboxConfig) -> Result<Self, RuntimeError> {
        Self::boot_in(cfg).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&cfg.run_dir);
        })
    }

    fn boot_in(cfg: &SandboxConfig) -> Result<Self, RuntimeError> {
        let uds = cfg.run_dir.join("vsock.sock");
        // The file is created before the VM is built: a jailed VMM has
        // entered its jail by then, and the VMM thread that writes the
        // samples at the end may create none (its seccomp filter).
        let profile = profile_request().and_then(|(path, hz)| match std::fs::File::create(&path) {
            Ok(out) => Some((out, path, hz)),
            Err(e) => {
                tracing::warn!("no profile: {}: {e}", path.display());
                None
            }
        });
        let warm = if cfg.template {
            crate::template::try_restore(cfg)?
        } else {
            None
        };
        let restored = warm.is_some();
        let vm = match warm {
            Some(v) => v,
            None => husk_vmm::build_then(&vm_config(cfg, &uds)?, &mut || connect(cfg))?,
        };
        let latch = vm.stop_handle();
        let first_run = vm.first_run_probe();
        let profile = profile.map(|(out, path, hz)| {
            let p = vm.profiler();
            p.enable(hz);
            (p, out, path)
        });
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let exit = vm.run_confined(ConsoleInputSource::None, false);
                if let Some((p, mut out, path)) = profile {
                    if let Err(e) = p.write_to(&mut out) {
                        tracing::warn!("profile {}: {e}", path.display());
                    }
                }
                exit
            })
            .map_err(|e| RuntimeError::Io("spawn VMM thread".into(), e))?;
        Ok(Self {
            thread: Some(thread),
            latch,
            first_run,
            clock: Mutex::new(None),
            uds,
            run_dir: cfg.run_dir.clone(),
            restored,
            answered_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// CLOCK_MONOTONIC ns when the agent first completed a handshake.
    pub fn answered_ns(&self) -> Option<u64> {
        match self.answered_ns.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Whether the VM was restored from a template (its RNG must then be
    /// reseeded before a container uses it).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// CLOCK_MONOTONIC ns of the VM's first KVM_RUN, once it happened.
    pub fn first_run_ns(&self) -> Option<u64> {
        self.first_run.get()
    }

    /// The guest's clock on the host's, once a control connection was made.
    pub fn guest_clock(&self) -> Option<GuestClock> {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's vsock socket (host clients write `CONNECT <port>`).
    pub fn vsock_path(&self) -> PathBuf {
        self.uds.clone()
    }

    /// The VM's stop reason, once it stopped.
    pub fn stopped(&self) -> Option<VmExit> {
        self.latch.reason()
    }

    /// Connects to guest vsock `port`, waiting for the guest to listen;
    /// returns the stream and when (host ns) its successful attempt began.
    fn connect(
        &self,
        port: u32,
        deadline: Instant,
        budget: u64,
    ) -> Result<(UnixStream, u64), RuntimeError> {
        loop {
            let attempt = monotonic_ns();
            if let Some(r) = self.stopped() {
                return Err(RuntimeError::VmStopped(format!(
                    "{r}{}",
                    self.console_tail()
                )));
            }
            match uds::connect(&self.uds, port, Instant::now()) {
                Ok(s) => return Ok((s, attempt)),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => return Err(RuntimeError::AgentTimeout(budget)),
            }
        }
    }

    /// A control connection to the agent, after the handshake (answered
    /// by `deadline`); each later reply may take up to `reply` (None: no
    /// bound, for `Wait`).
    pub fn control(
        &self,
        deadline: Instant,
        budget: u64,
        reply: Option<Duration>,
    ) -> Result<Client<UnixStream>, RuntimeError> {
        let (s, sent) = self.connect(CONTROL_PORT, deadline, budget)?;
        let client = uds::client(s, deadline, reply)?;
        let received = monotonic_ns();
        let _ = self.answered_ns.compare_exchange(
            0,
            received,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
        let sample = client
            .peer()
            .clock_ns
            .and_then(|g| GuestClock::from_exchange(sent, g, received));
        if let Some(c) = sample {
            let mut best = self.clock.lock().unwrap_or_else(|e| e.into_inner());
            *best = Some(c.tighter(*best));
        }
        Ok(client)
    }

    /// A stdio stream of a process, attached; `opened` sees the connection
    /// before the hello goes out (to cut it short from another thread).
    pub fn stream(
        &self,
        hello: StreamHello,
        deadline: Instant,
        budget: u64,
        opened: &dyn Fn(&UnixStream) -> Result<(), RuntimeError>,
    ) -> Result<UnixStream, RuntimeError> {
        let s = self.connect(STDIO_PORT, deadline, budget)?.0;
        opened(&s)?;
        uds::attach(s, &hello, deadline)
    }

    /// The StreamHello for a container's init process.
    pub fn hello(container_id: &str, stream: husk_proto::StreamKind) -> StreamHello {
        StreamHello {
            version: PROTOCOL_VERSION,
            container_id: container_id.into(),
            exec_id: None,
            stream,
            wait_ms: 0,
        }
    }

    /// Stops the VM now.
    pub fn stop(&self) {
        self.latch.stop(VmExit::Killed(libc::SIGKILL));
    }

    /// Stops the VM now; returns how it ended if it had ended by itself.
    pub fn stop_now(mut self) -> Option<VmExit> {
        let earlier = self.stopped();
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        earlier
    }

    /// Turns a broken agent connection into the reason the VM stopped, with
    /// the last guest console line, when it did stop (within a second).
    pub fn explain(&self, e: RuntimeError) -> RuntimeError {
        if !matches!(e, RuntimeError::Agent(husk_proto::ProtoError::Frame(_))) {
            return e;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.stopped().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.stopped() {
            Some(r) => RuntimeError::VmStopped(format!("{r}{}", self.console_tail())),
            None => e,
        }
    }

    /// Waits up to `timeout` for the guest to end the VM, then stops it.
    pub fn wait(mut self, timeout: Duration) -> VmExit {
        let deadline = Instant::now() + timeout;
        while self.stopped().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| VmExit::VmmError("VMM thread panicked".into()))
    }

    /// The last lines of the guest console, for error messages.
    fn console_tail(&self) -> String {
        console_note(&self.run_dir)
    }
}

/// ` (guest console: LINE)` with the last line of the console log in a
/// VM's run directory, or empty: the end of an error message.
pub fn console_note(run_dir: &Path) -> String {
    console_log::last_line(&run_dir.join("console.log"))
        .map(|l| format!(" (guest console: {l})"))
        .unwrap_or_default()
}

/// Attaches a fresh connection to the agent's stdio port to the stream
/// `hello` names.
pub fn attach_stream(mut s: UnixStream, hello: &StreamHello) -> Result<UnixStream, RuntimeError> {
    let kind = format!("{:?}", hello.stream).to_lowercase();
    let proto = |e: husk_proto::FrameError| RuntimeError::Agent(e.into());
    write_frame(&mut s, hello).map_err(proto)?;
    match read_frame::<_, StreamReply>(&mut s).map_err(proto)? {
        StreamReply::Attached => Ok(s),
        StreamReply::Rejected(e) => Err(RuntimeError::StreamRejected(kind, e.message)),
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop();
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
