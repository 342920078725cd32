//! runc's command line on real micro-VMs: create → state → start → kill →
//! delete on bundles the test makes, the VMM process's exit status being
//! the container's (as a shim reaping the --pid-file pid sees it), runc's
//! errors, a VMM killed from outside, and no state left behind. Three
//! containers boot at once to save time; this test process is their
//! subreaper, as a shim would be.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{boot_timeout, busybox_tree, husk, kernel};

/// The test's directory; on the way out (a failed assertion included)
/// every container under its state root is force-deleted, so no VM
/// outlives the test.
struct Scratch(PathBuf);
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
fn runc(root: &Path) -> Command {
    let mut c = husk();
    c.env("HUSK_BOOT_TIMEOUT", boot_timeout().as_secs().to_string())
        .arg("--root")
        .arg(root);
    c
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a runc command that must fail with exit 1 and `needle` in its one
/// stderr line.
fn fails(root: &Path, args: &[&str], needle: &str) {
    let o = runc(root).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

fn state(root: &Path, id: &str) -> serde_json::Value {
    let o = runc(root).args(["state", id]).output().unwrap();
    serde_json::from_str(&ok(&o)).unwrap()
}

/// A bundle running `args` in a busybox tree.
fn bundle(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
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

struct Created {
    pid: i32,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: ChildStderr,
}

/// Starts `husk create` with stdio pipes, as a shim does.
fn spawn_create(root: &Path, bundle: &Path, id: &str) -> Child {
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
fn created(mut child: Child, bundle: &Path) -> Created {
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
fn reap(pid: i32) -> i32 {
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
            "echo out; echo err >&2; read x; echo got $x; exit 3",
        ],
    );
    let b2 = bundle(&dir.0, "two", &["sleep", "1000"]);
    let b3 = bundle(&dir.0, "three", &["sleep", "1000"]);

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
    let mut one = created(c1, &b1);
    let two = created(c2, &b2);
    let three = created(c3, &b3);

    let s = state(&root, "one");
    assert_eq!(s["status"], "created");
    assert_eq!(s["pid"], one.pid);
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
