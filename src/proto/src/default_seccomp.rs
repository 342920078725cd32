//! The seccomp profile `husk run` gives its containers unless asked not to
//! (`--security-opt seccomp=unconfined`), in the spirit of Docker's
//! default: system calls that a container with Docker's default
//! capabilities has no use for, and that widen the guest kernel's attack
//! surface or reach past the container, fail with EPERM; the rest is
//! allowed. Containers from a bundle (`--bundle`, the OCI runtime) get the
//! spec's own `linux.seccomp`, as under runc.
//!
//! Refused: kernel modules, kexec and reboot; setting the clocks;
//! accounting, quotas and swap; the kernel keyring; mounts and the new
//! mount API, `pivot_root`, `unshare`, `setns` and `clone` with a
//! namespace flag (a user namespace would hand the container a full
//! capability set over new namespaces); BPF and perf events; NUMA memory
//! policy; another process's memory (`process_vm_*`, `kcmp`); file
//! handles (`open_by_handle_at` reads any file of a mount); io_uring;
//! userfaultfd; the kernel log; obsolete calls. `clone3` fails with ENOSYS
//! so that the C library falls back to `clone`, whose flags a filter can
//! read; sockets of the vsock family are refused (they reach the VMM's
//! host side, which is the agent's business).

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use oci_spec::OciSpecError;

/// Refused with EPERM whatever their arguments.
const REFUSED: &[&str] = &[
    // Kernel modules, kexec, reboot.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    // Clocks.
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "stime",
    // Accounting, quotas, swap.
    "acct",
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    // The kernel keyring.
    "add_key",
    "request_key",
    "keyctl",
    // Mounts and namespaces.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    // BPF, perf events.
    "bpf",
    "perf_event_open",
    // NUMA memory policy.
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
    // Other processes' memory.
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    // File handles.
    "name_to_handle_at",
    "open_by_handle_at",
    // io_uring, userfaultfd, the kernel log, the terminal hang-up.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "syslog",
    "vhangup",
    // Obsolete or privileged I/O.
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
    "lookup_dcookie",
    "iopl",
    "ioperm",
];

/// `clone` flags that make a namespace.
const NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// `names` failing with `errno`, when argument `index` matches `op`
/// (`value`, and `value_two` for a masked compare) if given.
fn rule(
    names: &[&str],
    errno: i32,
    arg: Option<(u64, LinuxSeccompOperator, u64, u64)>,
) -> Result<LinuxSyscall, OciSpecError> {
    let mut b = LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(errno as u32);
    if let Some((index, op, value, value_two)) = arg {
        let a = LinuxSeccompArgBuilder::default()
            .index(index as usize)
            .op(op)
            .value(value)
            .value_two(value_two)
            .build()?;
        b = b.args(vec![a]);
    }
    b.build()
}

/// The profile.
pub fn profile() -> Result<LinuxSeccomp, OciSpecError> {
    let mut syscalls = vec![rule(REFUSED, libc::EPERM, None)?];
    // One rule per flag: the conditions of one rule are ANDed.
    for flag in NAMESPACE_FLAGS {
        let f = flag as u64;
        syscalls.push(rule(
            &["clone"],
            libc::EPERM,
            Some((0, LinuxSeccompOperator::ScmpCmpMaskedEq, f, f)),
        )?);
    }
    syscalls.push(rule(&["clone3"], libc::ENOSYS, None)?);
    syscalls.push(rule(
        &["socket"],
        libc::EPERM,
        Some((0, LinuxSeccompOperator::ScmpCmpEq, libc::AF_VSOCK as u64, 0)),
    )?);
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
}
