//! Host-side unit tests of everything pure in container setup.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources, PosixRlimitType, Spec};
use serde_json::json;

use super::caps::{cap_number, LAST_KNOWN_CAP};
use super::cgroup::{
    device_rules, flat_keyed, resource_writes, shares_to_weight, CgroupSystem, CgroupWrite,
};
use super::mounts::{parse_mount_options, propagation_flag, secure_join};
use super::plan::*;

fn spec(json: serde_json::Value) -> Spec {
    let mut base = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
        "root": {"path": "rootfs"},
    });
    merge(&mut base, json);
    serde_json::from_value(base).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn mount_options_set_and_clear_flags() {
    let o = parse_mount_options(&strings(&[
        "nosuid",
        "noexec",
        "nodev",
        "ro",
        "mode=755",
        "size=65536k",
    ]))
    .unwrap();
    assert_eq!(
        o.flags,
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV | libc::MS_RDONLY
    );
    assert_eq!(o.data, "mode=755,size=65536k");
    assert!(!o.bind && o.propagation.is_empty());

    let o = parse_mount_options(&strings(&["ro", "rw", "suid", "nosuid", "exec"])).unwrap();
    assert_eq!(o.flags, libc::MS_NOSUID);

    let o = parse_mount_options(&strings(&[
        "rbind",
        "rprivate",
        "ro",
        "x-systemd.automount",
    ]))
    .unwrap();
    assert_eq!(o.flags, libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY);
    assert!(o.bind);
    assert_eq!(o.propagation, vec![libc::MS_PRIVATE | libc::MS_REC]);
    assert_eq!(o.data, "");

    let o = parse_mount_options(&strings(&[
        "newinstance",
        "ptmxmode=0666",
        "mode=0620",
        "gid=5",
    ]))
    .unwrap();
    assert_eq!(o.flags, 0);
    assert_eq!(o.data, "newinstance,ptmxmode=0666,mode=0620,gid=5");

    assert!(parse_mount_options(&strings(&["idmap"]))
        .unwrap_err()
        .contains("idmap"));
    assert_eq!(
        propagation_flag("rslave"),
        Some(libc::MS_SLAVE | libc::MS_REC)
    );
    assert_eq!(propagation_flag("bogus"), None);
}

#[test]
fn exit_status_mapping() {
    // Encoded the way the kernel does: exit code << 8, or the signal.
    assert_eq!(exit_code_from_wait(0), (0, None));
    assert_eq!(exit_code_from_wait(3 << 8), (3, None));
    assert_eq!(exit_code_from_wait(127 << 8), (127, None));
    assert_eq!(exit_code_from_wait(libc::SIGKILL), (137, Some(9)));
    assert_eq!(exit_code_from_wait(libc::SIGTERM), (143, Some(15)));
    // Core dumped: the 0x80 bit.
    assert_eq!(exit_code_from_wait(libc::SIGSEGV | 0x80), (139, Some(11)));
}

#[test]
fn exec_failure_codes_and_messages() {
    let (code, msg) = exec_failure("nosuch", false, libc::ENOENT);
    assert_eq!(code, 127);
    assert_eq!(msg, "exec: \"nosuch\": executable file not found in $PATH");
    let (code, msg) = exec_failure("/bin/nosuch", true, libc::ENOENT);
    assert_eq!(code, 127);
    assert_eq!(msg, "exec: \"/bin/nosuch\": no such file or directory");
    let (code, msg) = exec_failure("/etc/passwd", true, libc::EACCES);
    assert_eq!(code, 126);
    assert_eq!(msg, "exec: \"/etc/passwd\": permission denied");
    assert_eq!(exec_failure("x", true, libc::ENOEXEC).0, 126);
    assert_eq!(exec_failure("x", false, libc::ENOTDIR).0, 127);
}

#[test]
fn path_lookup() {
    let env = strings(&["HOME=/", "PATH=/usr/bin:/bin"]);
    assert_eq!(
        exec_candidates("ls", &env),
        vec![PathBuf::from("/usr/bin/ls"), PathBuf::from("/bin/ls")]
    );
    assert_eq!(exec_candidates("./run", &env), vec![PathBuf::from("./run")]);
    assert_eq!(
        exec_candidates("/bin/sh", &[]),
        vec![PathBuf::from("/bin/sh")]
    );
    let default: Vec<PathBuf> = DEFAULT_PATH
        .split(':')
        .map(|d| Path::new(d).join("sh"))
        .collect();
    assert_eq!(exec_candidates("sh", &[]), default);
    // An empty PATH entry is the current directory; the last PATH wins.
    let env = strings(&["PATH=/a", "PATH=/x::/y"]);
    assert_eq!(
        exec_candidates("t", &env),
        vec![
            PathBuf::from("/x/t"),
            PathBuf::from("./t"),
            PathBuf::from("/y/t")
        ]
    );
}

