use std::process::Command;

use super::*;

#[test]
fn ioctl_numbers_are_the_kernels() {
    // From <linux/kvm.h>: _IO(0xAE, 0x80), _IOR(0xAE, 0x81, struct
    // kvm_regs), _IOWR(0xAE, 0x85, struct kvm_translation).
    assert_eq!(KVM_RUN(), 0xAE80);
    assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
    assert_eq!(KVM_TRANSLATE(), 0xC018_AE85);
}

#[test]
fn filters_compile_and_the_vcpu_list_is_the_narrower() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Console,
        ThreadKind::Teardown,
        ThreadKind::Protocol,
    ] {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            assert!(!program(kind, mode).unwrap().is_empty());
        }
    }
    let (v, e) = (allowed(ThreadKind::Vcpu), allowed(ThreadKind::EventLoop));
    // The README and docs/threat-model.md give these: change them together.
    assert_eq!((v, e, allowed(ThreadKind::Console)), (30, 59, 29));
    assert_eq!(allowed(ThreadKind::Teardown), 34);
    assert_eq!(allowed(ThreadKind::Protocol), 52);
    let console = rules(ThreadKind::Console).unwrap();
    assert!(!console.contains_key(&libc::SYS_ioctl), "no ioctl at all");
    assert_eq!(console.len() + 1, v, "the vCPU list less ioctl");
    let no_open_no_spawn = [
        libc::SYS_socket,
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_execve,
        libc::SYS_clone,
        libc::SYS_clone3,
    ];
    refuses(ThreadKind::Vcpu, &no_open_no_spawn);
    refuses(ThreadKind::Vcpu, &[libc::SYS_connect]);
    // The teardown: no ioctl, no socket, no file opened or created.
    refuses(ThreadKind::Teardown, &no_open_no_spawn);
    refuses(ThreadKind::Teardown, &[libc::SYS_ioctl]);
    // The agent protocol: threads (clone, checked below), no process, no
    // file opened for writing, no ioctl on KVM.
    refuses(
        ThreadKind::Protocol,
        &[
            libc::SYS_execve,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_open,
            libc::SYS_kill,
            libc::SYS_mount,
            libc::SYS_unshare,
        ],
    );
    refuses(
        ThreadKind::EventLoop,
        &[
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
        ],
    );
}

/// `kind`'s filter allows none of `syscalls`.
fn refuses(kind: ThreadKind, syscalls: &[i64]) {
    let allowed = rules(kind).unwrap();
    for nr in syscalls {
        assert!(
            !allowed.contains_key(nr),
            "the {} thread may not make {nr}",
            kind.name()
        );
    }
}

#[test]
fn itoa_writes_decimal() {
    assert_eq!(itoa(0, &mut [0; 12]), b"0");
    assert_eq!(itoa(435, &mut [0; 12]), b"435");
    assert_eq!(itoa(i32::MIN, &mut [0; 12]), b"-2147483648");
}

/// Runs `child` (below) in a fresh process of this test binary, with
/// `HUSK_SECCOMP_CHILD` set to `what`.
fn in_child(what: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "seccomp::tests::child",
            "--nocapture",
        ])
        .env("HUSK_SECCOMP_CHILD", what)
        .env_remove("HUSK_SECCOMP")
        .output()
        .unwrap()
}

/// Not a test: the body `in_child` runs. It filters its thread, then makes
/// a syscall the filter refuses (socket) or allows (getpid).
#[test]
#[ignore = "run by the seccomp tests in a child process"]
fn child() {
    let Ok(what) = std::env::var("HUSK_SECCOMP_CHILD") else {
        return;
    };
    if let Some(then) = what.strip_prefix("agent-protocol-") {
        return protocol_child(then);
    }
    let (kind, mode) = match what.as_str() {
        "vcpu" => (ThreadKind::Vcpu, SeccompMode::On),
        "event-loop" => (ThreadKind::EventLoop, SeccompMode::On),
        _ => (ThreadKind::Vcpu, SeccompMode::Log),
    };
    install(kind, mode).unwrap();
    // SAFETY: getpid has no arguments; socket returns an fd or -1.
    let (pid, fd) = unsafe {
        (
            libc::syscall(libc::SYS_getpid),
            libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
        )
    };
    assert!(pid > 0);
    println!("survived: socket returned {fd}");
}

