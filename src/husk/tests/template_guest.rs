//! Warm templates with a real guest: the first `husk run` boots and
//! snapshots the template, later ones restore it. Two restores running at
//! the same time each see their own root disk, their own host directory
//! (a virtio-fs share, served by a virtiofsd of its own), their own random
//! numbers and boot ID, and the current time; a broken template costs a
//! cold boot, not the run, and is removed.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{boot_timeout, busybox_tree, husk, kernel};

/// `husk` with a private root (templates, caches) and the suite's kernel
/// and agent.
fn husk_in(root: &Path, agent: &Path) -> Command {
    let mut c = husk();
    c.env("HUSK_ROOT", root)
        .env("HUSK_KERNEL", kernel())
        .env("HUSK_AGENT", agent)
        .env("HUSK_BOOT_TIMEOUT", boot_timeout().as_secs().to_string())
        .env_remove("HUSK_TEMPLATE");
    c
}

/// A busybox root whose /marker says `name`.
fn tree(dir: &Path, name: &str) -> PathBuf {
    let root = busybox_tree(&dir.join(name));
    std::fs::write(root.join("marker"), name).unwrap();
    root
}

/// A host directory for `name`'s run, with a file saying `name`.
fn volume(dir: &Path, name: &str) -> PathBuf {
    let v = dir.join(format!("{name}-volume"));
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("host.txt"), format!("host {name}")).unwrap();
    v
}

const SCRIPT: &str = "cat /marker; echo; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; \
     echo; date +%s; cat /vol/host.txt; echo; cat /marker > /vol/guest.txt; \
     cat /proc/sys/kernel/random/boot_id";

/// `husk run` of SCRIPT on `rootfs`, with `vol` at /vol.
fn spawn(root: &Path, agent: &Path, rootfs: &Path, vol: &Path) -> Child {
    husk_in(root, agent)
        .args(["run", "--timing", "--rootfs"])
        .arg(rootfs)
        .arg("-v")
        .arg(format!("{}:/vol", vol.display()))
        .args(["--", "sh", "-c", SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A process of a template's VMM (`husk vm --config .../vm.json` in a
/// template build dir) seen while a run built the template.
#[derive(Debug)]
struct Seen {
    uid: u32,
    pid_ns: String,
    mnt_ns: String,
}

fn template_vmms() -> Vec<Seen> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let Ok(cmdline) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let args: Vec<_> = cmdline.split(|b| *b == 0).collect();
        let built = args.windows(3).any(|w| {
            w[0] == b"vm"
                && w[1] == b"--config"
                && String::from_utf8_lossy(w[2]).contains("/templates/.build-")
        });
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok());
        let ns =
            |n: &str| std::fs::read_link(p.join("ns").join(n)).map(|l| l.display().to_string());
        if let (true, Some(uid), Ok(pid_ns), Ok(mnt_ns)) = (built, uid, ns("pid"), ns("mnt")) {
            out.push(Seen {
                uid,
                pid_ns,
                mnt_ns,
            });
        }
    }
    out
}