#[test]
fn capability_names() {
    assert_eq!(cap_number("CAP_CHOWN"), Some(0));
    assert_eq!(cap_number("chown"), Some(0));
    assert_eq!(cap_number("CAP_SYS_ADMIN"), Some(21));
    assert_eq!(cap_number("NET_BIND_SERVICE"), Some(10));
    assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(40));
    assert_eq!(cap_number("CAP_BOGUS"), None);
    assert_eq!(LAST_KNOWN_CAP, 40);
    // Every capability oci-spec knows maps to a number.
    for name in [
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "AUDIT_WRITE",
        "BLOCK_SUSPEND",
        "BPF",
        "CHECKPOINT_RESTORE",
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "IPC_OWNER",
        "KILL",
        "LEASE",
        "LINUX_IMMUTABLE",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "MKNOD",
        "NET_ADMIN",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "PERFMON",
        "SETGID",
        "SETFCAP",
        "SETPCAP",
        "SETUID",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_CHROOT",
        "SYS_MODULE",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "SYSLOG",
        "WAKE_ALARM",
    ] {
        let cap: oci_spec::runtime::Capability =
            serde_json::from_value(serde_json::json!(name)).unwrap();
        assert_eq!(cap_number(&cap.to_string()), cap_number(name), "{name}");
        assert!(cap_number(name).is_some(), "{name}");
    }
}

#[test]
fn rlimit_names() {
    assert_eq!(
        rlimit_resource(PosixRlimitType::RlimitNofile),
        libc::RLIMIT_NOFILE as i32
    );
    assert_eq!(
        rlimit_resource(PosixRlimitType::RlimitCore),
        libc::RLIMIT_CORE as i32
    );
    assert_eq!(
        rlimit_resource(PosixRlimitType::RlimitRttime),
        libc::RLIMIT_RTTIME as i32
    );
    let s = spec(serde_json::json!({"process": {"rlimits": [
        {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
        {"type": "RLIMIT_NPROC", "soft": 10, "hard": 10},
    ]}}));
    let plan = plan_container(&s, 40).unwrap();
    assert_eq!(
        plan.process.rlimits,
        vec![
            (libc::RLIMIT_NOFILE as i32, 1024, 4096),
            (libc::RLIMIT_NPROC as i32, 10, 10)
        ]
    );
    let bad = spec(serde_json::json!({"process": {"rlimits": [
        {"type": "RLIMIT_NOFILE", "soft": 10, "hard": 1},
    ]}}));
    assert!(matches!(
        plan_container(&bad, 40),
        Err(PlanError::Invalid(_))
    ));
    // Unknown rlimit names are rejected by the spec parser.
    let r: Result<Spec, _> = serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/",
                    "rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]},
    }));
    assert!(r.is_err());
}

#[test]
fn spec_to_plan() {
    let s = spec(serde_json::json!({
        "hostname": "box",
        "process": {
            "args": ["echo", "hi"],
            "env": ["PATH=/bin", "A=b"],
            "cwd": "/work/../tmp/./x",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 18},
            "terminal": true,
            "consoleSize": {"height": 40, "width": 120},
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
                              "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []},
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "uts"}, {"type": "ipc"},
                           {"type": "network", "path": "/var/run/netns/x"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "sysctl": {"net.ipv4.ip_forward": "1"},
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
        },
    }));
    let plan = plan_container(&s, 40).unwrap();
    assert_eq!(
        plan.clone_flags,
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
    );
    assert_eq!(plan.shared_namespaces, vec!["net".to_string()]);
    assert_eq!(plan.hostname.as_deref(), Some("box"));
    assert_eq!(plan.mounts.len(), 3);
    assert!(plan.mounts[2].is_bind() && !plan.mounts[1].is_bind());
    assert!(!plan.dev_is_bind() && plan.mounts_at("/dev"));
    assert_eq!(plan.masked_paths, vec![PathBuf::from("/proc/kcore")]);
    assert_eq!(
        plan.sysctls,
        vec![(PathBuf::from("net/ipv4/ip_forward"), "1".to_string())]
    );
    assert_eq!(plan.devices[0].major, 10);
    assert_eq!(plan.devices[0].kind, libc::S_IFCHR);
    assert_eq!(plan.devices[0].mode, 0o666);

    let p = &plan.process;
    assert_eq!(p.args.len(), 2);
    assert_eq!(
        p.exec_candidates,
        vec![std::ffi::CString::new("/bin/echo").unwrap()]
    );
    assert_eq!(p.cwd, PathBuf::from("/tmp/x"));
    assert_eq!(
        (p.uid, p.gid, p.additional_gids.clone(), p.umask),
        (1000, 100, vec![5, 6], Some(18))
    );
    assert!(p.terminal && p.no_new_privs);
    assert_eq!(p.console_size, Some((40, 120)));
    let caps = p.caps.unwrap();
    assert_eq!(caps.bounding, (1 << 5) | 1);
    assert_eq!(caps.effective, 1 << 5);
    assert_eq!(caps.inheritable, 0);
}

