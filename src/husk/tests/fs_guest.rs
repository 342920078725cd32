//! Host directories in a real Linux guest through virtio-fs and a real
//! virtiofsd: one `husk vm` boot checks a read-write share both ways
//! (byte-exact, a 16 MiB file by sha256, a 1000-file listing, a host write
//! seen live), a read-only share refusing writes, then the backend killed
//! mid-run: the guest's reads fail with an error, the VMM keeps serving
//! the console and exits cleanly. A second boot runs `husk run -v`.
//!
//! Needs root, busybox-static, e2fsprogs and qemu-system-common (virtiofsd).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use support::{boot_timeout, busybox_tree, husk, kernel, ok_output, run_with_timeout};

const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 root=/dev/vda ro rootfstype=ext4 init=/init";

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("husk-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sh(script: &str) -> String {
    ok_output(Command::new("sh").args(["-c", script]).output().unwrap())
}

/// `sha256sum` of a host file (hex only).
fn sha256(p: &Path) -> String {
    let out = sh(&format!("sha256sum '{}'", p.display()));
    out.split_whitespace().next().unwrap().to_string()
}

/// Live virtiofsd processes serving `dir`.
fn virtiofsd_for(dir: &Path) -> Vec<i32> {
    support::pids_naming(&format!("source={}", dir.display()))
}

const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t virtiofs rw /rw || echo MOUNT-RW-FAILED
mount -t virtiofs ro /ro || echo MOUNT-RO-FAILED
echo "HOSTSUM $(sha256sum /rw/host.bin)"
cp /rw/host.bin /rw/copy.bin && echo COPIED
echo "from the guest" > /rw/guest.txt
echo "LIST $(ls /rw/files | wc -l) $(ls /rw/files | md5sum)"
echo "RO $(cat /ro/ro.txt)"
if echo x > /ro/new.txt; then echo RO-WRITE-OK; else echo RO-WRITE-REFUSED; fi
echo READY
i=0
while [ ! -e /rw/later.txt ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
echo "LATER $(cat /rw/later.txt)"
echo WAITING-FOR-KILL
i=0
while cat /rw/guest.txt > /dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
if cat /rw/guest.txt; then echo STILL-READABLE; else echo READ-FAILED; fi
echo "AFTER the backend died, the console still works"
reboot -f
"#;

/// Reads the console line by line into a channel.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a console line starting with `marker`; returns it. Every
/// line seen goes to `log`.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    marker: &str,
    deadline: Instant,
    log: &mut Vec<String>,
) -> String {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                log.push(l.clone());
                if l.starts_with(marker) {
                    return l;
                }
            }
            Err(e) => panic!(
                "no {marker:?} on the console ({e}); console:\n{}",
                log.join("\n")
            ),
        }
    }
}

