//! husk as containerd's runtime: a private containerd (Debian's 1.6,
//! started here with its own root, state and socket, stopped by PID) runs
//! an image the test builds through `ctr run --runc-binary husk`: output
//! and exit code of `ctr run --rm`, then a detached task with
//! `ctr task exec`, `ctr task kill` and `ctr task delete`. Nothing may be
//! left behind: no shim, no VMM process, no runc state.

mod image_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_support::{test_image, tmpdir};
use support::boot_timeout;
use support::{bounded, ok_output as ok};

/// A private containerd, killed (with every process that names its socket:
/// shims, VMMs) when dropped.
struct Containerd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    ns: String,
    runc_root: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n",
                dir.display(),
                sock.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (tools/install-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ns = format!("husk-test-{}", std::process::id());
        // The runc shim keeps runc's state here, per namespace.
        let runc_root = PathBuf::from("/run/containerd/runc").join(&ns);
        Containerd {
            child,
            dir: dir.to_path_buf(),
            sock,
            ns,
            runc_root,
        }
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).arg("-n").arg(&self.ns);
        c
    }

    /// Shims and husk processes that belong to this containerd.
    fn leftovers(&self) -> Vec<i32> {
        let mut v = support::pids_naming(&self.sock.display().to_string());
        v.extend(support::pids_naming(&self.runc_root.display().to_string()));
        v
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pid in self.leftovers() {
            // SAFETY: kill(2) of processes this test's containerd started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.runc_root);
        let _ = std::fs::remove_dir_all(&self.dir);
        support::remove_empty_cgroups(&self.ns, &[]);
    }
}

#[test]
fn ctr_runs_tasks_in_micro_vms() {
    let dir = tmpdir("containerd");
    let layout = dir.join("layout");
    test_image(&layout, "v1");
    let archive = dir.join("image.tar");
    ok(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci-archive:{}:husk-test:v1", archive.display()))
        .output()
        .unwrap());
    let wrapper = support::runtime_wrapper(&dir);

    let ctd = Containerd::start(&dir.join("ctd"));
    ok(ctd
        .ctr()
        .args(["image", "import", "--all-platforms"])
        .arg(&archive)
        .output()
        .unwrap());
    let limit = boot_timeout() * 3;

    // Three VMs boot at once: a detached task, a task with a terminal
    // (ctr -t wants one of its own: script(1) gives it a pty) and a plain
    // ctr run --rm.
    let mut bg = ctd.ctr();
    bg.args(["run", "-d", "--runc-binary"]).arg(&wrapper).args([
        "husk-test:v1",
        "bg",
        "sleep",
        "1000",
    ]);
    let bg = std::thread::spawn(move || bounded(&mut bg, limit));
    let tty_cmd = |args: &str| {
        let mut c = Command::new("script");
        let ctr = format!("ctr --address {} -n {}", ctd.sock.display(), ctd.ns);
        c.args(["-qec", &format!("{ctr} {args}"), "/dev/null"]);
        c
    };
    let mut tty_run = tty_cmd(&format!(
        "run -t --rm --runc-binary {} husk-test:v1 tty-once sh -c 'tty; exit 4'",
        wrapper.display()
    ));
    let tty_run = std::thread::spawn(move || bounded(&mut tty_run, limit));

    // ctr run --rm: output, exit code, and the VM's own kernel.
    let o = bounded(
        ctd.ctr()
            .args(["run", "--rm", "--runc-binary"])
            .arg(&wrapper)
            .args([
                "husk-test:v1",
                "once",
                "sh",
                "-c",
                "echo hi from ctr; uname -r; exit 3",
            ]),
        limit,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hi from ctr"));
    let host_kernel = ok(Command::new("uname").arg("-r").output().unwrap());
    assert_ne!(
        lines.next(),
        Some(host_kernel.trim()),
        "the task ran in the VM's kernel"
    );

    // The terminal: the guest's pty, the exit status through script(1).
    let o = tty_run.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("/dev/pts/"), "{out}");

    // The detached task: exec (with and without a terminal), kill, delete.
    ok(bg.join().unwrap());
    // Typed input reaches the process through the terminal (what
    // `docker run -it` relies on): script(1) types what it reads.
    let o = support::run_with_timeout(
        tty_cmd("task exec -t --exec-id t1 bg sh -c 'tty; read x; echo got $x; exit 6'"),
        Some(b"hello\n"),
        limit,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("/dev/pts/") && out.contains("got hello"),
        "{out}"
    );
    let o = bounded(
        ctd.ctr().args([
            "task",
            "exec",
            "--exec-id",
            "e1",
            "bg",
            "sh",
            "-c",
            "echo in exec; exit 5",
        ]),
        limit,
    );
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in exec\n");
    let tasks = ok(ctd.ctr().args(["task", "ls"]).output().unwrap());
    assert!(tasks.contains("RUNNING"), "{tasks}");
    let ps = ok(ctd.ctr().args(["task", "ps", "bg"]).output().unwrap());
    assert_eq!(ps.lines().count(), 2, "the VMM process: {ps}");
    ok(ctd.ctr().args(["task", "pause", "bg"]).output().unwrap());
    let tasks = ok(ctd.ctr().args(["task", "ls"]).output().unwrap());
    assert!(tasks.contains("PAUSED"), "{tasks}");
    ok(ctd.ctr().args(["task", "resume", "bg"]).output().unwrap());
    ok(ctd
        .ctr()
        .args(["task", "kill", "-s", "KILL", "bg"])
        .output()
        .unwrap());
    let deadline = Instant::now() + limit;
    loop {
        let tasks = ok(ctd.ctr().args(["task", "ls"]).output().unwrap());
        if tasks.contains("STOPPED") {
            break;
        }
        assert!(Instant::now() < deadline, "the task did not stop: {tasks}");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(ctd.ctr().args(["task", "delete", "bg"]).output().unwrap());
    ok(ctd.ctr().args(["container", "rm", "bg"]).output().unwrap());

    // Nothing left: no shim, no VMM, no runc state.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctd.leftovers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ctd.leftovers(), Vec::<i32>::new(), "processes left behind");
    let state: Vec<_> = std::fs::read_dir(&ctd.runc_root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(state.is_empty(), "runc state left: {state:?}");
    drop(ctd);
    let _ = std::fs::remove_dir_all(&dir);
}
