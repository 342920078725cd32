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

/// The stdout of a command that must have succeeded (else both streams
/// in the panic).
pub fn ok_output(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `c`, killing it after `timeout`.
pub fn bounded(c: &mut Command, timeout: Duration) -> Output {
    run_with_timeout(std::mem::replace(c, Command::new("true")), None, timeout)
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

/// Driving husk's runc command line directly, as a shim does.
pub mod runc_cli {
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use super::{boot_timeout, busybox_tree, husk, kernel};

    /// The test's directory; on the way out (a failed assertion included)
    /// every container under its state root is force-deleted, so no VM
    /// outlives the test.
    pub struct Scratch(pub PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let root = self.0.join("state");
            for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let _ = runc(&root)
                    .args(["delete", "--force"])
                    .arg(e.file_name())
                    .output();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// husk with the state root `root` and the test's boot timeout.
    pub fn runc(root: &Path) -> Command {
        let mut c = husk();
        c.env("HUSK_BOOT_TIMEOUT", boot_timeout().as_secs().to_string())
            .arg("--root")
            .arg(root);
        c
    }

    pub fn ok(o: &Output) -> String {
        assert!(
            o.status.success(),
            "exit {:?}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn state(root: &Path, id: &str) -> serde_json::Value {
        let o = runc(root).args(["state", id]).output().unwrap();
        serde_json::from_str(&ok(&o)).unwrap()
    }

    /// A bundle running `args` in a busybox tree.
    pub fn bundle(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let b = dir.join(name);
        std::fs::create_dir_all(&b).unwrap();
        let rootfs = busybox_tree(&b);
        assert!(rootfs.ends_with("rootfs"));
        ok(&husk().args(["spec", "--bundle"]).arg(&b).output().unwrap());
        let path = b.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["process"]["terminal"] = false.into();
        cfg["process"]["args"] = serde_json::json!(args);
        cfg["annotations"] = serde_json::json!({"test": name});
        std::fs::write(&path, cfg.to_string()).unwrap();
        b
    }

    pub struct Created {
        pub pid: i32,
        pub stdin: ChildStdin,
        pub stdout: ChildStdout,
        pub stderr: ChildStderr,
    }

    /// Starts `husk create` with stdio pipes, as a shim does.
    pub fn spawn_create(root: &Path, bundle: &Path, id: &str) -> Child {
        runc(root)
            .args(["create", "--kernel"])
            .arg(kernel())
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(bundle.join("pid"))
            .arg(id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits for `create` to exit (its pipes stay with the VMM process).
    pub fn created(mut child: Child, bundle: &Path) -> Created {
        let deadline = Instant::now() + boot_timeout() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "create did not return");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = child.stderr.take().unwrap();
        if !status.success() {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            panic!("create failed: {status}: {err}");
        }
        let pid: i32 = std::fs::read_to_string(bundle.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Created {
            pid,
            stdin: child.stdin.take().unwrap(),
            stdout: child.stdout.take().unwrap(),
            stderr,
        }
    }

    /// Reaps `pid` (a child of ours, as subreaper): its exit code, or 128+N.
    pub fn reap(pid: i32) -> i32 {
        let deadline = Instant::now() + boot_timeout();
        loop {
            let mut status = 0;
            // SAFETY: waitpid on a pid we are the (sub)reaper of.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
            if r == pid {
                if libc::WIFEXITED(status) {
                    return libc::WEXITSTATUS(status);
                }
                return 128 + libc::WTERMSIG(status);
            }
            if Instant::now() > deadline {
                // SAFETY: kill of our own child so the test ends.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the VMM process {pid} did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes the cgroup `name` (and `name/sub` for each of `subs`) from
/// every hierarchy when empty: parents that runc, podman or an earlier
/// container made and left (rmdir fails on one that is in use).
pub fn remove_empty_cgroups(name: &str, subs: &[&str]) {
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for s in subs {
            let _ = std::fs::remove_dir(h.path().join(name).join(s));
        }
        let _ = std::fs::remove_dir(h.path().join(name));
    }
}

/// The value of field `name` ("Uid:", ...) in a /proc status text.
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
}

/// A jailed VMM process as the host sees it.
pub struct Jailed {
    /// Its threads' names.
    pub threads: Vec<String>,
    /// What its root directory holds, sorted.
    pub root: Vec<String>,
}

/// Asserts that process `pid` is jailed: one uid and gid of the jail range
/// (0x70000000 and up) in every slot, and in every thread no capability
/// (effective, permitted, bounding) and a seccomp filter.
pub fn assert_jailed(pid: u32) -> Jailed {
    let proc = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let uid: Vec<u32> = status_field(&status, "Uid:")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        uid.iter().all(|u| *u == uid[0] && *u >= 0x7000_0000),
        "{status}"
    );
    assert_eq!(
        status_field(&status, "Gid:"),
        status_field(&status, "Uid:"),
        "{status}"
    );
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("{proc}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        for f in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                status_field(&status, f),
                "0000000000000000",
                "{comm}: {status}"
            );
        }
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{comm}: {status}");
        threads.push(comm.trim().to_string());
    }
    let mut root: Vec<String> = std::fs::read_dir(format!("{proc}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    Jailed { threads, root }
}
