//! The backend side: a virtiofsd process per share, and the vhost-user
//! conversation with it.
//!
//! husk creates the listening socket itself, hands it to virtiofsd
//! (`--fd`), connects, and unlinks the path at once: there is no start-up
//! race to poll for and no socket file left behind. virtiofsd dies with
//! the VMM (PR_SET_PDEATHSIG, and it exits when the connection closes);
//! dropping a [`Virtiofsd`] kills and reaps it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{FsError, NUM_QUEUES, QUEUE_SIZE};
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::{feature, GuestMem};

/// Debian's virtiofsd (package qemu-system-common).
pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// How long husk waits for any one vhost-user reply. virtiofsd answers in
/// microseconds; this only keeps a wedged backend from hanging the VMM.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a virtiofsd whose connection closed may take to exit.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Virtio features husk lets through from the backend to the driver.
const PASSED_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC);

/// A running virtiofsd.
pub struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Starts `binary` serving `dir` over the listening socket `listener`.
    /// `read_only` is enforced by virtiofsd's own view of `dir`: a
    /// read-only bind mount in a mount namespace of its own (this
    /// virtiofsd has no read-only option, and the guest's `ro` mount is no
    /// boundary against a hostile guest).
    pub fn spawn(
        binary: &Path,
        dir: &Path,
        read_only: bool,
        listener: &UnixListener,
    ) -> Result<Self, FsError> {
        let fd = listener.as_raw_fd();
        let cdir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| FsError::Dir(dir.display().to_string(), "contains a NUL byte".into()))?;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--fd={fd}"))
            .arg("-o")
            .arg(format!("source={}", dir.display()))
            .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
            .args(["-o", "log_level=err"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only
        // makes raw syscalls (no allocation, no locks); `cdir` outlives it.
        unsafe {
            cmd.pre_exec(move || child_setup(fd, &cdir, read_only));
        }
        let child = cmd
            .spawn()
            .map_err(|e| FsError::Spawn(binary.display().to_string(), e))?;
        Ok(Self { child })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it exits within `grace`.
    pub fn exited(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        // With its connection closed virtiofsd exits by itself, and its
        // sandbox child with it; give it a moment so neither is left for
        // init to reap, then make sure. Its writes went through already.
        if self.exited(EXIT_GRACE).is_some() {
            return;
        }
        // A jailed VMM may not signal it (another uid): it goes when its
        // connection does, at the latest when this process exits.
        if let Err(e) = self.child.kill() {
            tracing::warn!("virtiofsd {}: cannot stop it: {e}", self.child.id());
            return;
        }
        let _ = self.child.wait();
    }
}

/// `struct mount_attr` (linux/mount.h), for mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// MOUNT_ATTR_RDONLY.
const MOUNT_ATTR_RDONLY: u64 = 1;

/// close_range(2)'s flag: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// In the child, before exec: keep the listening socket, and no other fd
/// beyond stdio, open across exec, die with the parent, and make `dir`
/// read-only in a private mount namespace when asked.
fn child_setup(fd: RawFd, dir: &CString, read_only: bool) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain syscalls on an fd this process owns and on C strings
    // that live until exec.
    unsafe {
        // Nothing of the VMM's but the listening socket crosses the exec:
        // its eventfds (the guest's interrupts, the VM's stop latch) were
        // made without close-on-exec.
        check(
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC)
                as libc::c_int,
        )?;
        check(libc::fcntl(fd, libc::F_SETFD, 0))?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        if read_only {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let root = c"/";
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            // Read-only all the way down: mounts under `dir` too.
            let attr = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            let rc = libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                dir.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            );
            if rc == -1 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOSYS) {
                    return Err(e);
                }
                // Before Linux 5.12: the top mount only.
                check(libc::mount(
                    std::ptr::null(),
                    dir.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
        }
    }
    Ok(())
}

