//! `husk run` and the guest agent end to end: real guest kernel, the static
//! agent as PID 1, virtio-blk root, vsock. Boots are expensive on kvm_pvm
//! hosts, so one sandbox serves every process-level check (as execs in one
//! container) and only two checks need `husk run` itself.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::{Exec, ProcessRef, Signal, StreamHello, StreamKind, PROTOCOL_VERSION};
use husk_runtime::sandbox::{Sandbox, SandboxConfig};
use support::{boot_timeout, busybox_tree, husk, run_with_timeout};

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scratch(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("husk-run-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// `husk run` with a private HUSK_ROOT (image cache, run dirs), the test
/// kernel (`HUSK_TEST_KERNEL`, else the installed one) and the installed
/// agent.
fn husk_run(dir: &Path, rootfs: &Path) -> Command {
    let agent = husk_runtime::paths::agent_binary(None).expect("agent: run tools/build-agent");
    let mut c = husk();
    c.env("HUSK_BOOT_TIMEOUT", boot_timeout().as_secs().to_string())
        .env("HUSK_ROOT", dir.join("root"))
        .arg("run")
        .arg("--kernel")
        .arg(support::kernel())
        .arg("--agent")
        .arg(agent)
        .arg("--rootfs")
        .arg(rootfs);
    c
}

#[test]
fn run_relays_stdio_env_cwd_user_and_the_exit_code() {
    let dir = scratch("cli");
    let rootfs = busybox_tree(&dir.0);
    let mut c = husk_run(&dir.0, &rootfs);
    // Booted cold: the timing line then has every stage (a restored
    // template's is checked in template_guest.rs). Profiled as `husk bench
    // profile --container` does: the jailed VM process writes the samples.
    let samples = dir.0.join("samples");
    c.env("HUSK_PROFILE", format!("{}:200", samples.display()));
    c.args(["--timing", "--no-template", "-e", "FOO=bar", "-w", "/tmp", "-u", "1000:1001", "--"])
        .args(["sh", "-c", "echo to-stdout; echo to-stderr >&2; echo \"env=$FOO cwd=$(pwd) id=$(id -u):$(id -g) host=$(hostname)\"; echo \"$(grep Seccomp: /proc/self/status | tr -d ' \\t') $(unshare -U true 2>/dev/null && echo userns || echo no-userns)\"; exit 3"]);
    let out = run_with_timeout(c, None, boot_timeout() * 2);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // husk's default seccomp profile: a filter, and no user namespace
    // (which the guest kernel would otherwise give any user).
    assert_eq!(
        stdout,
        "to-stdout\nenv=bar cwd=/tmp id=1000:1001 host=husk\nSeccomp:2 no-userns\n"
    );
    assert!(stderr.contains("to-stderr\n"), "{stderr}");
    assert!(!stdout.contains("to-stderr"));

    // --timing: the agent's stamps are mapped onto the host's clock, so
    // its stages end before the line was printed, and all add up.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("husk-timing:"))
        .unwrap_or_else(|| panic!("no timing line: {stderr}"));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    let stages = [
        "first_kvm_run_ms",
        "guest_kernel_ms",
        "agent_ready_ms",
        "create_ms",
        "exec_ms",
        "run_ms",
    ];
    let guest: f64 = stages.iter().map(|k| field(k)).sum();
    let (total, err) = (field("total_ms"), field("clock_err_ms"));
    assert!(err < total, "{line}");
    assert!(field("guest_kernel_ms") > 0.0, "{line}");
    assert!(guest <= total + err, "{line}");
    assert!((guest + field("teardown_ms") - total).abs() < 1.0, "{line}");

    // HUSK_PROFILE: a header, then "ns vcpu rip" per sample.
    let profile = std::fs::read_to_string(&samples).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let mut lines = profile.lines();
    assert!(
        lines
            .next()
            .is_some_and(|h| h.starts_with("# husk-profile v1 hz=200 ")),
        "{profile:.200}"
    );
    let rips: Vec<u64> = lines
        .map(|l| {
            let rip = l.split_whitespace().nth(2).unwrap_or_else(|| panic!("{l}"));
            u64::from_str_radix(rip, 16).unwrap_or_else(|e| panic!("{l}: {e}"))
        })
        .collect();
    // Seconds of a booting guest at 200 Hz, in its kernel (above the
    // canonical hole) most of the time.
    assert!(rips.len() > 100, "{} samples", rips.len());
    assert!(
        rips.iter().any(|&r| r >= 0xffff_8000_0000_0000),
        "{profile:.500}"
    );
}

/// `husk run`'s VM process is jailed (a uid of its own, no capability in
/// any thread, a root that holds only its run dir and a procfs, every
/// thread seccomp-filtered: the VMM's, the agent protocol's and the stdio
/// relays it started), while `husk run` itself stays root to remove the
/// run dir afterwards.
fn assert_vm_process_jailed(husk_pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{husk_pid}/status")).unwrap();
    assert_eq!(support::status_field(&status, "Uid:"), "0\t0\t0\t0");
    let children =
        std::fs::read_to_string(format!("/proc/{husk_pid}/task/{husk_pid}/children")).unwrap();
    let kids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "one VM process: {children:?}");
    let jailed = support::assert_jailed(kids[0]);
    for t in ["vcpu0", "event-loop", "vmm", "husk"] {
        assert!(
            jailed.threads.iter().any(|f| f == t),
            "no {t} thread: {:?}",
            jailed.threads
        );
    }
    // The run dir's top directory (under a test's temporary HUSK_ROOT).
    assert_eq!(jailed.root.len(), 2, "{:?}", jailed.root);
    assert!(
        jailed.root.contains(&"proc".to_string()),
        "{:?}",
        jailed.root
    );
}

#[test]
fn sigterm_to_husk_run_s_group_reaches_the_container() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("sig");
    let rootfs = busybox_tree(&dir.0);
    let mut c = husk_run(&dir.0, &rootfs);
    // The trap counts the SIGTERMs it sees (the shell merges two that
    // arrive together; which copy is passed on is unit-tested in run_vm).
    // Unconfined: no seccomp filter, so the guest kernel's user namespaces
    // are there (the default profile's side is checked above).
    c.args([
        "--security-opt",
        "seccomp=unconfined",
        "--",
        "sh",
        "-c",
        "n=0; trap 'n=$((n+1)); echo got-term-$n' TERM; \
         echo \"$(grep Seccomp: /proc/self/status | tr -d ' \\t') $(unshare -U true && echo userns)\"; \
         echo ready; while [ $n -eq 0 ]; do sleep 1; done; sleep 3; exit $((40+n))",
    ])
    .process_group(0)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + boot_timeout() * 2;
    // Bounded: a husk run that never ends is killed (with its group), which
    // ends the reads below.
    let group = child.id() as i32;
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let ended = ended.clone();
        std::thread::spawn(move || {
            while Instant::now() < deadline {
                if ended.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: SIGKILL to the process group of our own child, not
            // yet reaped (the test waits for the watchdog first).
            unsafe { libc::kill(-group, libc::SIGKILL) };
        })
    };
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready\n") {
        assert!(Instant::now() < deadline, "container never got ready");
        let n = out.read(&mut b).unwrap();
        assert!(n > 0, "husk exited early: {:?}", child.wait());
        seen.extend_from_slice(&b[..n]);
    }
    assert_vm_process_jailed(child.id());
    // To the whole process group, as `timeout` and service managers send
    // it: husk run and its VM process both get it; the VM process passes on
    // only the copy husk run forwards.
    // SAFETY: signalling the process group of our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
    out.read_to_end(&mut seen).unwrap();
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let status = child.wait().unwrap();
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("got-term-1"), "{seen}");
    assert!(seen.contains("Seccomp:0 userns\n"), "{seen}");
    assert_eq!(status.code(), Some(41), "{seen}");
    let runs = dir.0.join("root/run");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", runs.display());
}

