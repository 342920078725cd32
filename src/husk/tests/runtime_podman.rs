//! husk as Podman's runtime: Debian's podman 4.3 (conmon, CNI bridge) with
//! `--runtime`, `--cgroup-manager cgroupfs`, private storage, run and
//! state roots, run inside a network namespace of the test's own so that
//! its bridge and iptables rules stay off the host's. `podman run --rm`
//! (exit status, output, the address CNI gave the container on the guest's
//! eth0), a detached container with `exec` (with and without `-t`),
//! `rm -f`; nothing left behind.

mod image_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use image_support::{test_image, tmpdir};
use support::{boot_timeout, pids_naming, TestNetns};
use support::{bounded, ok_output as ok};

/// A private podman setup; dropping it removes its containers, processes,
/// mounts and namespace.
struct Podman {
    dir: PathBuf,
    runtime: PathBuf,
    netns: TestNetns,
}

impl Podman {
    fn new(dir: &Path, runtime: &Path) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let netns = TestNetns::new("podman");
        Podman {
            dir: dir.to_path_buf(),
            runtime: runtime.to_path_buf(),
            netns,
        }
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("--root={d}/root"),
            format!("--runroot={d}/runroot"),
            format!("--tmpdir={d}/tmp"),
            format!("--runtime={}", self.runtime.display()),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
        ]
    }

    fn podman(&self) -> Command {
        let mut c = self.netns.command("podman");
        c.args(self.args());
        c
    }

    /// podman under script(1), which gives it the terminal `-t` wants.
    fn podman_tty(&self, args: &str) -> Command {
        let mut c = Command::new("script");
        let cmd = format!(
            "nsenter --net=/run/netns/{} podman {} {args}",
            self.netns.0,
            self.args().join(" ")
        );
        c.args(["-qec", &cmd, "/dev/null"]);
        c
    }

    /// husk's state root: the default one, as podman 4.3 leaves out
    /// `--runtime-flag`s when it calls `delete`.
    fn state_root(&self) -> PathBuf {
        PathBuf::from(husk_runtime::runc::DEFAULT_STATE_ROOT)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = bounded(
            self.podman().args(["rm", "-af", "-t", "0"]),
            Duration::from_secs(120),
        );
        for pid in pids_naming(&self.dir.display().to_string()) {
            // SAFETY: kill(2) of processes this test's podman started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        support::unmount_under(&self.dir);
        support::remove_empty_cgroups("libpod_parent", &["conmon"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn podman_runs_containers_in_micro_vms() {
    let dir = tmpdir("podman");
    let layout = dir.join("layout");
    test_image(&layout, "v1");
    let wrapper = support::runtime_wrapper(&dir);
    let p = Podman::new(&dir.join("p"), &wrapper);
    // `pull -q` prints the image id; the name it makes follows the path.
    let id = ok(bounded(
        p.podman()
            .args(["pull", "-q"])
            .arg(format!("oci:{}:v1", layout.display())),
        Duration::from_secs(120),
    ));
    let image = id.trim().to_string();
    let image = image.as_str();
    let vm_time = boot_timeout() * 2 + Duration::from_secs(60);

    // Two VMs boot at once: a detached container and run --rm.
    let mut bg = p.podman();
    bg.args(["run", "-d", "--name", "bg", image, "sleep", "1000"]);
    let bg = std::thread::spawn(move || bounded(&mut bg, vm_time));
    let cidfile = dir.join("rm.cid");
    let o = bounded(
        p.podman()
            .args(["run", "--rm", "--cidfile"])
            .arg(&cidfile)
            .args([
                image,
                "sh",
                "-c",
                "echo hi from podman; ip -4 -o addr show eth0; exit 3",
            ]),
        vm_time,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("hi from podman\n"), "{out}");
    // CNI's address for the container is the guest's eth0's.
    assert!(out.contains("eth0") && out.contains("inet 10.88."), "{out}");
    let bg_id = ok(bg.join().unwrap()).trim().to_string();
    let rm_id = std::fs::read_to_string(&cidfile)
        .unwrap()
        .trim()
        .to_string();

    let o = bounded(
        p.podman().args(["exec", "bg", "sh", "-c", "exit 5"]),
        vm_time,
    );
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    let o = bounded(&mut p.podman_tty("exec -t bg tty"), vm_time);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/dev/pts/"),
        "{o:?}"
    );
    ok(bounded(p.podman().args(["rm", "-f", "bg"]), vm_time));

    // Nothing of husk's is left: no VMM process, no state, no VM dir.
    for id in [bg_id, rm_id] {
        let state = p.state_root().join(&id);
        assert!(pids_naming(&state.display().to_string()).is_empty());
        assert!(!state.exists(), "{} left", state.display());
        let vm = husk_runtime::runc::store::vm_dir(&state);
        assert!(!vm.exists(), "{} left", vm.display());
    }
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