/// A private directory for the moment a socket path must exist.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Result<Self, FsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = ["/run", "/tmp"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "husk-fs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| FsError::Host("socket directory", e))?;
        Ok(Self(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A vhost-user-fs backend that has answered the handshake.
pub struct Backend {
    frontend: Frontend,
    daemon: Option<Virtiofsd>,
    /// Virtio features the backend offers, as passed to the driver.
    device_features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then
    /// start disabled and need SET_VRING_ENABLE).
    protocol: bool,
}

impl Backend {
    /// Closes the connection; returns the process behind it, if husk
    /// started one, for the caller to drop (reap) where it may.
    pub fn into_daemon(mut self) -> Option<Virtiofsd> {
        self.daemon.take()
    }

    /// Starts `binary` on `dir` and does the handshake.
    pub fn start(binary: &Path, dir: &Path, read_only: bool) -> Result<Self, FsError> {
        let shown = dir.display().to_string();
        let meta =
            std::fs::metadata(dir).map_err(|e| FsError::Dir(shown.clone(), e.to_string()))?;
        if !meta.is_dir() {
            return Err(FsError::Dir(shown, "not a directory".into()));
        }
        let dir = dir
            .canonicalize()
            .map_err(|e| FsError::Dir(shown, e.to_string()))?;
        let sock_dir = SocketDir::new()?;
        let path = sock_dir.0.join("fs.sock");
        let listener = UnixListener::bind(&path).map_err(|e| FsError::Host("bind", e))?;
        // Queued in the backlog until virtiofsd accepts it.
        let stream = UnixStream::connect(&path).map_err(|e| FsError::Host("connect", e))?;
        drop(sock_dir);
        let daemon = Virtiofsd::spawn(binary, &dir, read_only, &listener)?;
        drop(listener);
        Self::handshake(stream, Some(daemon))
    }

    /// Does the handshake over a connected stream (`daemon` is the process
    /// behind it, if husk started one).
    pub fn handshake(stream: UnixStream, daemon: Option<Virtiofsd>) -> Result<Self, FsError> {
        let mut daemon = daemon;
        let fail = |what: &'static str, e: vhost::Error, daemon: &mut Option<Virtiofsd>| {
            // A backend that dies at start resets the connection while it
            // exits: give the exit status a moment to be there.
            let why = match daemon.as_mut().and_then(|d| d.exited(EXIT_GRACE)) {
                Some(status) => format!("virtiofsd exited ({status}) before answering"),
                None => e.to_string(),
            };
            FsError::Protocol(what, why)
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| FsError::Host("socket timeout", e))?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        if let Err(e) = frontend.set_owner() {
            return Err(fail("SET_OWNER", e, &mut daemon));
        }
        let offered = match frontend.get_features() {
            Ok(f) => f,
            Err(e) => return Err(fail("GET_FEATURES", e, &mut daemon)),
        };
        if offered & feature(VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::Feature("VIRTIO_F_VERSION_1"));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol = offered & protocol_bit != 0;
        if protocol {
            let theirs = match frontend.get_protocol_features() {
                Ok(p) => p,
                Err(e) => return Err(fail("GET_PROTOCOL_FEATURES", e, &mut daemon)),
            };
            // REPLY_ACK: every setting is acknowledged, so a memory table
            // the backend cannot map fails activation, not a later request.
            let ours = theirs & VhostUserProtocolFeatures::REPLY_ACK;
            if let Err(e) = frontend.set_protocol_features(ours) {
                return Err(fail("SET_PROTOCOL_FEATURES", e, &mut daemon));
            }
            if ours.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Self {
            frontend,
            daemon,
            device_features: offered & PASSED_FEATURES,
            protocol,
        })
    }

    /// Features to offer the driver.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The connection's fd, watched for the backend going away.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// virtiofsd's pid, if husk started it.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Virtiofsd::pid)
    }

    /// Hands the driver's rings to the backend: features, guest memory,
    /// then per queue its size, addresses (in husk's address space, which
    /// the memory table maps), start index, call and kick eventfds.
    pub fn start_rings(
        &mut self,
        mem: &GuestMem,
        queues: &[Queue],
        acked_features: u64,
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FsError> {
        let proto = |e: vhost::Error| e.to_string();
        let mut features = acked_features & PASSED_FEATURES;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(|e| FsError::Protocol("SET_FEATURES", proto(e)))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                FsError::Memory("guest memory is not backed by a shareable file".into())
            })?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| FsError::Protocol("SET_MEM_TABLE", proto(e)))?;
        for (i, q) in queues.iter().enumerate() {
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| {
                        FsError::Memory(format!(
                            "queue {i} ring at {gpa:#x} is outside guest memory"
                        ))
                    })
            };
            let ring = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let step = |what: &'static str, r: Result<(), vhost::Error>| {
                r.map_err(|e| FsError::Protocol(what, proto(e)))
            };
            step("SET_VRING_NUM", self.frontend.set_vring_num(i, q.size()))?;
            step("SET_VRING_ADDR", self.frontend.set_vring_addr(i, &ring))?;
            step(
                "SET_VRING_BASE",
                self.frontend.set_vring_base(i, q.next_avail()),
            )?;
            step("SET_VRING_CALL", self.frontend.set_vring_call(i, &calls[i]))?;
            step("SET_VRING_KICK", self.frontend.set_vring_kick(i, &kicks[i]))?;
            if self.protocol {
                step("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, true))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's rings (the driver reset the device).
    pub fn stop_rings(&mut self, count: usize) -> Result<(), FsError> {
        for i in 0..count {
            self.frontend
                .get_vring_base(i)
                .map_err(|e| FsError::Protocol("GET_VRING_BASE", e.to_string()))?;
        }
        Ok(())
    }
}