#[test]
fn bad_specs_are_rejected() {
    let cases = [
        (serde_json::json!({"process": {"args": []}}), "args"),
        (serde_json::json!({"process": {"cwd": "relative"}}), "cwd"),
        (
            serde_json::json!({"process": {"env": ["NOEQUALS"]}}),
            "KEY=VALUE",
        ),
        (serde_json::json!({"hostname": "x"}), "uts"),
        (
            serde_json::json!({"mounts": [{"destination": "rel", "type": "tmpfs"}]}),
            "absolute",
        ),
        (
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "pid"}]}}),
            "twice",
        ),
        (
            serde_json::json!({"linux": {"sysctl": {"../../etc": "x"}}}),
            "sysctl",
        ),
        (
            serde_json::json!({"linux": {"rootfsPropagation": "sideways"}}),
            "rootfsPropagation",
        ),
    ];
    for (json, needle) in cases {
        let e = plan_container(&spec(json.clone()), 40).unwrap_err();
        assert!(matches!(e, PlanError::Invalid(_)), "{json}: {e}");
        assert!(e.to_string().contains(needle), "{json}: {e}");
    }
    let user_ns = spec(serde_json::json!({"linux": {"namespaces": [{"type": "user"}]}}));
    assert!(matches!(
        plan_container(&user_ns, 40),
        Err(PlanError::Unsupported(_))
    ));
    // A capability the guest kernel lacks.
    let s = spec(serde_json::json!({"process": {"capabilities": {"bounding": ["CAP_BPF"]}}}));
    let e = plan_container(&s, 37).unwrap_err();
    assert!(e.to_string().contains("CAP_BPF"), "{e}");
    let mut no_process = Spec::default();
    no_process.set_process(None);
    assert!(plan_container(&no_process, 40).is_err());
}

#[test]
fn default_spec_plans() {
    // oci-spec's default is what `runc spec` writes.
    let plan = plan_container(&Spec::default(), 40).unwrap();
    assert!(plan.clone_flags & libc::CLONE_NEWNET != 0);
    assert!(plan.clone_flags & libc::CLONE_NEWCGROUP != 0);
    assert!(plan.mounts_at("/dev/pts"));
}

#[test]
fn normalize_and_sysctl_paths() {
    assert_eq!(
        normalize(Path::new("/a/../../b/./c")),
        PathBuf::from("/b/c")
    );
    assert_eq!(normalize(Path::new("/")), PathBuf::from("/"));
    assert_eq!(
        sysctl_path("kernel.shmmax").unwrap(),
        PathBuf::from("kernel/shmmax")
    );
    assert!(sysctl_path("").is_err() && sysctl_path(".x").is_err() && sysctl_path("a..b").is_err());
}

fn resources(json: serde_json::Value) -> LinuxResources {
    serde_json::from_value(json).unwrap()
}

fn files(w: &[CgroupWrite]) -> Vec<(&str, &str)> {
    w.iter()
        .map(|w| (w.file.as_str(), w.value.as_str()))
        .collect()
}

