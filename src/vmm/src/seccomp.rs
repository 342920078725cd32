//! Seccomp filters for the VMM's threads (seccompiler). A vCPU thread runs
//! KVM_RUN and the device register code the guest's port and MMIO exits
//! reach; the event-loop thread runs the devices' queues, console input
//! and the vsock muxer; the console thread writes the guest's output to
//! stdout; the thread that started the VM with [`crate::Vm::run_confined`]
//! waits for it and tears it down (joins, signals vCPUs and virtiofsd,
//! unlinks the VM's sockets). Each installs, before the guest runs (the
//! teardown thread: once the event loop is started), an allow-list of the
//! syscalls it needs, ioctls by request number. Building the VM (opening
//! files, creating the VM) happens before any filter.
//! Anything else raises SIGSYS, whose handler prints one line naming the
//! thread and the syscall and ends the process with 159 (128 + SIGSYS).
//!
//! `HUSK_SECCOMP=log` allows and logs (to the kernel log, `audit: type=1326
//! ... syscall=N`) what a filter would refuse: how a missing entry is
//! found. `HUSK_SECCOMP=off` or `husk vm|run --no-seccomp` installs none.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

/// Whether the VMM's threads are filtered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Forbidden syscalls end the process (the default).
    #[default]
    On,
    /// Forbidden syscalls are allowed and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    /// The mode `HUSK_SECCOMP` (on, log, off) asks for, else `self`.
    pub fn or_env(self) -> Result<Self, SeccompError> {
        match std::env::var("HUSK_SECCOMP") {
            Err(_) => Ok(self),
            Ok(v) => match v.as_str() {
                "on" => Ok(Self::On),
                "log" => Ok(Self::Log),
                "off" => Ok(Self::Off),
                _ => Err(SeccompError::Env(v)),
            },
        }
    }
}

/// Which allow-list a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
    /// Writes queued guest console output to husk's stdout.
    Console,
    /// Waits for the VM to stop and tears it down.
    Teardown,
    /// Speaks the agent protocol and relays the container's stdio, in a
    /// jailed process that also runs a VM (`husk run`'s VM process, the
    /// runtime's VMM processes); the threads it starts inherit its filter.
    Protocol,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::EventLoop => "event-loop",
            Self::Console => "console",
            Self::Teardown => "teardown",
            Self::Protocol => "agent-protocol",
        }
    }
}

/// A filter that could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter of the {0} thread: {1}")]
    Build(&'static str, String),
    #[error("cannot install the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, String),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("invalid HUSK_SECCOMP {0:?}: expected on, log or off")]
    Env(String),
}

thread_local! {
    /// The filtered thread's kind, for the SIGSYS line.
    static KIND: Cell<&'static str> = const { Cell::new("") };
}

/// Whether an agent-protocol filter was installed: of the filtered kinds,
/// only that thread starts threads (which inherit its filter).
static PROTOCOL_INSTALLED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Drops the calling thread's capabilities ([`crate::caps`]) and installs
/// `kind`'s filter on it (both carry over to threads it starts later).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    let prog = program(kind, mode)?;
    // Before the filter, which does not allow capset.
    crate::caps::drop_all()
        .map_err(|e| SeccompError::Install(kind.name(), format!("drop capabilities: {e}")))?;
    KIND.with(|k| k.set(kind.name()));
    if kind == ThreadKind::Protocol {
        PROTOCOL_INSTALLED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(kind.name(), e.to_string()))
    };
    if kind == ThreadKind::Protocol {
        install(&no_clone3(kind)?)?;
    }
    install(&prog)
}

