//! The guest kernel keeps every feature the agent and the runtime depend on,
//! and none of the options known to hang or stop a guest on kvm_pvm. Boot
//! time is won by trimming the config (resources/guest/kernel.config); this
//! test is what keeps a trim from silently breaking containers. It checks
//! the fragment and the built kernel's full config (next to the vmlinux).

mod support;

/// (option, who needs it).
const REQUIRED: &[(&str, &str)] = &[
    ("CONFIG_64BIT", "the boot protocol husk implements"),
    ("CONFIG_SMP", "--vcpus above 1"),
    (
        "CONFIG_X86_MPPARSE",
        "CPUs and the IO-APIC come from husk's MP table",
    ),
    ("CONFIG_KVM_GUEST", "kvm-clock"),
    (
        "CONFIG_PVH",
        "QEMU microvm in the benchmarks boots the same vmlinux",
    ),
    (
        "CONFIG_BLK_DEV_INITRD",
        "husk vm --initrd and the benchmarks' busybox initramfs",
    ),
    ("CONFIG_BINFMT_ELF", "every program"),
    ("CONFIG_BINFMT_SCRIPT", "#! entrypoints"),
    ("CONFIG_SERIAL_8250_CONSOLE", "console.log and error tails"),
    ("CONFIG_VIRTIO_MMIO", "every virtio device"),
    (
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "husk declares devices on the command line",
    ),
    ("CONFIG_VIRTIO_BLK", "image root disks, --disk"),
    ("CONFIG_VIRTIO_NET", "container networking"),
    ("CONFIG_VSOCKETS", "the agent's control and stdio ports"),
    (
        "CONFIG_VIRTIO_VSOCKETS",
        "the agent's control and stdio ports",
    ),
    ("CONFIG_FUSE_FS", "virtio-fs shares"),
    ("CONFIG_VIRTIO_FS", "shared rootfs and -v volumes"),
    ("CONFIG_EXT4_FS", "image root disks"),
    (
        "CONFIG_OVERLAY_FS",
        "writable layer over a read-only image disk",
    ),
    ("CONFIG_TMPFS", "/run, /tmp, /dev/shm, overlay uppers"),
    ("CONFIG_TMPFS_XATTR", "overlay upper directories on tmpfs"),
    ("CONFIG_DEVTMPFS", "/dev"),
    ("CONFIG_PROC_FS", "/proc"),
    ("CONFIG_SYSFS", "/sys"),
    ("CONFIG_UNIX98_PTYS", "terminals (-t, --console-socket)"),
    ("CONFIG_NAMESPACES", "OCI namespaces"),
    ("CONFIG_UTS_NS", "hostname"),
    ("CONFIG_IPC_NS", "ipc namespace"),
    ("CONFIG_PID_NS", "pid namespace"),
    ("CONFIG_NET_NS", "network namespace"),
    ("CONFIG_USER_NS", "user namespaces in the spec"),
    ("CONFIG_CGROUPS", "resource limits"),
    ("CONFIG_MEMCG", "memory limits and OOM events"),
    ("CONFIG_CGROUP_PIDS", "pids limit"),
    ("CONFIG_CPUSETS", "cpuset"),
    ("CONFIG_CFS_BANDWIDTH", "CPU quota"),
    ("CONFIG_CGROUP_FREEZER", "pause/resume"),
    ("CONFIG_CGROUP_DEVICE", "device rules"),
    ("CONFIG_CGROUP_CPUACCT", "CPU stats"),
    ("CONFIG_SECCOMP_FILTER", "the container's seccomp profile"),
    ("CONFIG_SYSVIPC", "/dev/mqueue and IPC in containers"),
    ("CONFIG_POSIX_MQUEUE", "the OCI default mqueue mount"),
    ("CONFIG_UNIX", "unix sockets"),
    ("CONFIG_INET", "TCP/IP"),
    ("CONFIG_FUTEX", "threads"),
    ("CONFIG_EPOLL", "the agent's event loops"),
    ("CONFIG_SIGNALFD", "the agent's reaper"),
    ("CONFIG_TIMERFD", "programs in containers"),
    ("CONFIG_EVENTFD", "programs in containers"),
    ("CONFIG_INOTIFY_USER", "programs in containers"),
    ("CONFIG_MULTIUSER", "uid/gid of the container process"),
];

/// (option, why it must stay off).
const FORBIDDEN: &[(&str, &str)] = &[
    (
        "CONFIG_PTP_1588_CLOCK_KVM",
        "its hypercall spins forever on kvm_pvm",
    ),
    ("CONFIG_PARAVIRT_SPINLOCKS", "hypercalls"),
    (
        "CONFIG_JUMP_LABEL",
        "run-time int3 patching (no int3 on kvm_pvm)",
    ),
    ("CONFIG_LEGACY_PTYS", "pty_init cost 37 s on kvm_pvm"),
    (
        "CONFIG_MODULES",
        "nothing loads modules; the kernel is built in one piece",
    ),
];

fn enabled(config: &str, option: &str) -> bool {
    config.lines().any(|l| l.trim() == format!("{option}=y"))
}

fn check(name: &str, config: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for (opt, why) in REQUIRED {
        if !enabled(config, opt) {
            bad.push(format!("{name}: {opt} is not =y (needed for {why})"));
        }
    }
    for (opt, why) in FORBIDDEN {
        if enabled(config, opt) {
            bad.push(format!("{name}: {opt} is on ({why})"));
        }
    }
    bad
}

#[test]
fn fragment_keeps_what_containers_need() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../resources/guest/kernel.config"
    );
    let text = std::fs::read_to_string(path).unwrap();
    // The fragment sits on top of tinyconfig, which has these off already.
    let bad: Vec<String> = check("kernel.config", &text)
        .into_iter()
        .filter(|b| !b.contains(" is on "))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn built_kernel_keeps_what_containers_need() {
    let vmlinux = std::fs::canonicalize(support::kernel()).unwrap();
    let config_path = vmlinux.with_file_name("config");
    let text = std::fs::read_to_string(&config_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (tools/build-guest-kernel stores the full config next to the vmlinux)",
            config_path.display()
        )
    });
    let bad = check(&config_path.display().to_string(), &text);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // The detector is not vacuous: an option the kernel lacks is reported.
    assert!(!check("x", "CONFIG_64BIT=y\n").is_empty());
    assert!(enabled(&text, "CONFIG_VIRTIO_FS"));
}