#[test]
fn cgroup_v2_values() {
    let r = resources(serde_json::json!({
        "memory": {"limit": 67108864, "swap": 134217728, "reservation": 1048576},
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
        "pids": {"limit": 64},
        "unified": {"io.weight": "50"},
    }));
    let w = resource_writes(true, &r).unwrap();
    assert_eq!(
        files(&w),
        vec![
            ("memory.max", "67108864"),
            ("memory.swap.max", "67108864"),
            ("memory.low", "1048576"),
            ("cpu.weight", "39"),
            ("cpu.max", "50000 100000"),
            ("pids.max", "64"),
            ("io.weight", "50"),
        ]
    );
    assert!(w[1].optional && !w[0].optional);

    let r = resources(serde_json::json!({
        "memory": {"limit": -1, "swap": -1}, "cpu": {"period": 20000}, "pids": {"limit": 0},
    }));
    assert_eq!(
        files(&resource_writes(true, &r).unwrap()),
        vec![
            ("memory.max", "max"),
            ("memory.swap.max", "max"),
            ("cpu.max", "max 20000"),
            ("pids.max", "max")
        ]
    );
    let bad = resources(serde_json::json!({"memory": {"limit": 100, "swap": 50}}));
    assert!(resource_writes(true, &bad).is_err());
    let bad = resources(serde_json::json!({"unified": {"../x": "1"}}));
    assert!(resource_writes(true, &bad).is_err());
}

#[test]
fn cgroup_v1_values() {
    let r = resources(serde_json::json!({
        "memory": {"limit": 67108864, "swap": 134217728, "swappiness": 10},
        "cpu": {"shares": 512, "quota": 25000, "period": 50000},
        "pids": {"limit": 10},
    }));
    assert_eq!(
        files(&resource_writes(false, &r).unwrap()),
        vec![
            ("memory.limit_in_bytes", "67108864"),
            ("memory.memsw.limit_in_bytes", "134217728"),
            ("memory.swappiness", "10"),
            ("cpu.shares", "512"),
            ("cpu.cfs_period_us", "50000"),
            ("cpu.cfs_quota_us", "25000"),
            ("pids.max", "10"),
        ]
    );
    let unified = resources(serde_json::json!({"unified": {"io.weight": "1"}}));
    assert!(resource_writes(false, &unified).is_err());
    assert!(resource_writes(false, &resources(serde_json::json!({})))
        .unwrap()
        .is_empty());
}

#[test]
fn cpu_shares_to_weight() {
    assert_eq!(shares_to_weight(2), 1);
    assert_eq!(shares_to_weight(262_144), 10_000);
    assert_eq!(shares_to_weight(1024), 39);
    assert_eq!(shares_to_weight(0), 1);
}

#[test]
fn cgroup_detection() {
    let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
38 31 0:35 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    let own = "8:pids:/\n7:devices:/box\n4:memory:/box/a\n1:cpu,cpuacct:/\n0::/\n";
    let sys = CgroupSystem::from_proc(hybrid, own).unwrap();
    let CgroupSystem::V1(dirs) = sys else {
        panic!("expected v1");
    };
    assert!(dirs.contains(&(
        "memory".into(),
        PathBuf::from("/sys/fs/cgroup/memory/box/a")
    )));
    assert!(dirs.contains(&("cpu".into(), PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))));
    assert!(dirs.contains(&(
        "cpuacct".into(),
        PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
    )));
    assert!(dirs.contains(&(
        "devices".into(),
        PathBuf::from("/sys/fs/cgroup/devices/box")
    )));
    assert_eq!(dirs.len(), 5);

    let v2 = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
    assert_eq!(
        CgroupSystem::from_proc(v2, "0::/\n"),
        Some(CgroupSystem::V2(PathBuf::from("/sys/fs/cgroup"), None))
    );
    // The guest: cgroup2, and a v1 hierarchy for the devices controller
    // alone (which v2 has no files for); v2 stays in charge.
    let guest = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                 31 23 0:28 / /run/cgroup-devices rw - cgroup cgroup rw,devices\n";
    assert_eq!(
        CgroupSystem::from_proc(guest, "1:devices:/\n0::/\n"),
        Some(CgroupSystem::V2(
            PathBuf::from("/sys/fs/cgroup"),
            Some(PathBuf::from("/run/cgroup-devices"))
        ))
    );
    // Inside a cgroup namespace-like mount whose root is the own path.
    let nested = "30 23 0:27 /agent /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        CgroupSystem::from_proc(nested, "0::/agent/sub\n"),
        Some(CgroupSystem::V2(PathBuf::from("/sys/fs/cgroup/sub"), None))
    );
    assert_eq!(CgroupSystem::from_proc("", "0::/\n"), None);
}