#[test]
fn shares_work_both_ways_and_a_dead_backend_fails_reads_not_the_vmm() {
    let s = Scratch::new("vm");
    let (rw, ro) = (s.0.join("rw"), s.0.join("ro"));
    std::fs::create_dir_all(rw.join("files")).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    sh(&format!(
        "head -c 16777216 /dev/urandom > '{}/host.bin'",
        rw.display()
    ));
    for i in 0..1000 {
        std::fs::write(rw.join("files").join(format!("f{i:04}")), i.to_string()).unwrap();
    }
    std::fs::write(ro.join("ro.txt"), "read only\n").unwrap();
    let listing = sh(&format!(
        "cd '{}/files' && LC_ALL=C ls | md5sum",
        rw.display()
    ));
    let listing = listing.split_whitespace().next().unwrap().to_string();
    let host_sum = sha256(&rw.join("host.bin"));

    let tree = busybox_tree(&s.0);
    for d in ["rw", "ro"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::write(tree.join("init"), INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = husk_image::ext4::image_for_dir(&tree, &s.0.join("images")).unwrap();

    let mut child = husk()
        .arg("vm")
        .arg("--kernel")
        .arg(kernel())
        .arg("--cmdline")
        .arg(CMDLINE)
        .arg("--disk")
        .arg(format!("path={},ro", image.display()))
        .arg("--fs")
        .arg(format!("tag=rw,dir={}", rw.display()))
        .arg("--fs")
        .arg(format!("tag=ro,dir={},ro", ro.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    let deadline = Instant::now() + boot_timeout();
    let mut log = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let l = wait_line(&rx, "HOSTSUM", deadline, &mut log);
        assert!(
            l.contains(&host_sum),
            "guest read {l:?}, host has {host_sum}"
        );
        wait_line(&rx, "COPIED", deadline, &mut log);
        let l = wait_line(&rx, "LIST", deadline, &mut log);
        assert_eq!(
            l,
            format!("LIST 1000 {listing}  -"),
            "the guest lists what the host has"
        );
        assert_eq!(wait_line(&rx, "RO ", deadline, &mut log), "RO read only");
        wait_line(&rx, "RO-WRITE", deadline, &mut log);
        assert_eq!(log.last().unwrap(), "RO-WRITE-REFUSED");
        wait_line(&rx, "READY", deadline, &mut log);
        // Written by the guest, read on the host byte-exact.
        assert_eq!(sha256(&rw.join("copy.bin")), host_sum, "16 MiB round trip");
        assert_eq!(
            std::fs::read(rw.join("guest.txt")).unwrap(),
            b"from the guest\n"
        );
        assert!(!ro.join("new.txt").exists());
        // Written on the host while the guest runs, seen by the guest.
        std::fs::write(rw.join("later.txt"), "written later\n").unwrap();
        assert_eq!(
            wait_line(&rx, "LATER", deadline, &mut log),
            "LATER written later"
        );
        wait_line(&rx, "WAITING-FOR-KILL", deadline, &mut log);
        let pids = virtiofsd_for(&rw);
        assert!(!pids.is_empty(), "the rw share's virtiofsd runs");
        for pid in pids {
            // SAFETY: signalling a process found by its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_line(&rx, "READ-FAILED", deadline, &mut log);
        wait_line(&rx, "AFTER", deadline, &mut log);
    }));
    if result.is_err() {
        let _ = child.kill();
    }
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VMM did not exit after the guest rebooted");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    if let Err(e) = result {
        eprintln!("husk stderr:\n{stderr}");
        std::panic::resume_unwind(e);
    }
    assert!(status.success(), "husk vm: {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("backend lost"),
        "the VMM said what happened: {stderr}"
    );
    assert!(
        virtiofsd_for(&rw).is_empty() && virtiofsd_for(&ro).is_empty(),
        "virtiofsd left running"
    );
}

#[test]
fn husk_run_volumes_are_shared_live_and_ro_is_refused() {
    let s = Scratch::new("run");
    let (data, ro) = (s.0.join("data"), s.0.join("conf"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(data.join("in.txt"), "to the container\n").unwrap();
    std::fs::write(ro.join("app.conf"), "setting=1\n").unwrap();
    let tree = busybox_tree(&s.0);
    let mut cmd = husk();
    cmd.arg("run")
        .arg("--rootfs")
        .arg(&tree)
        .arg("--kernel")
        .arg(kernel())
        .arg("--boot-timeout")
        .arg(boot_timeout().as_secs().to_string())
        .arg("-v")
        .arg(format!("{}:/data", data.display()))
        .arg("-v")
        .arg(format!("{}:/etc/app:ro", ro.display()))
        .args(["--", "sh", "-c"])
        .arg(
            "cat /data/in.txt; cat /etc/app/app.conf; echo out > /data/out.txt; \
             if echo x > /etc/app/new; then echo RO-OK; else echo RO-REFUSED; fi; \
             mkdir /data/sub && echo deep > /data/sub/f",
        );
    let out = run_with_timeout(cmd, None, boot_timeout());
    let stdout = ok_output(out);
    assert_eq!(
        stdout, "to the container\nsetting=1\nRO-REFUSED\n",
        "the container sees the host's files; ro is refused"
    );
    assert_eq!(std::fs::read(data.join("out.txt")).unwrap(), b"out\n");
    assert_eq!(std::fs::read(data.join("sub/f")).unwrap(), b"deep\n");
    assert!(!ro.join("new").exists());
    assert!(virtiofsd_for(&data).is_empty(), "virtiofsd left running");

    // A missing directory is one line and no VM.
    let mut cmd = husk();
    cmd.args(["run", "--rootfs"])
        .arg(&tree)
        .arg("-v")
        .arg(format!("{}:/x", s.0.join("missing").display()))
        .args(["--", "true"]);
    let out = run_with_timeout(cmd, None, boot_timeout());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("husk: volume /x: "), "{err}");
}
