//! Helpers for tests that run the husk binary.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The husk binary under test.
pub fn husk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_husk"))
}

/// The guest kernel for real-guest tests: $HUSK_TEST_KERNEL, else the one
/// tools/build-guest-kernel installed.
pub fn kernel() -> std::path::PathBuf {
    let k = std::env::var_os("HUSK_TEST_KERNEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(husk_vmm::default_kernel_path);
    assert!(
        k.exists(),
        "guest kernel {} missing: build it with tools/build-guest-kernel (or set HUSK_TEST_KERNEL)",
        k.display()
    );
    k
}

/// Seconds one real-guest boot may take. Guests are slow on kvm_pvm hosts
/// (guest kernel code is emulated); set HUSK_TEST_BOOT_TIMEOUT to change.
pub fn boot_timeout() -> Duration {
    let s = std::env::var("HUSK_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(s)
}

/// Runs `cmd` with `stdin` bytes, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn husk");
    if let Some(data) = stdin {
        use std::io::Write;
        let mut s = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&data);
        });
    }
    let out = drain(&mut child);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let (stdout, stderr) = out.join().unwrap();
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = out.join().unwrap();
            panic!(
                "husk did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drain(child: &mut Child) -> std::thread::JoinHandle<(Vec<u8>, Vec<u8>)> {
    let mut o = child.stdout.take().unwrap();
    let mut e = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let t = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = e.read_to_end(&mut b);
            b
        });
        let mut b = Vec::new();
        let _ = o.read_to_end(&mut b);
        (b, t.join().unwrap())
    })
}

/// Asserts a user error: exit code 1 and exactly one line on stderr
/// containing `needle`.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err:?}");
    assert!(lines[0].starts_with("husk: "), "{err}");
    assert!(lines[0].contains(needle), "want {needle:?} in {err:?}");
}

/// A busybox root filesystem: /bin/busybox plus an applet link per command.
pub fn busybox_tree(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    root
}

/// A script that runs the husk under test with the test's kernel, agent
/// and boot timeout: containerd's shim and dockerd pass no environment
/// through to the runtime binary.
pub fn runtime_wrapper(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let agent = husk_runtime::paths::agent_binary(None).expect("agent: run tools/build-agent");
    let wrapper = dir.join("husk-runtime");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec env HUSK_BOOT_TIMEOUT={} HUSK_AGENT={} HUSK_KERNEL={} {} \"$@\"\n",
            boot_timeout().as_secs(),
            agent.display(),
            kernel().display(),
            env!("CARGO_BIN_EXE_husk")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// Pids of the processes whose command line contains `needle`.
pub fn pids_naming(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Lazily unmounts every mount below `dir` (a container engine's overlay
/// and namespace mounts), deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let c = std::ffi::CString::new(t).unwrap();
        // SAFETY: umount2(2) of a path under the test's directory.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A network namespace of the test's own (`ip netns add`), deleted when
/// dropped: container engines started in it keep their bridges and
/// iptables rules off the host's.
pub struct TestNetns(pub String);

impl TestNetns {
    pub fn new(tag: &str) -> Self {
        let name = format!("husk-{tag}-{}", std::process::id());
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(o.status.success(), "ip netns add: {o:?}");
        TestNetns(name)
    }

    /// `nsenter` into the namespace, running `program`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0)).arg(program);
        c
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