#[test]
fn flat_keyed_files() {
    let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n";
    assert_eq!(flat_keyed(events, "oom_kill"), Some(2));
    assert_eq!(flat_keyed(events, "oom"), Some(3));
    let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
    assert_eq!(flat_keyed(v1, "oom_kill"), Some(1));
    assert_eq!(flat_keyed(v1, "missing"), None);
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("husk-agent-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn secure_join_stays_inside_the_root() {
    let t = TempDir::new("securejoin");
    let root = &t.0;
    fs::create_dir_all(root.join("etc/real")).unwrap();
    symlink("/etc/real", root.join("abs")).unwrap();
    symlink("../../../../outside", root.join("etc/rel")).unwrap();
    symlink("loop2", root.join("loop1")).unwrap();
    symlink("loop1", root.join("loop2")).unwrap();
    assert_eq!(
        secure_join(root, Path::new("/abs/x")).unwrap(),
        root.join("etc/real/x")
    );
    assert_eq!(
        secure_join(root, Path::new("/etc/rel/y")).unwrap(),
        root.join("outside/y")
    );
    assert_eq!(
        secure_join(root, Path::new("/../../etc")).unwrap(),
        root.join("etc")
    );
    assert_eq!(
        secure_join(root, Path::new("/new/dir")).unwrap(),
        root.join("new/dir")
    );
    let e = secure_join(root, Path::new("/loop1")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
}

#[test]
fn device_rules_deny_all_then_the_spec_then_the_defaults() {
    let rules: Vec<LinuxDeviceCgroup> = serde_json::from_value(json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rw"},
        {"allow": false, "type": "b", "major": 8, "access": "m"},
        {"allow": true, "type": "p"},
    ]))
    .unwrap();
    let dev = |kind, major, minor| DevicePlan {
        path: "/dev/x".into(),
        kind,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    };
    let r = device_rules(
        &rules,
        &[dev(libc::S_IFBLK, 253, 1), dev(libc::S_IFIFO, 0, 0)],
    )
    .unwrap();
    let lines: Vec<String> = r
        .iter()
        .map(|r| format!("{} {}", if r.allow { "allow" } else { "deny" }, r.rule))
        .collect();
    assert_eq!(
        lines[..4],
        ["deny a", "deny a", "allow c 10:200 rw", "deny b 8:* m"]
    );
    assert!(lines.contains(&"allow c 1:3 rwm".to_owned()), "{lines:?}");
    assert!(lines.contains(&"allow c 136:* rwm".to_owned()), "{lines:?}");
    assert_eq!(lines.last().unwrap(), "allow b 253:1 rwm");
    assert!(device_rules(
        &serde_json::from_value::<Vec<_>>(json!([{"allow": true, "access": "rwx"}])).unwrap(),
        &[]
    )
    .unwrap_err()
    .contains("rwx"));
}

#[test]
fn platform_glibc_tunables_join_the_process_s_own() {
    let env_of = |env: serde_json::Value| {
        let mut plan = plan_container(&spec(json!({"process": {"env": env}})), 40).unwrap();
        plan.process
            .add_glibc_tunables("glibc.cpu.hwcaps=-AVX,-AVX2:glibc.malloc.check=0");
        plan.process
            .env
            .iter()
            .map(|e| e.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        env_of(json!(["A=1"])),
        [
            "A=1",
            "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2:glibc.malloc.check=0"
        ]
    );
    // Appended to the process's own; a name it sets itself stays its own.
    assert_eq!(
        env_of(json!(["GLIBC_TUNABLES=glibc.malloc.check=3", "B=2"])),
        [
            "GLIBC_TUNABLES=glibc.malloc.check=3:glibc.cpu.hwcaps=-AVX,-AVX2",
            "B=2"
        ]
    );
    assert_eq!(
        env_of(json!([
            "GLIBC_TUNABLES=glibc.cpu.hwcaps=AVX2:glibc.malloc.check=1"
        ])),
        ["GLIBC_TUNABLES=glibc.cpu.hwcaps=AVX2:glibc.malloc.check=1"]
    );
    assert_eq!(
        env_of(json!(["GLIBC_TUNABLES="])),
        ["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2:glibc.malloc.check=0"]
    );
}

#[test]
fn creates_beside_a_removal_of_the_last_sibling_succeed() {
    // Removing a container's cgroup also removes the shared `husk/` parent
    // when it is left empty; a create at that moment (between the two
    // mkdirs of `husk/NAME`) must not fail for want of the parent.
    let dir = std::env::temp_dir().join(format!("husk-cgroup-race-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let sys = CgroupSystem::V1(vec![("x".into(), dir.clone())]);
    std::thread::scope(|s| {
        for name in ["a", "b"] {
            let sys = &sys;
            s.spawn(move || {
                for i in 0..3000 {
                    match sys.create(name) {
                        Ok(c) => c.remove(),
                        Err(e) => panic!("create {name} #{i}: {e}"),
                    }
                }
            });
        }
    });
    assert!(!dir.join("husk").exists());
    fs::remove_dir(&dir).unwrap();
}