#[test]
fn a_forbidden_syscall_ends_the_process_with_one_line() {
    for (kind, name) in [("vcpu", "vcpu"), ("event-loop", "event-loop")] {
        let out = in_child(kind);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(SIGSYS_EXIT), "{err}");
        let want = format!(
            "husk: seccomp: the {name} thread made syscall {}, which its filter does not allow",
            libc::SYS_socket
        );
        assert!(err.contains(&want), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
    }
}

/// Under the agent-protocol filter: a thread starts (clone3 refused with
/// ENOSYS, glibc falls back to clone with CLONE_THREAD) and reads a file;
/// then `then`: a fork (clone without CLONE_THREAD) or creating a file,
/// either of which ends the process.
fn protocol_child(then: &str) {
    install(ThreadKind::Protocol, SeccompMode::On).unwrap();
    let t = std::thread::spawn(|| std::fs::read_to_string("/proc/self/status").map(|s| s.len()));
    let read = t.join().unwrap().unwrap();
    assert!(read > 0);
    println!("a thread ran and read {read} bytes");
    if then == "create" {
        let file = std::env::temp_dir().join(format!("husk-seccomp-{}", std::process::id()));
        let created = std::fs::File::create(&file);
        println!("survived: create {}", created.is_ok());
        return;
    }
    // SAFETY: fork(2); the child (if any) exits at once.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit in the forked child.
        unsafe { libc::_exit(0) };
    }
    println!("survived: fork returned {pid}");
}

#[test]
fn the_agent_protocol_thread_starts_threads_but_no_process() {
    for (then, nr) in [("fork", libc::SYS_clone), ("create", libc::SYS_openat)] {
        let out = in_child(&format!("agent-protocol-{then}"));
        let (stdout, err) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(stdout.contains("a thread ran and read"), "{stdout}\n{err}");
        assert!(!stdout.contains("survived"), "{then}: {stdout}");
        assert_eq!(out.status.code(), Some(SIGSYS_EXIT), "{stdout}\n{err}");
        let want = format!("husk: seccomp: the agent-protocol thread made syscall {nr},");
        assert!(err.contains(&want), "{then}: {err}");
    }
}

#[test]
fn log_mode_lets_a_refused_syscall_through() {
    let out = in_child("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("survived: socket returned"), "{stdout}");
    assert!(!stdout.contains("returned -1"), "{stdout}");
}

#[test]
fn husk_seccomp_overrides_the_configured_mode() {
    // Read in a child: the variable is process-wide.
    let run = |v: &str| {
        Command::new("env")
            .arg(format!("HUSK_SECCOMP={v}"))
            .arg(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "seccomp::tests::env_child",
                "--nocapture",
            ])
            .env("HUSK_SECCOMP_ENV_CHILD", "1")
            .output()
            .unwrap()
    };
    for (v, want) in [("off", "Ok(Off)"), ("log", "Ok(Log)"), ("on", "Ok(On)")] {
        let out = run(v);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("mode={want}")));
    }
    let out = run("yes");
    assert!(String::from_utf8_lossy(&out.stdout).contains("invalid HUSK_SECCOMP \"yes\""));
}

#[test]
#[ignore = "run by husk_seccomp_overrides_the_configured_mode in a child process"]
fn env_child() {
    if std::env::var_os("HUSK_SECCOMP_ENV_CHILD").is_none() {
        return;
    }
    match SeccompMode::On.or_env() {
        Ok(m) => println!("mode=Ok({m:?})"),
        Err(e) => println!("mode={e}"),
    }
}