/// A signal for the container that comes before the container started
/// (here: while the guest boots) ends `husk run` at once, with the status
/// of a process killed by it and a line saying so; the container never
/// runs and nothing of the VM stays.
#[test]
fn a_signal_before_the_container_started_ends_husk_run() {
    let dir = scratch("early");
    let rootfs = busybox_tree(&dir.0);
    let mut c = husk_run(&dir.0, &rootfs);
    c.args(["--no-template", "--", "sh", "-c", "echo started"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id();
    // Once the VM's process exists, husk run relays what it is sent.
    let deadline = Instant::now() + boot_timeout();
    let children = format!("/proc/{pid}/task/{pid}/children");
    // (Not any child: the image's mkfs.ext4 comes before.)
    let vm_process = || {
        std::fs::read_to_string(&children)
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| {
                std::fs::read(format!("/proc/{c}/cmdline"))
                    .is_ok_and(|a| a.split(|b| *b == 0).any(|a| a == b"run-vm"))
            })
    };
    while !vm_process() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no VM process: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + boot_timeout();
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("husk run did not end: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "husk: interrupted by SIGTERM before the container started",
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!stdout.contains("started"), "the container ran: {stdout}");
    let runs = dir.0.join("root/run");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", runs.display());
    let vms = support::pids_naming(&runs.display().to_string());
    assert!(vms.is_empty(), "VM processes left: {vms:?}");
}

/// One process's outcome inside the shared sandbox.
struct Outcome {
    code: i32,
    oom: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

struct Shared {
    sandbox: Sandbox,
    control: husk_proto::Client<std::os::unix::net::UnixStream>,
    deadline: Instant,
    next: u32,
}

impl Shared {
    fn stream(&self, exec_id: &str, stream: StreamKind) -> std::os::unix::net::UnixStream {
        self.sandbox
            .stream(
                StreamHello {
                    version: PROTOCOL_VERSION,
                    container_id: "c".into(),
                    exec_id: Some(exec_id.into()),
                    stream,
                    wait_ms: 0,
                },
                self.deadline,
                boot_timeout().as_secs(),
                &|_| Ok(()),
            )
            .unwrap()
    }

    /// Runs `args` in the container; `stdin` is written then closed;
    /// `kill_after` sends SIGKILL once the process printed something.
    fn exec(&mut self, args: &[&str], stdin: Option<&[u8]>, tty: bool, kill: bool) -> Outcome {
        let mut process = husk_proto::oci_spec::runtime::Process::default();
        process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        self.exec_process(process, stdin, tty, kill)
    }

    fn exec_process(
        &mut self,
        mut process: husk_proto::oci_spec::runtime::Process,
        stdin: Option<&[u8]>,
        tty: bool,
        kill: bool,
    ) -> Outcome {
        self.next += 1;
        let id = format!("e{}", self.next);
        process.set_terminal(Some(tty));
        self.control
            .exec(Exec {
                container_id: "c".into(),
                exec_id: id.clone(),
                process: Box::new(process),
                stdin: stdin.is_some(),
            })
            .unwrap();
        let (mut out, err) = if tty {
            (self.stream(&id, StreamKind::Pty), None)
        } else {
            (
                self.stream(&id, StreamKind::Stdout),
                Some(self.stream(&id, StreamKind::Stderr)),
            )
        };
        let writer = stdin.map(|data| {
            let mut s = self.stream(&id, StreamKind::Stdin);
            let data = data.to_vec();
            std::thread::spawn(move || {
                s.write_all(&data).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            })
        });
        let err_reader = err.map(|mut e| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = e.read_to_end(&mut v);
                v
            })
        });
        let mut stdout = Vec::new();
        if kill {
            let mut b = [0u8; 64];
            let n = out.read(&mut b).unwrap();
            stdout.extend_from_slice(&b[..n]);
            self.control
                .signal(Signal {
                    container_id: "c".into(),
                    exec_id: Some(id.clone()),
                    signal: libc::SIGKILL,
                })
                .unwrap();
        }
        let _ = out.read_to_end(&mut stdout);
        if let Some(w) = writer {
            w.join().unwrap();
        }
        let stderr = err_reader.map(|t| t.join().unwrap()).unwrap_or_default();
        let st = self
            .control
            .wait(ProcessRef {
                container_id: "c".into(),
                exec_id: Some(id),
            })
            .unwrap();
        Outcome {
            code: st.exit_code,
            oom: st.oom_killed,
            stdout,
            stderr,
        }
    }
}