/// A filter under which clone3(2) fails with ENOSYS, so that glibc
/// starts threads with clone(2), whose flags a filter can see (clone3's
/// are behind a pointer). Stacked with the allow-list, which lets clone3
/// through: the kernel applies the stricter answer.
fn no_clone3(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Build(kind.name(), e.to_string());
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// The compiled filter of `kind`.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let refused = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let err = |e: seccompiler::BackendError| SeccompError::Build(kind.name(), e.to_string());
    let filter = SeccompFilter::new(
        rules(kind).map_err(err)?,
        refused,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// How many syscalls `kind`'s filter allows (ioctl counts once).
pub fn allowed(kind: ThreadKind) -> usize {
    rules(kind).map(|r| r.len()).unwrap_or(0)
}

/// Syscalls every filtered thread makes: I/O on fds it already holds,
/// memory, locks, time, signals, its own exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What only the event loop does: wait on its fds, the disks' other I/O,
/// the vsock muxer's Unix sockets (host paths opened O_PATH, checked to be
/// sockets of husk's user, connected) and timers, vhost-user messages, kicking vCPUs, restoring
/// the terminal.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_tgkill,
    libc::SYS_geteuid,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// What only the teardown thread does: reap (or stop) virtiofsd, kick the
/// vCPUs out of the guest, remove the VM's socket files.
const TEARDOWN: &[i64] = &[
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// What the agent-protocol thread does beyond [`COMMON`]: connect to the
/// VM's vsock socket and talk over it with timeouts, wait on fds and its
/// signalfd, start threads (clone with CLONE_THREAD only, below; a new
/// thread's glibc asks for its robust list, rseq area and CPU set), read a
/// file of the jail dir (the console log's tail for an error) and empty
/// the jail dir when the VM is gone.
const PROTOCOL: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
];

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);

/// ioctl requests (the second argument) each thread may make: a vCPU runs
/// and, for a profile or a failure report, reads its registers and
/// translates RIP; paused for a snapshot, it reads the rest of its state.
/// The event loop reads the VM-wide state for a snapshot.
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_TRANSLATE(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ],
        ThreadKind::EventLoop => vec![
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::FIONBIO,
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
        ],
        // The user's terminal: raw mode and back, its size; sockets
        // (non-)blocking.
        ThreadKind::Protocol => vec![
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TIOCGWINSZ,
            libc::FIONBIO,
        ],
        ThreadKind::Console | ThreadKind::Teardown => Vec::new(),
    }
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[i64] = match kind {
        ThreadKind::Vcpu | ThreadKind::Console => &[],
        ThreadKind::EventLoop => EVENT_LOOP,
        ThreadKind::Teardown => TEARDOWN,
        ThreadKind::Protocol => PROTOCOL,
    };
    for nr in COMMON.iter().chain(extra) {
        map.insert(*nr, Vec::new());
    }
    // (An empty rule list would allow every request.)
    let ioctl = ioctls(kind);
    if !ioctl.is_empty() {
        map.insert(libc::SYS_ioctl, arg_is(1, SeccompCmpOp::Eq, &ioctl)?);
    }
    // fcntl: F_GETFD everywhere (Rust's debug builds check an fd is open
    // before closing it); the event loop also sets fds non-blocking and
    // duplicates them.
    let mut fcntl = vec![libc::F_GETFD as u64];
    if matches!(kind, ThreadKind::EventLoop | ThreadKind::Protocol) {
        fcntl.extend([libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC].map(|c| c as u64));
    }
    if kind == ThreadKind::Protocol {
        // glibc's fdopendir, emptying the jail dir, sets close-on-exec.
        fcntl.push(libc::F_SETFD as u64);
    }
    map.insert(libc::SYS_fcntl, arg_is(1, SeccompCmpOp::Eq, &fcntl)?);
    // mprotect: glibc grows a thread's malloc arena with it; never to make
    // memory executable.
    map.insert(
        libc::SYS_mprotect,
        arg_is(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), &[0])?,
    );
    if kind == ThreadKind::Protocol {
        // Threads only: no new process.
        let thread = libc::CLONE_THREAD as u64;
        map.insert(
            libc::SYS_clone,
            arg_is(0, SeccompCmpOp::MaskedEq(thread), &[thread])?,
        );
        // Files opened for reading only, none created.
        let write = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
        map.insert(
            libc::SYS_openat,
            arg_is(2, SeccompCmpOp::MaskedEq(write), &[0])?,
        );
    }
    // Unix sockets only (the vsock muxer's host side; the agent's vsock
    // socket), and paths opened O_PATH only (the muxer checks a socket
    // before it connects to it).
    if kind == ThreadKind::EventLoop {
        let o_path = libc::O_PATH as u64;
        map.insert(
            libc::SYS_openat,
            arg_is(2, SeccompCmpOp::MaskedEq(o_path), &[o_path])?,
        );
    }
    if matches!(kind, ThreadKind::EventLoop | ThreadKind::Protocol) {
        map.insert(
            libc::SYS_socket,
            arg_is(0, SeccompCmpOp::Eq, &[libc::AF_UNIX as u64])?,
        );
    }
    Ok(map)
}

/// One rule per value: the 32-bit argument `index` compared by `op` with
/// it (any one matching allows the call).
fn arg_is(
    index: u8,
    op: SeccompCmpOp,
    values: &[u64],
) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                op.clone(),
                v,
            )?])
        })
        .collect()
}

/// Exit status of a process a filter stopped: 128 + SIGSYS.
pub const SIGSYS_EXIT: i32 = 128 + libc::SIGSYS;

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only calls
        // async-signal-safe functions (write, _exit).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler for SIGSYS with a valid sigaction.
        if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// Writes "husk: seccomp: the <kind> thread made syscall <N>, which its
/// filter does not allow" to stderr and ends the process.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t for SIGSYS: si_signo, si_errno, si_code, padding, then
    // _call_addr (8 bytes) and _syscall (int) at offset 24.
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) with
    // SA_SIGINFO; offset 24 is inside it.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let kind = match KIND.with(|k| k.get()) {
        "" if PROTOCOL_INSTALLED.load(std::sync::atomic::Ordering::SeqCst) => {
            ThreadKind::Protocol.name()
        }
        "" => "unfiltered",
        k => k,
    };
    let mut digits = [0u8; 12];
    let mut buf = [0u8; 160];
    let mut n = 0;
    for part in [
        b"husk: seccomp: the ".as_slice(),
        kind.as_bytes(),
        b" thread made syscall ",
        itoa(nr, &mut digits),
        b", which its filter does not allow (HUSK_SECCOMP=log lets it through and logs it)\n",
    ] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf is valid
    // for n bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(SIGSYS_EXIT);
    }
}

/// `v` in decimal, in `buf` (no allocation: used in a signal handler).
fn itoa(v: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    let mut x = i64::from(v).unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

#[cfg(test)]
mod tests;
