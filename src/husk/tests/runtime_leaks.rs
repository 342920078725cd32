//! Leak check of the runc command line: create/start/kill/delete cycles,
//! and cycles whose VMM process is SIGKILLed from outside before `delete
//! --force` (in turn: at a random moment of `create`, once the container
//! runs, while an `exec` runs), on bundles that name a network namespace
//! with a veth in it (so each VM gets a tap and tc filters) and a
//! cgroupsPath. Afterwards the test counts what could be left: processes,
//! taps, tc filters, mounts, VM sockets and run dirs, Unix sockets, state
//! dirs, cgroups, virtiofsd processes (each container has a host directory
//! volume), loop devices and this process's (the shim's) descriptors.
//! Several slots run at once (one namespace each: a veth serves one VM at
//! a time).
//!
//! `HUSK_LEAK_CYCLES=N,M` sets the counts (default 20 ordinary cycles and
//! 5 with the VMM killed).

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::runc_cli::{bundle, created, ok, reap, runc, spawn_create, state, Scratch};
use support::{pids_naming, TestNetns};

/// VMs booting at once.
const SLOTS: usize = 3;

fn cycles() -> (usize, usize) {
    std::env::var("HUSK_LEAK_CYCLES")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .unwrap_or((20, 5))
}

/// Runs `args` in namespace `ns`; its stdout.
fn in_ns(ns: &TestNetns, args: &[&str]) -> String {
    let o = ns.command(args[0]).args(&args[1..]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A namespace with a veth (eth0, 10.77.N.2/24) for a container to take.
fn slot_netns(n: usize) -> TestNetns {
    let ns = TestNetns::new(&format!("leak{n}"));
    in_ns(
        &ns,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    );
    in_ns(
        &ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("10.77.{n}.2/24"),
            "dev",
            "eth0",
        ],
    );
    in_ns(&ns, &["ip", "link", "set", "eth0", "up"]);
    in_ns(&ns, &["ip", "link", "set", "peer0", "up"]);
    ns
}

/// What a container could leave behind in its namespace: interfaces
/// beyond lo/eth0/peer0 (taps), and qdiscs/filters on eth0.
fn netns_leftovers(ns: &TestNetns) -> Vec<String> {
    let mut left: Vec<String> = in_ns(ns, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| !["lo", "eth0", "peer0"].contains(&n.as_str()))
        .collect();
    left.extend(
        in_ns(ns, &["tc", "filter", "show", "dev", "eth0", "ingress"])
            .lines()
            .map(|l| format!("filter: {l}")),
    );
    left.extend(
        in_ns(ns, &["tc", "qdisc", "show", "dev", "eth0"])
            .lines()
            .filter(|l| l.contains("ingress"))
            .map(|l| format!("qdisc: {l}")),
    );
    left
}

/// When a cycle SIGKILLs its VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// Never: `kill` (SIGTERM) and `delete`.
    Never,
    /// This long after `create` started it (hooks, network, VM build and
    /// boot, agent handshake: wherever that is).
    DuringCreate(Duration),
    /// Once the container runs.
    AfterStart,
    /// While an `exec` runs in the container.
    DuringExec,
}

