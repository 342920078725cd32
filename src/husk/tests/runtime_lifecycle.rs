//! runc's command line on real micro-VMs: create → state → start → kill →
//! delete on bundles the test makes, the VMM process's exit status being
//! the container's (as a shim reaping the --pid-file pid sees it), runc's
//! errors, a VMM killed from outside, and no state left behind. Three
//! containers boot at once to save time; this test process is their
//! subreaper, as a shim would be.

mod support;

use std::io::{Read, Write};
use std::path::Path;

use support::kernel;
use support::runc_cli::{bundle, created, ok, reap, runc, spawn_create, state, Scratch};

/// Runs a runc command that must fail with exit 1 and `needle` in its one
/// stderr line.
fn fails(root: &Path, args: &[&str], needle: &str) {
    let o = runc(root).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

/// The VMM process `pid` is in its jail: a uid and gid of its own, no
/// capability and a seccomp filter in every thread, a mount namespace
/// whose root holds only the VM's run directory (under /run) and a procfs.
fn assert_jailed(pid: i32) {
    // The VMM's threads and the agent protocol's (with its relays).
    let jailed = support::assert_jailed(pid as u32);
    assert_eq!(jailed.root, ["proc", "run"]);
    let runs: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/run/husk-vm"))
        .unwrap()
        .collect();
    assert_eq!(runs.len(), 1, "one run dir");
}

#[test]
fn runc_lifecycle_on_real_vms() {
    // SAFETY: prctl with plain integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let dir = Scratch(std::env::temp_dir().join(format!("husk-runc-{}", std::process::id())));
    let root = dir.0.join("state");
    let b1 = bundle(
        &dir.0,
        "one",
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo kept > /in-root; read x; echo got $x; exit 3",
        ],
    );
    let b2 = bundle(&dir.0, "two", &["sleep", "1000"]);
    let b3 = bundle(&dir.0, "three", &["sleep", "1000"]);
    let b4 = bundle(
        &dir.0,
        "four",
        &["sh", "-c", "echo via run; touch /in-vm-only; exit 4"],
    );
    // four's root is copied into an ext4 image (its writes stay in the
    // VM); the others' are shared (the default: writes land in the
    // bundle, as under runc).
    let edit = |b: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let path = b.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut cfg);
        std::fs::write(&path, cfg.to_string()).unwrap();
    };
    edit(&b4, &|c| {
        c["annotations"]["io.husk.rootfs"] = "image".into()
    });
    edit(&b4, &|c| c["root"]["readonly"] = false.into());
    edit(&b1, &|c| c["root"]["readonly"] = false.into());

    // Errors that need no VM.
    fails(&root, &["start", "nope"], "container does not exist");
    fails(&root, &["state", "nope"], "container does not exist");
    fails(
        &root,
        &["create", "--bundle", "/nonexistent", "x"],
        "/nonexistent",
    );
    fails(
        &root,
        &["create", "--bundle", b1.to_str().unwrap(), "a/b"],
        "invalid container id",
    );
    fails(&root, &["kill", "nope", "SIGFOO"], "unknown signal");
    ok(&runc(&root)
        .args(["delete", "--force", "nope"])
        .output()
        .unwrap());
    assert_eq!(ok(&runc(&root).args(["list", "-q"]).output().unwrap()), "");

    let c1 = spawn_create(&root, &b1, "one");
    let c2 = spawn_create(&root, &b2, "two");
    let c3 = spawn_create(&root, &b3, "three");
    // runc's run (husk run --bundle): create, start, wait, delete, in the
    // foreground, with the container's exit code; a fourth VM at once.
    let mut c4 = runc(&root);
    c4.args(["run", "--kernel"])
        .arg(kernel())
        .arg("--bundle")
        .arg(&b4)
        .arg("four")
        .stdin(std::process::Stdio::null());
    let four = std::thread::spawn(move || {
        support::run_with_timeout(c4, None, support::boot_timeout() * 3)
    });
    let mut one = created(c1, &b1);
    let two = created(c2, &b2);
    let three = created(c3, &b3);
    let four = four.join().unwrap();
    assert_eq!(
        four.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&four.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&four.stdout), "via run\n");
    assert!(
        !b4.join("rootfs/in-vm-only").exists(),
        "image mode keeps writes in the VM"
    );
    assert!(!root.join("four").exists(), "run deletes its container");

    let s = state(&root, "one");
    assert_eq!(s["status"], "created");
    assert_eq!(s["pid"], one.pid);
    assert_jailed(one.pid);
    assert_eq!(s["id"], "one");
    assert_eq!(s["annotations"]["test"], "one");
    assert_eq!(
        s["bundle"].as_str().unwrap(),
        std::fs::canonicalize(&b1).unwrap().to_str().unwrap()
    );
    fails(
        &root,
        &["create", "--bundle", b1.to_str().unwrap(), "one"],
        "container with id exists: one",
    );
    let ids = ok(&runc(&root).args(["list", "-q"]).output().unwrap());
    assert_eq!(ids, "one\nthree\ntwo\n");
    let table = ok(&runc(&root).arg("list").output().unwrap());
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(&runc(&root)
        .args(["list", "--format", "json"])
        .output()
        .unwrap()))
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);

    // one: start, stdio through the VMM process's fds, exit 3.
    ok(&runc(&root).args(["start", "one"]).output().unwrap());
    assert_eq!(state(&root, "one")["status"], "running");
    fails(
        &root,
        &["start", "one"],
        "cannot start an already running container",
    );
    fails(
        &root,
        &["delete", "one"],
        "cannot delete container one that is not stopped: running",
    );
    one.stdin.write_all(b"line\n").unwrap();
    assert_eq!(
        reap(one.pid),
        3,
        "the VMM exits with the container's status"
    );
    let (mut out, mut err) = (String::new(), String::new());
    one.stdout.read_to_string(&mut out).unwrap();
    one.stderr.read_to_string(&mut err).unwrap();
    assert_eq!(out, "out\ngot line\n");
    assert_eq!(err, "err\n", "only the container writes to its stderr");
    assert_eq!(
        std::fs::read_to_string(b1.join("rootfs/in-root")).unwrap(),
        "kept\n",
        "a shared root: the container's write is in the bundle"
    );
    let s = state(&root, "one");
    assert_eq!(s["status"], "stopped");
    assert_eq!(s["pid"], 0);
    fails(&root, &["kill", "one", "TERM"], "container not running");
    fails(
        &root,
        &["start", "one"],
        "cannot start a container that has stopped",
    );
    ok(&runc(&root).args(["delete", "one"]).output().unwrap());
    fails(&root, &["state", "one"], "container does not exist");

    // two: pause/resume (the VMM process stopped), ps, then a signal by
    // number, as containerd sends it: 128+9.
    ok(&runc(&root).args(["start", "two"]).output().unwrap());
    ok(&runc(&root).args(["pause", "two"]).output().unwrap());
    assert_eq!(state(&root, "two")["status"], "paused");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", two.pid)).unwrap();
    let st = stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap();
    assert_eq!(st, 'T', "the VMM process is stopped: {stat}");
    fails(&root, &["pause", "two"], "container already paused");
    fails(&root, &["kill", "two", "TERM"], "container is paused");
    fails(&root, &["delete", "two"], "that is not stopped: paused");
    ok(&runc(&root).args(["resume", "two"]).output().unwrap());
    assert_eq!(state(&root, "two")["status"], "running");
    fails(&root, &["resume", "two"], "container not paused");
    let pids = ok(&runc(&root)
        .args(["ps", "--format", "json", "two"])
        .output()
        .unwrap());
    assert_eq!(pids.trim(), format!("[{}]", two.pid));
    let table = ok(&runc(&root).args(["ps", "two"]).output().unwrap());
    assert!(table.starts_with("UID"), "{table}");
    assert!(table.contains("vmm-serve"), "{table}");
    // events --stats: the container's cgroup in the guest, runc's JSON.
    let ev = ok(&runc(&root)
        .args(["events", "--stats", "two"])
        .output()
        .unwrap());
    let ev: serde_json::Value = serde_json::from_str(ev.trim()).unwrap();
    assert_eq!(ev["type"], "stats");
    assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{ev}");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{ev}"
    );
    // delete --force of a paused container kills its VMM process.
    ok(&runc(&root).args(["pause", "two"]).output().unwrap());
    ok(&runc(&root)
        .args(["delete", "--force", "two"])
        .output()
        .unwrap());
    assert_eq!(reap(two.pid), 137);

    // three: its VMM process SIGKILLed from outside; state says stopped and
    // delete --force leaves nothing (sockets, console, state) behind.
    ok(&runc(&root).args(["start", "three"]).output().unwrap());
    // SAFETY: kill(2) of our own (reparented) child.
    unsafe { libc::kill(three.pid, libc::SIGKILL) };
    assert_eq!(reap(three.pid), 137);
    assert_eq!(state(&root, "three")["status"], "stopped");
    let vm_dir = husk_runtime::runc::store::vm_dir(&root.join("three"));
    assert!(
        vm_dir.join("vsock.sock").exists(),
        "the killed VMM left its socket"
    );
    ok(&runc(&root)
        .args(["delete", "--force", "three"])
        .output()
        .unwrap());

    // Errors reach --log as runc writes them (containerd shows the last line).
    let log = dir.0.join("log.json");
    let o = runc(&root)
        .args([
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "start",
            "gone",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container does not exist");

    // Nothing left: no state dirs, no VMM processes.
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!vm_dir.exists(), "delete --force left {}", vm_dir.display());
    for pid in [one.pid, two.pid, three.pid] {
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
