//! husk as Docker's runtime: Debian's dockerd 20.10, started here in a
//! network namespace of the test's own (its default bridge, iptables and
//! docker-proxy live there) with a private data root, exec root and socket,
//! and `"runtimes": {"husk": ...}`; stopped by PID. `docker run --runtime
//! husk` of an image `docker load`ed from a docker-archive: exit status and
//! output of `run --rm -t` (a pty in the guest) with a `-v ...:ro` volume
//! it cannot write; a detached container on Docker's bridge that pings the
//! gateway, serves a host volume's page on a port published with `-p`
//! (reached by the test on the gateway address), writes to that volume
//! and to its root (seen by `docker diff` and `docker cp`: the root is shared),
//! answers `exec` (with
//! and without `-t`), `top`, `update --memory`, `pause`/`unpause`, and
//! stops on `docker stop`'s SIGTERM. Nothing is left behind.

mod image_support;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_support::{test_image, tmpdir};
use support::{boot_timeout, pids_naming, TestNetns};
use support::{bounded, ok_output as ok};

/// A private dockerd in its own network namespace; dropping it stops it
/// and removes every process, mount and namespace it made.
struct Dockerd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    netns: TestNetns,
}

impl Dockerd {
    fn start(dir: &Path, runtime: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let netns = TestNetns::new("docker");
        let sock = dir.join("docker.sock");
        let config = serde_json::json!({
            "data-root": dir.join("data"),
            "exec-root": dir.join("exec"),
            "pidfile": dir.join("docker.pid"),
            "hosts": [format!("unix://{}", sock.display())],
            "runtimes": {"husk": {"path": runtime}},
        });
        std::fs::write(dir.join("daemon.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        // `ip netns exec` remounts /sys, which dockerd cannot live with;
        // nsenter only joins (and execs dockerd: the child is dockerd).
        let child = netns
            .command("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd (tools/install-deps installs docker.io)");
        let d = Dockerd {
            child,
            dir: dir.to_path_buf(),
            sock,
            netns,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let o = bounded(d.docker().arg("version"), Duration::from_secs(30));
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    fn docker(&self) -> Command {
        // Debian's client, which matches the daemon's API.
        let mut c = Command::new("/usr/bin/docker");
        c.arg("-H").arg(format!("unix://{}", self.sock.display()));
        c
    }

    /// runc's state root as dockerd tells the runtime.
    fn runtime_root(&self) -> PathBuf {
        self.dir.join("exec/runtime-runc/moby")
    }

    /// An HTTP GET of `addr` from inside dockerd's namespace, retried until
    /// the answer holds `needle` or `timeout` passes.
    fn http_get(&self, addr: &str, needle: &str, timeout: Duration) -> String {
        let ns = format!("/run/netns/{}", self.netns.0);
        let addr = addr.to_string();
        let needle = needle.to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            // SAFETY: setns(2) of this thread only, on a descriptor we own.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let deadline = Instant::now() + timeout;
            let mut last = String::new();
            while Instant::now() < deadline {
                let got = (|| -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(
                        &addr.parse().unwrap(),
                        Duration::from_secs(10),
                    )?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut body = String::new();
                    s.read_to_string(&mut body)?;
                    Ok(body)
                })();
                match got {
                    Ok(b) if b.contains(&needle) => return b,
                    Ok(b) => last = b,
                    Err(e) => last = e.to_string(),
                }
                // The server starts after `docker run -d` returns.
                std::thread::sleep(Duration::from_millis(500));
            }
            panic!("no answer with {needle:?} from {addr}: {last}");
        })
        .join()
        .unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // dockerd stops its containers, containerd and docker-proxy on SIGTERM.
        // SAFETY: kill(2) of the dockerd this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids_naming(&self.dir.display().to_string()) {
            // SAFETY: kill(2) of processes this test's dockerd started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        support::unmount_under(&self.dir);
        support::remove_empty_cgroups("docker", &[]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn inspect(d: &Dockerd, name: &str, format: &str) -> String {
    ok(bounded(
        d.docker().args(["inspect", "-f", format, name]),
        Duration::from_secs(60),
    ))
    .trim()
    .to_string()
}

#[test]
fn docker_runs_containers_in_micro_vms() {
    let dir = tmpdir("docker");
    let layout = dir.join("layout");
    test_image(&layout, "v1");
    let archive = dir.join("image.tar");
    ok(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:husk-test:v1", archive.display()))
        .output()
        .unwrap());
    let wrapper = support::runtime_wrapper(&dir);
    let d = Dockerd::start(&dir.join("d"), &wrapper);
    ok(bounded(
        d.docker().arg("load").arg("-i").arg(&archive),
        Duration::from_secs(120),
    ));
    let vm_time = boot_timeout() * 2 + Duration::from_secs(60);

    // Host directories as volumes (virtio-fs): the server's pages come
    // from one, the other is read-only.
    let www = dir.join("www");
    let conf = dir.join("conf");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        www.join("index.html"),
        "served by husk from a host volume\n",
    )
    .unwrap();
    std::fs::write(conf.join("app.conf"), "from the host\n").unwrap();

    // Two VMs boot at once: a detached server on the bridge, and run --rm.
    let mut web = d.docker();
    web.args([
        "run",
        "--runtime",
        "husk",
        "-d",
        "--name",
        "web",
        "-p",
        "8080:80",
        "-v",
    ])
    .arg(format!("{}:/www", www.display()))
    .args([
        "husk-test:v1",
        "sh",
        "-c",
        "trap 'exit 7' TERM; echo written in the VM > /www/from-vm.txt; \
         echo in the root > /made-in-vm; httpd -p 80 -h /www; while :; do sleep 1; done",
    ]);
    let web = std::thread::spawn(move || bounded(&mut web, vm_time));
    // With -t: the container's terminal is a pty in the guest.
    let o = bounded(
        d.docker()
            .args(["run", "--runtime", "husk", "--rm", "-t", "-v"])
            .arg(format!("{}:/conf:ro", conf.display()))
            .args([
                "husk-test:v1",
                "sh",
                "-c",
                "echo hi from docker; tty; ip -4 -o addr show eth0; cat /conf/app.conf; \
                 touch /conf/new || echo RO-REFUSED; grep '^Seccomp:' /proc/self/status; exit 3",
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
    assert!(out.starts_with("hi from docker\r\n/dev/pts/"), "{out}");
    // Docker's address for the container is the guest's eth0's.
    assert!(
        out.contains("eth0") && out.contains("inet 172.17."),
        "{out}"
    );
    assert!(out.contains("from the host\r\n"), "{out}");
    assert!(out.contains("RO-REFUSED"), "{out}");
    // Docker's default seccomp profile (in the spec) is in force in the VM.
    assert!(out.contains("Seccomp:\t2\r\n"), "{out}");
    assert!(!conf.join("new").exists());
    ok(web.join().unwrap());

    // The container reaches the bridge's gateway, and -p reaches the VM.
    let ping = bounded(
        d.docker()
            .args(["exec", "web", "busybox", "ping", "-c", "1", "-W", "30"])
            .arg("172.17.0.1"),
        vm_time,
    );
    ok(ping);
    // The VM came from a warm template (a NIC and two shares, filled with
    // this container's at restore: the template VM's command line says
    // so), and its NIC has Docker's MAC, not the template's.
    let guest = ok(bounded(
        d.docker().args([
            "exec",
            "web",
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address; grep -o husk.template /proc/cmdline",
        ]),
        vm_time,
    ));
    let mac = inspect(&d, "web", "{{.NetworkSettings.MacAddress}}");
    assert!(mac.len() == 17, "{mac:?}");
    assert_eq!(guest, format!("{mac}\nhusk.template\n"));
    let body = d.http_get(
        "172.17.0.1:8080",
        "served by husk from a host volume",
        vm_time,
    );
    assert!(body.starts_with("HTTP/1."), "{body}");
    assert_eq!(
        std::fs::read_to_string(www.join("from-vm.txt")).unwrap(),
        "written in the VM\n"
    );
    // The container's root is Docker's rootfs, shared: docker diff and
    // docker cp see what the VM wrote there.
    let diff = ok(bounded(d.docker().args(["diff", "web"]), vm_time));
    assert!(diff.lines().any(|l| l == "A /made-in-vm"), "{diff}");
    let copied = dir.join("copied");
    ok(bounded(
        d.docker().args(["cp", "web:/made-in-vm"]).arg(&copied),
        vm_time,
    ));
    assert_eq!(std::fs::read_to_string(&copied).unwrap(), "in the root\n");
    let o = bounded(
        // 5 only under a seccomp filter: execs get the container's profile.
        d.docker().args([
            "exec",
            "web",
            "sh",
            "-c",
            "grep -q '^Seccomp:.2' /proc/self/status && exit 5",
        ]),
        vm_time,
    );
    assert_eq!(o.status.code(), Some(5));
    let o = bounded(d.docker().args(["exec", "-t", "web", "tty"]), vm_time);
    assert!(ok(o).starts_with("/dev/pts/"));
    assert!(ok(bounded(d.docker().args(["top", "web"]), vm_time)).contains("vmm-serve"));
    // The VMM process is in the container's cgroup on the host (where
    // docker stats looks).
    let id = inspect(&d, "web", "{{.Id}}");
    let pid = inspect(&d, "web", "{{.State.Pid}}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory_cgroup = format!("/sys/fs/cgroup/memory/docker/{id}");
    if Path::new("/sys/fs/cgroup/memory").exists() {
        assert!(
            cgroups.contains(&format!(":memory:/docker/{id}")),
            "{cgroups}"
        );
    }

    // docker update sends linux.resources on stdin; the guest's cgroup
    // takes the new limit.
    ok(bounded(
        d.docker()
            .args(["update", "--memory", "64m", "--memory-swap", "128m", "web"]),
        vm_time,
    ));
    let limit = ok(bounded(
        d.docker().args([
            "exec",
            "web",
            "sh",
            "-c",
            "cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/memory.max",
        ]),
        vm_time,
    ));
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    ok(bounded(d.docker().args(["pause", "web"]), vm_time));
    assert_eq!(inspect(&d, "web", "{{.State.Status}}"), "paused");
    ok(bounded(d.docker().args(["unpause", "web"]), vm_time));
    assert_eq!(inspect(&d, "web", "{{.State.Status}}"), "running");

    // docker stop's SIGTERM reaches the shell's trap: exit 7, before the
    // timeout would have sent SIGKILL (137).
    let stop = boot_timeout().as_secs().to_string();
    ok(bounded(
        d.docker().args(["stop", "-t", &stop, "web"]),
        vm_time,
    ));
    assert_eq!(inspect(&d, "web", "{{.State.ExitCode}}"), "7");
    ok(bounded(d.docker().args(["rm", "web"]), vm_time));
    assert!(!Path::new(&memory_cgroup).exists(), "{memory_cgroup} left");

    // Nothing of husk's is left: no VMM process, no state.
    let root = d.runtime_root();
    assert!(pids_naming(&root.display().to_string()).is_empty());
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