/// The kill of killed cycle `k`: the three kinds in turn, create's delay
/// random in 0-8 s (from `seed`).
fn kill_of(k: usize, seed: u64) -> Kill {
    match k % 3 {
        0 => {
            // splitmix64
            let mut z = seed.wrapping_add((k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            Kill::DuringCreate(Duration::from_millis((z ^ (z >> 31)) % 8000))
        }
        1 => Kill::AfterStart,
        _ => Kill::DuringExec,
    }
}

/// Waits (bounded) for the VMM process of container `id` to appear.
fn vmm_pid(root: &Path, id: &str) -> i32 {
    // Only its command line names the container's state dir.
    let needle = root.join(id).display().to_string();
    let deadline = Instant::now() + support::boot_timeout();
    loop {
        if let Some(pid) = pids_naming(&needle).first() {
            return *pid;
        }
        assert!(Instant::now() < deadline, "no VMM process for {id}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps `pid` if it is ours to reap (a VMM killed while `create`, its
/// parent, was still there is `create`'s).
fn reap_if_ours(pid: i32) {
    let deadline = Instant::now() + support::boot_timeout();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a pid we may be the (sub)reaper of.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 {
            return; // reaped, or not our child
        }
        assert!(Instant::now() < deadline, "VMM {pid} did not go");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One cycle on slot `ns`: create and start; then either kill (SIGTERM,
/// which the container's trap turns into exit 0) and delete, or SIGKILL
/// the VMM process from outside (`kill`) and delete --force.
fn cycle(root: &Path, dir: &Path, ns: &TestNetns, cg: &str, id: &str, kill: Kill) {
    let b = bundle(
        dir,
        id,
        &[
            "sh",
            "-c",
            // The root is read-only (runc spec's default), the volume not.
            "trap 'exit 0' TERM; touch /vol/$HOSTNAME; touch /x 2>/dev/null && echo rw-root; \
             echo ready; while :; do sleep 1; done",
        ],
    );
    let path = b.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let nss = cfg["linux"]["namespaces"].as_array_mut().unwrap();
    nss.retain(|n| n["type"] != "network");
    nss.push(serde_json::json!({"type": "network", "path": format!("/run/netns/{}", ns.0)}));
    cfg["linux"]["cgroupsPath"] = format!("/{cg}/{id}").into();
    // A host directory volume: a virtiofsd per VM, to be gone too.
    cfg["hostname"] = id.into();
    cfg["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/vol", "type": "bind",
            "source": dir.join("vol"), "options": ["rbind", "rw"]
        }));
    std::fs::write(&path, cfg.to_string()).unwrap();

    let child = spawn_create(root, &b, id);
    if let Kill::DuringCreate(after) = kill {
        let mut child = child;
        let pid = vmm_pid(root, id);
        std::thread::sleep(after);
        // SAFETY: kill(2) of the VMM process just found.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + support::boot_timeout();
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "create did not return");
            std::thread::sleep(Duration::from_millis(20));
        }
        reap_if_ours(pid);
        ok(&runc(root).args(["delete", "--force", id]).output().unwrap());
        let _ = std::fs::remove_dir_all(&b);
        return;
    }
    let mut c = created(child, &b);
    ok(&runc(root).args(["start", id]).output().unwrap());
    // PID 1 ignores a SIGTERM that comes before its trap is set: wait for
    // the container to say it is (the VMM process relays its stdout).
    let mut line = [0u8; 6];
    c.stdout.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"ready\n");
    assert_eq!(state(root, id)["status"], "running");
    if kill != Kill::Never {
        let exec = (kill == Kill::DuringExec).then(|| {
            let mut e = runc(root)
                .args(["exec", id, "sh", "-c", "echo in-exec; sleep 1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut line = [0u8; 8];
            e.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
            assert_eq!(&line, b"in-exec\n");
            e
        });
        // SAFETY: kill(2) of our own (reparented) child.
        unsafe { libc::kill(c.pid, libc::SIGKILL) };
        assert_eq!(reap(c.pid), 137);
        if let Some(mut e) = exec {
            // The exec loses its container with the VM, and says so.
            let deadline = Instant::now() + support::boot_timeout();
            let status = loop {
                if let Some(s) = e.try_wait().unwrap() {
                    break s;
                }
                assert!(Instant::now() < deadline, "exec outlived its VM");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(!status.success(), "exec of a killed VM: {status}");
        }
        ok(&runc(root).args(["delete", "--force", id]).output().unwrap());
    } else {
        ok(&runc(root).args(["kill", id, "TERM"]).output().unwrap());
        assert_eq!(reap(c.pid), 0);
        ok(&runc(root).args(["delete", id]).output().unwrap());
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&b);
}

/// husk's transient virtio-fs socket directories.
fn fs_socket_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/run")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("husk-fs-"))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[test]
fn cycles_leave_nothing_behind() {
    // SAFETY: prctl with plain integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let dir = Scratch(std::env::temp_dir().join(format!("husk-leaks-{}", std::process::id())));
    let root = dir.0.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let cg = format!("husk-leaks-{}", std::process::id());
    let vol = dir.0.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let fs_dirs_before = fs_socket_dirs();
    let slots: Vec<TestNetns> = (0..SLOTS).map(slot_netns).collect();
    let vm_dirs_before = vm_dirs();
    let loops_before = loop_devices();
    let fds_before = open_fds();
    let (plain, killed) = cycles();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let started = Instant::now();

    std::thread::scope(|s| {
        for (n, ns) in slots.iter().enumerate() {
            let (root, dir, cg) = (&root, &dir.0, &cg);
            s.spawn(move || {
                for i in (n..plain + killed).step_by(SLOTS) {
                    let kill = match i.checked_sub(plain) {
                        None => Kill::Never,
                        Some(k) => kill_of(k, seed),
                    };
                    cycle(root, dir, ns, cg, &format!("c{i}"), kill);
                }
            });
        }
    });
    let kills: Vec<Kill> = (0..killed).map(|k| kill_of(k, seed)).collect();
    eprintln!(
        "{plain} + {killed} cycles on {SLOTS} slots: {:.0} s; VMMs killed: {kills:?} (seed {seed})",
        started.elapsed().as_secs_f64()
    );

    // Counted after: nothing of any cycle is left.
    assert!(
        pids_naming(&root.display().to_string()).is_empty(),
        "processes left"
    );
    assert!(
        pids_naming(&format!("source={}", vol.display())).is_empty(),
        "virtiofsd left"
    );
    assert_eq!(
        fs_socket_dirs(),
        fs_dirs_before,
        "virtio-fs socket dirs left"
    );
    for i in 0..plain + killed {
        // A VMM killed during create may go before its container runs.
        let during_create = i >= plain && matches!(kill_of(i - plain, seed), Kill::DuringCreate(_));
        assert!(
            during_create || vol.join(format!("c{i}")).exists(),
            "c{i} wrote to its volume"
        );
    }
    let states: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(states.is_empty(), "state dirs left: {states:?}");
    let new_vm_dirs: Vec<PathBuf> = vm_dirs()
        .into_iter()
        .filter(|d| !vm_dirs_before.contains(d))
        .collect();
    assert!(
        new_vm_dirs.is_empty(),
        "VM dirs (sockets) left: {new_vm_dirs:?}"
    );
    for ns in &slots {
        assert_eq!(netns_leftovers(ns), Vec::<String>::new(), "in {}", ns.0);
        // The VMM's sockets are bound in the namespace it lived in.
        let unix = in_ns(ns, &["cat", "/proc/net/unix"]);
        let left: Vec<&str> = unix.lines().filter(|l| ours(l, &dir.0)).collect();
        assert!(left.is_empty(), "Unix sockets left in {}: {left:?}", ns.0);
    }
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let left: Vec<&str> = unix.lines().filter(|l| ours(l, &dir.0)).collect();
    assert!(left.is_empty(), "Unix sockets left: {left:?}");
    assert_eq!(loop_devices(), loops_before, "loop devices");
    assert_eq!(
        open_fds(),
        fds_before,
        "descriptors of the shim (this test)"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*dir.0.to_string_lossy()) || l.contains("/run/husk-vm"))
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:?}");
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let parent = h.path().join(&cg);
        let children: Vec<_> = std::fs::read_dir(&parent)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        assert!(children.is_empty(), "cgroups left: {children:?}");
        // The shared parent stays when its last container was deleted
        // while another was being made; remove it for the next run.
        let _ = std::fs::remove_dir(&parent);
    }
}

/// A /proc/net/unix line of a socket husk made (a VM's, a share's).
fn ours(line: &str, scratch: &Path) -> bool {
    line.contains(husk_runtime::runc::store::VM_DIR_ROOT)
        || line.contains("/run/husk-fs-")
        || line.contains(&*scratch.to_string_lossy())
}

/// Loop devices with a backing file.
fn loop_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("loop/backing_file").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// This process's open descriptors (the shim's view: pipes to each VMM
/// process, the pid files it read).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn vm_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(husk_runtime::runc::store::VM_DIR_ROOT)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}