/// Waits for `child` (bounded) while looking at its template VMM's
/// processes.
fn watch_template_build(child: &mut Child) -> Vec<Seen> {
    let deadline = Instant::now() + boot_timeout() * 3;
    let mut seen = Vec::new();
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        seen.extend(template_vmms());
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// Waits for `child` (bounded); its stdout lines and stderr.
fn finish(mut child: Child) -> (Vec<String>, String) {
    let deadline = Instant::now() + boot_timeout() * 3;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("husk run did not finish within {:?}", boot_timeout() * 3);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}: {stdout}{stderr}",
        out.status
    );
    (stdout.lines().map(str::to_owned).collect(), stderr)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn templates(root: &Path, agent: &Path) -> Vec<String> {
    let out = husk_in(root, agent)
        .args(["template", "ls"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn restores_of_one_template_run_containers_apart() {
    let dir = std::env::temp_dir().join(format!("husk-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("husk-root");
    std::fs::create_dir_all(&root).unwrap();
    let agent = husk_runtime::paths::agent_binary(None).expect("the agent (tools/build-agent)");
    let (a, b) = (tree(&dir, "A"), tree(&dir, "B"));
    let (va, vb) = (volume(&dir, "A"), volume(&dir, "B"));

    // The first run boots the guest and leaves the template behind. The
    // template's VM runs in a jailed process of its own: not root, in its
    // own PID and mount namespaces; it is gone once the run ends.
    let mut first = spawn(&root, &agent, &a, &va);
    let seen = watch_template_build(&mut first);
    let (lines, err) = finish(first);
    assert_eq!(lines[0], "A", "{err}");
    assert_eq!(templates(&root, &agent).len(), 1, "{err}");
    // Listed with its shape (a root disk, a share) as current, and so
    // kept by prune.
    let ls = husk_in(&root, &agent)
        .args(["template", "ls"])
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.contains(" current ") && ls.contains("root disk yes, 0 NIC, 1 share"),
        "{ls}"
    );
    let pruned = husk_in(&root, &agent)
        .args(["template", "prune"])
        .output()
        .unwrap();
    assert!(pruned.status.success(), "{pruned:?}");
    assert_eq!(
        templates(&root, &agent).len(),
        1,
        "prune removed a current one"
    );
    let ns = |n: &str| {
        std::fs::read_link(format!("/proc/self/ns/{n}"))
            .unwrap()
            .display()
            .to_string()
    };
    assert!(
        seen.iter()
            .any(|s| s.uid >= 0x7000_0000 && s.pid_ns != ns("pid") && s.mnt_ns != ns("mnt")),
        "no jailed template VMM among {seen:?}"
    );
    assert!(template_vmms().is_empty(), "{:?}", template_vmms());

    // Two restores at once.
    let before = now_s();
    std::fs::remove_file(va.join("guest.txt")).unwrap();
    let (ca, cb) = (spawn(&root, &agent, &a, &va), spawn(&root, &agent, &b, &vb));
    let ((la, ea), (lb, eb)) = (finish(ca), finish(cb));
    for (lines, err, marker, vol) in [(&la, &ea, "A", &va), (&lb, &eb, "B", &vb)] {
        assert!(err.contains("template=restored"), "{err}");
        assert_eq!(lines.len(), 5, "{lines:?} {err}");
        // Its own root disk, in the slot the template booted with a placeholder.
        assert_eq!(lines[0], marker);
        // Its own host directory, in the share slot the template booted
        // with an empty one: read and written.
        assert_eq!(lines[3], format!("host {marker}"));
        assert_eq!(
            std::fs::read_to_string(vol.join("guest.txt")).unwrap(),
            marker
        );
        // The guest's clock moved on to now (not the template's time).
        let t: u64 = lines[2].parse().unwrap();
        assert!(
            t + 1 >= before && t <= now_s() + 1,
            "guest {t}, host {before}..{}",
            now_s()
        );
    }
    // The RNG was reseeded in each: the same template, different numbers.
    assert_eq!(la[1].len(), 32);
    assert_ne!(la[1], lb[1], "both restores read the same random bytes");
    // And the kernel's boot ID, made at its first read (after the reseed).
    assert_eq!(la[4].len(), 36, "{la:?}");
    assert_ne!(la[4], lb[4], "both restores have the same boot_id");

    // A broken template: the run boots instead, and the template is gone.
    let key = &templates(&root, &agent)[0];
    let memory = root.join("templates").join(key).join("memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let (lines, err) = finish(spawn(&root, &agent, &b, &vb));
    assert_eq!(lines[0], "B", "{err}");
    assert!(err.contains("cannot restore template"), "{err}");
    assert!(!err.contains("template=restored"), "{err}");
    assert!(templates(&root, &agent).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
