//! `husk vm --jail`: a jailed VMM serves a tiny vsock guest (its
//! connection to host port 5000 goes out through the jail to a listener in
//! the jail dir, the host's answer comes back) while the test checks from
//! outside what the VMM is left with: the jail's uid and gid, no
//! capability in any thread, a mount and a network namespace of its own
//! whose root holds only the jail dir and a procfs, its rlimit, its
//! cgroup. Then the mistakes: each a one-line error before anything is
//! created.

mod support;
#[path = "../../vmm/tests/common/tiny.rs"]
mod tiny;
#[path = "../../vmm/tests/common/vsock_guest.rs"]
mod vsock_guest;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use husk_vmm::api::{request, Request};
use support::{assert_one_line_error, husk, run_with_timeout};

/// A uid and gid no account has, distinct per test process.
fn jail_id() -> u32 {
    3_900_000 + std::process::id() % 100_000
}

/// A scratch dir holding the vsock guest's kernel, and that kernel's path.
fn scratch_with_kernel(tag: &str) -> (PathBuf, PathBuf) {
    let base = tiny::tempdir(tag);
    let kernel = base.join("k");
    std::fs::write(&kernel, vsock_guest::kernel()).unwrap();
    (base, kernel)
}

/// `base/j`, owned by `owner`, mode 0700.
fn jail_dir(base: &Path, owner: u32) -> PathBuf {
    let j = base.join("j");
    std::fs::DirBuilder::new().mode(0o700).create(&j).unwrap();
    std::os::unix::fs::chown(&j, Some(owner), Some(owner)).unwrap();
    j
}

use support::status_field as field;

struct Vmm(Child);

