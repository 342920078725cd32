//! `husk run IMAGE` in real micro-VMs: the image's Cmd, Env and
//! WorkingDir apply; -e/-w/-u/--entrypoint override; a user name resolves
//! through the image's /etc/passwd and /etc/group. Three containers of one
//! image run at once (one boot each, in parallel to save time): they attach
//! the same disk file, do not see each other's writes, and leave no disk
//! use behind.

mod image_support;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use image_support::{test_image, tmpdir};
use support::{boot_timeout, husk};

fn husk_at(root: &Path) -> std::process::Command {
    let agent = husk_runtime::paths::agent_binary(None).expect("agent: run tools/build-agent");
    let mut c = husk();
    c.env("HUSK_BOOT_TIMEOUT", boot_timeout().as_secs().to_string())
        .env("HUSK_AGENT", agent)
        .arg("--root")
        .arg(root);
    c
}

fn spawn(root: &Path, args: &[&str]) -> Child {
    husk_at(root)
        .arg("run")
        .arg("--kernel")
        .arg(support::kernel())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Bytes the files under `dir` occupy on disk.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The inode of `disk` as held open by process `pid` or its child (husk
/// run's VM process), once it is.
fn held_inode(pid: u32, disk: &Path, deadline: Instant) -> u64 {
    loop {
        // husk run's VM process (its child) opens the disk.
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let fds = std::iter::once(pid.to_string())
            .chain(children.split_whitespace().map(String::from))
            .flat_map(|p| {
                std::fs::read_dir(format!("/proc/{p}/fd"))
                    .into_iter()
                    .flatten()
            })
            .flatten();
        for fd in fds {
            if std::fs::read_link(fd.path()).ok().as_deref() == Some(disk) {
                return std::fs::metadata(fd.path()).unwrap().ino();
            }
        }
        assert!(
            Instant::now() < deadline,
            "husk {pid} never opened {}",
            disk.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines up to and including "ready" (the container has written its file).
fn until_ready(r: &mut impl BufRead) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            panic!("the container ended before it was ready: {seen:?}");
        }
        seen += &line;
        if line == "ready\n" {
            return seen;
        }
    }
}

fn finish(child: Child, deadline: Instant) -> (i32, String, String) {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // Kill a stuck husk so the test reports instead of hanging.
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = waiter.join().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn image_config_overrides_and_isolated_containers_of_one_image() {
    let dir = tmpdir("image-guest");
    let (root, layout) = (dir.join("root"), dir.join("layout"));
    test_image(&layout, "v1");
    let image = format!("oci:{}:v1", layout.display());
    let pulled = husk_at(&root)
        .args(["pull", "-q", &image])
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let disks: Vec<PathBuf> = std::fs::read_dir(root.join("oci/disks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ext4"))
        .collect();
    assert_eq!(disks.len(), 1);
    let disk = std::fs::canonicalize(&disks[0]).unwrap();
    let before = disk_use(&root);

    // A: the image's Env and WorkingDir, its own write, the whiteout.
    let mut a = spawn(
        &root,
        &["-i", "--name", "a", &image, "sh", "-c",
          "echo \"$GREETING from $(cat motd)\"; echo A > /tmp/shared; echo ready; read x; cat /tmp/shared; ls /etc/motd-old 2>/dev/null || echo whited-out"],
    );
    // B: every override, and a user by name.
    let mut b = spawn(
        &root,
        &["-i", "-e", "GREETING=hi", "-w", "/etc", "-u", "app", "--entrypoint", "sh", &image, "-c",
          "echo $GREETING; pwd; id; echo $HOME; echo B > /tmp/shared; echo ready; read x; cat /tmp/shared; exit 7"],
    );
    // C: the image's own Cmd.
    let c = spawn(&root, &["--rm", &image]);

    let deadline = Instant::now() + boot_timeout() * 3;
    let (ia, ib) = (
        held_inode(a.id(), &disk, deadline),
        held_inode(b.id(), &disk, deadline),
    );
    assert_eq!(ia, ib, "both attach the same image file");
    assert_eq!(ia, std::fs::metadata(&disk).unwrap().ino());
    // Release A and B only once both have written /tmp/shared: each must
    // then read back its own write.
    // Bounded: a stuck husk is killed at the deadline, which ends the reads.
    let pids = [a.id(), b.id(), c.id()];
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
    let mut ra = BufReader::new(a.stdout.take().unwrap());
    let mut rb = BufReader::new(b.stdout.take().unwrap());
    let mut head_a = until_ready(&mut ra);
    let mut head_b = until_ready(&mut rb);
    // stdin stays open until the containers exit, as an interactive user's
    // would.
    let mut stdins: Vec<_> = [a.stdin.take(), b.stdin.take()]
        .into_iter()
        .flatten()
        .collect();
    for s in &mut stdins {
        s.write_all(b"\n").unwrap();
    }
    ra.read_to_string(&mut head_a).unwrap();
    rb.read_to_string(&mut head_b).unwrap();
    let (code_a, _, err_a) = finish(a, deadline);
    let (code_b, _, err_b) = finish(b, deadline);
    let (code_c, out_c, err_c) = finish(c, deadline);
    drop(stdins);
    let (out_a, out_b) = (head_a, head_b);
    assert_eq!(code_a, 0, "{err_a}");
    assert_eq!(
        out_a, "hello from served by husk\nready\nA\nwhited-out\n",
        "{err_a}"
    );
    assert_eq!(code_b, 7, "{err_b}");
    let lines: Vec<&str> = out_b.lines().collect();
    assert_eq!(lines[0], "hi");
    assert_eq!(lines[1], "/etc");
    assert!(
        lines[2].starts_with("uid=1000(app) gid=1000(app)"),
        "{out_b}"
    );
    assert!(
        lines[2].contains("50(staff)"),
        "supplementary group from /etc/group: {out_b}"
    );
    assert_eq!(lines[3], "/home/app");
    assert_eq!(lines[5], "B", "B does not see A's write");
    assert_eq!(code_c, 0, "{err_c}");
    assert_eq!(out_c, "hello from served by husk\n");

    // Containers' writes live in their VMs: husk's root grew by < 1 MiB
    // (the agent's boot disk and the warm template, cached once per agent
    // and kernel build, aside).
    let after =
        disk_use(&root) - disk_use(&root.join("agent-disk")) - disk_use(&root.join("templates"));
    assert!(
        after < before + (1 << 20),
        "disk use grew from {before} to {after} bytes"
    );
    // An unknown user name is a one-line error, exit 125, before any boot.
    let o = husk_at(&root)
        .args(["run", "-u", "ghost", &image, "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unable to find user ghost"));
    std::fs::remove_dir_all(&dir).unwrap();
}