#[test]
fn one_sandbox_serves_every_process_check() {
    let dir = scratch("shared");
    let rootfs = busybox_tree(&dir.0);
    let image = husk_image::ext4::image_for_dir(&rootfs, &dir.0.join("images")).unwrap();
    let agent = husk_runtime::paths::agent_binary(None).expect("agent: run tools/build-agent");
    let agent_disk = husk_runtime::paths::agent_disk(&agent).unwrap();
    // Under the scratch directory, not husk's root: a test leaves nothing
    // in /var/lib/husk.
    let run_dir = dir.0.join("run");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&run_dir)
        .unwrap();
    let sandbox = Sandbox::boot(&SandboxConfig {
        kernel: Some(support::kernel()),
        agent_disk,
        rootfs_image: Some(image),
        mem_mib: 256,
        vcpus: 1,
        run_dir,
        network: Default::default(),
        shares: Vec::new(),
        seccomp: Default::default(),
        template: false,
        boot_timeout: boot_timeout(),
        jail_id: None,
    })
    .unwrap();
    let deadline = Instant::now() + boot_timeout();
    let mut control = sandbox
        .control(deadline, boot_timeout().as_secs(), None)
        .unwrap();
    // The container's init only keeps it alive; each check is an exec.
    let mut spec = husk_runtime::spec::build(&husk_runtime::spec::RunSpec {
        args: vec!["sleep".into(), "100000".into()],
        memory: Some(48 << 20),
        hostname: "shared".into(),
        ..Default::default()
    })
    .unwrap();
    spec.set_hostname(Some("shared".into()));
    control
        .create_container(husk_proto::CreateContainer {
            container_id: "c".into(),
            spec: Box::new(spec),
            rootfs: husk_proto::Rootfs {
                device: husk_runtime::sandbox::ROOTFS_DEVICE.into(),
                fstype: "ext4".into(),
                read_only: true,
                size_bytes: None,
            },
            scratch: husk_proto::Scratch::Tmpfs { size_bytes: None },
            stdin: false,
            files: Vec::new(),
            shares: Vec::new(),
        })
        .unwrap();
    control.start("c").unwrap();
    let mut s = Shared {
        sandbox,
        control,
        deadline,
        next: 0,
    };

    let o = s.exec(
        &["sh", "-c", "echo out; echo err >&2; exit 0"],
        None,
        false,
        false,
    );
    assert_eq!(
        (o.code, o.stdout.as_slice(), o.stderr.as_slice()),
        (0, &b"out\n"[..], &b"err\n"[..])
    );

    // The device cgroup: container root may mknod the guest's disk (as
    // with runc) but not open it; the default nodes stay usable.
    let mut process = husk_proto::oci_spec::runtime::Process::default();
    process.set_args(Some(
        [
            "sh",
            "-c",
            "d=$(cat /sys/class/block/vda/dev) && mknod /dev/disk b ${d%:*} ${d#*:} && echo MADE; \
             (exec 3</dev/disk) || echo DENIED; echo x > /dev/null && echo NULL-OK",
        ]
        .map(String::from)
        .to_vec(),
    ));
    let mknod: std::collections::HashSet<_> = [husk_proto::oci_spec::runtime::Capability::Mknod]
        .into_iter()
        .collect();
    let mut caps = husk_proto::oci_spec::runtime::LinuxCapabilities::default();
    caps.set_bounding(Some(mknod.clone()));
    caps.set_permitted(Some(mknod.clone()));
    caps.set_effective(Some(mknod));
    caps.set_inheritable(Some(Default::default()));
    caps.set_ambient(Some(Default::default()));
    process.set_capabilities(Some(caps));
    let o = s.exec_process(process, None, false, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "MADE\nDENIED\nNULL-OK\n",
        "{err}"
    );
    assert!(err.contains("Operation not permitted"), "{err}");

    // On kvm_pvm glibc must not pick its AVX code in the guest (husk's VMM
    // passes the tunables on the kernel command line, the agent hands them
    // on): the guest kernel cannot keep vector registers apart.
    if Path::new("/sys/module/kvm_pvm").exists() {
        let o = s.exec(
            &["sh", "-c", "echo \"$GLIBC_TUNABLES\""],
            None,
            false,
            false,
        );
        assert_eq!(o.code, 0);
        let tunables = String::from_utf8_lossy(&o.stdout);
        assert!(
            tunables.contains("glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F"),
            "{tunables}"
        );
    }

    // The guest's cgroup2 (and the container's own mount of it) favours
    // moves between cgroups: each container's init makes one.
    let o = s.exec(&["cat", "/proc/self/mountinfo"], None, false, false);
    assert_eq!(o.code, 0);
    let mountinfo = String::from_utf8_lossy(&o.stdout);
    let cgroup2 = mountinfo.lines().find(|l| l.contains(" - cgroup2 "));
    assert!(
        cgroup2.is_some_and(|l| l.contains("favordynmods")),
        "{mountinfo}"
    );

    // The cpu controller is off until a container sets a cpu limit (its
    // scheduler bookkeeping costs every container); an update turns it on.
    let cpu_max = |s: &mut Shared| {
        let script = "cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo none";
        let o = s.exec(&["sh", "-c", script], None, false, false);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(cpu_max(&mut s), "none\n");
    let resources: husk_proto::oci_spec::runtime::LinuxResources =
        serde_json::from_value(serde_json::json!({"cpu": {"quota": 50000, "period": 100000}}))
            .unwrap();
    s.control
        .update_resources(husk_proto::UpdateResources {
            container_id: "c".into(),
            resources: Box::new(resources),
        })
        .unwrap();
    assert_eq!(cpu_max(&mut s), "50000 100000\n");

    let o = s.exec(&["no-such-command"], None, false, false);
    assert_eq!(o.code, 127);
    assert!(!o.stderr.is_empty(), "the exec error goes to stderr");

    let o = s.exec(&["/etc/passwd"], None, false, false);
    assert_eq!(o.code, 126);

    let o = s.exec(
        &["sh", "-c", "echo up; while true; do sleep 1; done"],
        None,
        false,
        true,
    );
    assert_eq!(o.code, 137);
    assert!(!o.oom);

    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let o = s.exec(&["cat"], Some(&data), false, false);
    assert_eq!(o.code, 0);
    assert!(
        o.stdout == data,
        "1 MiB through cat: got {} bytes",
        o.stdout.len()
    );

    let o = s.exec(&["tty"], None, true, false);
    assert_eq!(o.code, 0, "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("/dev/pts/"));

    // 48 MiB limit: a 200 MiB buffer gets the process OOM-killed.
    let o = s.exec(
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
        None,
        false,
        false,
    );
    assert_eq!(o.code, 137, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.oom, "reported as OOM");

    let _ = s.control.shutdown();
    let exit = s.sandbox.wait(Duration::from_secs(60));
    assert!(exit.is_clean(), "{exit}");
}