impl Vmm {
    /// Its exit status, once it exits (within `limit`).
    fn exit_within(&mut self, limit: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cgroup of the v1 `pids` hierarchy or, on a cgroup v2 host, of the
/// unified one; removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Self {
        let base = if Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists() {
            "/sys/fs/cgroup/pids"
        } else {
            "/sys/fs/cgroup"
        };
        let dir = Path::new(base).join(format!("husk-jail-test-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Waits (until `deadline`) for the main thread of the VMM at `proc`
/// (/proc/PID) to run under its filter: it filters itself just after it
/// starts the event loop, which may already have answered.
fn main_thread_filtered(proc: &Path, deadline: Instant) {
    while field(
        &std::fs::read_to_string(proc.join("status")).unwrap(),
        "Seccomp:",
    ) != "2"
    {
        assert!(Instant::now() < deadline, "the main thread has no filter");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_jailed_vmm_serves_its_guest_and_keeps_nothing_else() {
    let id = jail_id();
    let (base, kernel) = scratch_with_kernel("jail");
    let j = jail_dir(&base, id);
    let (uds, api, console) = (j.join("v.sock"), j.join("api.sock"), j.join("console"));
    // Guest connections are made as the jail's uid, to its own sockets.
    let listen_path = j.join("v.sock_5000");
    let listener = UnixListener::bind(&listen_path).unwrap();
    std::os::unix::fs::chown(&listen_path, Some(id), Some(id)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let cgroup = TestCgroup::new();

    let mut c = husk();
    c.args(["vm", "--mem", "64", "--kernel"])
        .arg(&kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--vsock")
        .arg(format!("cid={},uds={}", vsock_guest::CID, uds.display()))
        .arg("--api-sock")
        .arg(&api)
        .arg("--jail")
        .arg(format!(
            "dir={},uid={id},gid={id},netns,nofile=256,cgroup={}",
            j.display(),
            cgroup.0.display()
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut vmm = Vmm(c.spawn().unwrap());
    let pid = vmm.0.id();
    let mut err_pipe = vmm.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });

    // The guest's connection arrives; the guest then waits for our answer.
    let deadline = Instant::now() + support::boot_timeout();
    let mut conn = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(s) = vmm.0.try_wait().unwrap() {
                    panic!("husk vm exited: {s}: {}", log.join().unwrap());
                }
                assert!(Instant::now() < deadline, "no connection from the guest");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_read_timeout(Some(support::boot_timeout()))
        .unwrap();
    let mut got = vec![0u8; vsock_guest::PAYLOAD.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, vsock_guest::PAYLOAD);

    // What the running VMM holds.
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let ids = format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(field(&status, "Uid:"), ids, "{status}");
    assert_eq!(field(&status, "Gid:"), ids, "{status}");
    assert_eq!(field(&status, "Groups:"), "", "{status}");
    main_thread_filtered(&proc, deadline);
    for task in std::fs::read_dir(proc.join("task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for f in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&status, f), "0000000000000000", "{f}:\n{status}");
        }
        // Every thread (main, event loop, vCPUs) runs under a filter.
        assert_eq!(field(&status, "Seccomp:"), "2", "{status}");
    }
    for ns in ["mnt", "net"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        assert_ne!(ours, its, "the VMM shares our {ns} namespace");
    }
    // Its root: the jail dir at its own path, and a procfs.
    let root = proc.join("root");
    let mut top: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    let first = j.components().nth(1).unwrap();
    let mut want = vec![
        first.as_os_str().to_str().unwrap().to_string(),
        "proc".to_string(),
    ];
    want.sort();
    assert_eq!(top, want);
    let inside = root.join(j.strip_prefix("/").unwrap());
    assert!(inside.join("v.sock").exists() && inside.join("api.sock").exists());
    assert!(
        !inside.join("..").join("k").exists(),
        "the kernel is outside"
    );
    let limits = std::fs::read_to_string(proc.join("limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>()[3..5],
        ["256", "256"]
    );
    let procs = std::fs::read_to_string(cgroup.0.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "not in its cgroup: {procs}"
    );
    // Its control socket answers.
    let r = request(&api, Request::Status, &[], support::boot_timeout()).unwrap();
    assert_eq!(r.state.as_deref(), Some("running"), "{r:?}");

    // A snapshot goes through descriptors `husk snapshot create` opens,
    // so it can be written outside the jail.
    let snap = base.join("snap");
    let mut c = husk();
    c.args(["snapshot", "create", "--api-sock"])
        .arg(&api)
        .arg("--out")
        .arg(&snap);
    support::ok_output(run_with_timeout(c, None, support::boot_timeout()));
    assert!(snap.join("state.json").exists());

    // The guest prints our answer and resets.
    conn.write_all(b"hey").unwrap();
    let exit = vmm.exit_within(support::boot_timeout(), "the guest never reset");
    let stderr = log.join().unwrap();
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert_eq!(
        std::fs::read(&console).unwrap(),
        [19, vsock_guest::CID as u8, 2, b'h', b'e', b'y']
    );
    assert_eq!(std::fs::metadata(&console).unwrap().uid(), id);
    // The jailed VMM removed its sockets.
    assert!(!uds.exists(), "vsock socket left behind");
    assert!(!api.exists(), "control socket left behind");

    // The snapshot comes back in a jail of its own: the guest is still
    // waiting for an answer on a connection the restore reset.
    let j2 = base.join("j2");
    std::fs::rename(&j, &j2).unwrap();
    let api2 = j2.join("api.sock");
    // Twice, in a PID namespace: the process started is a supervisor
    // outside it, the VMM its child and PID 1 inside. SIGTERM to the
    // supervisor stops the VM; SIGKILL takes the VMM with it.
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let mut c = husk();
        c.arg("vm")
            .arg("--restore")
            .arg(&snap)
            .arg("--vsock")
            .arg(format!(
                "cid={},uds={}",
                vsock_guest::CID,
                j2.join("v.sock").display()
            ))
            .arg("--api-sock")
            .arg(&api2)
            .arg("--jail")
            .arg(format!("dir={},uid={id},gid={id},pidns", j2.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut vmm = Vmm(c.spawn().unwrap());
        let supervisor = vmm.0.id();
        let deadline = Instant::now() + support::boot_timeout();
        while !api2.exists() {
            assert!(
                vmm.0.try_wait().unwrap().is_none(),
                "the restored VMM exited"
            );
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket is bound before the jail is entered; an answer comes
        // from the event loop, which starts after it.
        let r = request(&api2, Request::Status, &[], support::boot_timeout()).unwrap();
        assert_eq!(r.state.as_deref(), Some("running"), "{r:?}");
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .unwrap();
        let pid: u32 = children.trim().parse().expect("one child, the VMM");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(field(&status, "Uid:"), ids, "{status}");
        assert_eq!(field(&status, "NSpid:"), format!("{pid}\t1"), "{status}");
        main_thread_filtered(Path::new(&format!("/proc/{pid}")), deadline);
        let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_ne!(
            ours,
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap()
        );
        // Inside, its procfs shows only itself.
        let seen: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .into_string()
                    .unwrap()
                    .parse::<u32>()
                    .ok()
            })
            .collect();
        assert_eq!(seen, [1], "processes the VMM sees");
        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(supervisor as i32, sig) }, 0);
        let exit = vmm.exit_within(support::boot_timeout(), "the supervisor did not exit");
        // The VMM is gone too (or a zombie for init to reap).
        let deadline = Instant::now() + support::boot_timeout();
        while let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if field(&st, "State:").starts_with('Z') {
                break;
            }
            assert!(Instant::now() < deadline, "the VMM outlived its supervisor");
            std::thread::sleep(Duration::from_millis(10));
        }
        if sig == libc::SIGTERM {
            assert_eq!(exit.code(), Some(husk_vmm::exit::code::KILLED));
            assert!(!api2.exists() && !j2.join("v.sock").exists());
        } else {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(exit.signal(), Some(libc::SIGKILL));
            let _ = std::fs::remove_file(&api2);
            let _ = std::fs::remove_file(j2.join("v.sock"));
        }
    }
    drop(listener);
    drop(cgroup);
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn jail_mistakes_are_one_line_errors_that_leave_nothing() {
    let id = jail_id();
    let (base, kernel) = scratch_with_kernel("jail-errors");
    let vm = |j: &Path, jail: &str| {
        let mut c = husk();
        c.args(["vm", "--mem", "64", "--kernel"])
            .arg(&kernel)
            .arg("--console")
            .arg(format!("file:{}", j.join("console").display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", j.join("v.sock").display()))
            .arg("--api-sock")
            .arg(j.join("api.sock"))
            .args(["--jail", jail]);
        run_with_timeout(c, None, support::boot_timeout())
    };
    let empty = |j: &Path| std::fs::read_dir(j).unwrap().count() == 0;

    // A directory the jail's uid does not own.
    let root_owned = jail_dir(&base, 0);
    let out = vm(
        &root_owned,
        &format!("dir={},uid={id},gid={id}", root_owned.display()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_error(&out, &format!("must belong to uid {id}"));
    assert!(empty(&root_owned), "left behind in the jail dir");

    // No such directory.
    let missing = base.join("missing");
    let out = vm(
        &missing,
        &format!("dir={},uid={id},gid={id}", missing.display()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_error(&out, "No such file");
    assert!(!missing.exists());

    // A cgroup that is not there.
    std::fs::remove_dir(&root_owned).unwrap();
    let j = jail_dir(&base, id);
    let out = vm(
        &j,
        &format!(
            "dir={},uid={id},gid={id},cgroup=/sys/fs/cgroup/husk-no-such-cgroup",
            j.display()
        ),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_error(&out, "husk-no-such-cgroup");
    assert!(empty(&j), "left behind in the jail dir");

    // Sockets outside the jail.
    let out = vm(&base, &format!("dir={},uid={id},gid={id}", j.display()));
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_error(&out, "must be inside the jail dir");
    assert!(!base.join("v.sock").exists() && !base.join("api.sock").exists());

    // Malformed: a usage error.
    for spec in [
        format!("dir={},uid=0,gid=0", j.display()),
        format!("dir={},uid={id}", j.display()),
        "dir=/,uid=5,gid=5".to_string(),
        format!("dir={},uid={id},gid={id},chroot=/", j.display()),
    ] {
        let out = vm(&j, &spec);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("jail"),
            "{spec}: {out:?}"
        );
    }
    assert!(empty(&j), "left behind in the jail dir");
    std::fs::remove_dir_all(base).unwrap();
}
