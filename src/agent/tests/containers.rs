//! Host-side integration tests: the agent's request handling, driven over
//! Unix socket pairs, runs real containers from a busybox tree (namespaces,
//! overlayfs, cgroups, pivot_root) as root; without root they fail.
//!
//! Everything a container mounts lives in its own mount namespace and goes
//! away with it; cgroups are created under the test process's own cgroup
//! and removed when the container exits; the temporary directory is
//! removed by a guard, also on failure.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use husk_agent::agent::{Agent, AgentConfig};
use husk_agent::reaper::{ProcessTable, ReapMode};
use husk_agent::server::serve_control;
use husk_agent::stdio::serve_stdio;
use husk_proto::oci_spec::runtime::{Process, Spec};
use husk_proto::{
    read_frame, write_frame, Client, CreateContainer, ErrorCode, Exec, ExitStatus, Hello,
    ProcessRef, ProtoError, Request, ResizeTty, Rootfs, Scratch, Signal, StreamHello, StreamKind,
    StreamReply, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "pwd", "env", "true", "false", "sleep", "tty", "hostname", "ls",
    "head", "grep", "test", "stty", "touch", "wc", "mkdir", "mknod",
];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn table() -> Arc<ProcessTable> {
    static TABLE: OnceLock<Arc<ProcessTable>> = OnceLock::new();
    Arc::clone(TABLE.get_or_init(|| ProcessTable::start(ReapMode::Tracked).unwrap()))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One agent with a busybox root filesystem in a temporary directory.
struct Harness {
    agent: Arc<Agent>,
    client: Client<UnixStream>,
    rootfs: PathBuf,
    tmp: TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Kills whatever is left and waits for it (and its cleanup).
        self.agent.shutdown();
    }
}

fn harness(name: &str) -> Harness {
    harness_with(name, false)
}

/// A harness whose agent makes a spare cgroup (as the guest's does).
fn harness_with(name: &str, spare_cgroup: bool) -> Harness {
    // A missing precondition fails: a test that passes without running
    // would hide a regression (tools/test runs as root).
    assert!(is_root(), "the container tests need root");
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "husk-agent-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let tmp = TempDir(dir.clone());
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    fs::write(rootfs.join("bin/notexec"), "#!/bin/sh\necho nope\n").unwrap();
    fs::set_permissions(
        rootfs.join("bin/notexec"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nu:x:1000:1000::/:/bin/sh\n",
    )
    .unwrap();

    let cfg = AgentConfig {
        staging_dir: dir.join("run"),
        drain_timeout: Duration::from_secs(10),
        spare_cgroup,
        ..AgentConfig::default()
    };
    let agent = Agent::new(cfg, table(), 1, Box::new(|| {}));
    agent.set_ready();
    let (a, b) = UnixStream::pair().unwrap();
    let server_agent = Arc::clone(&agent);
    thread::spawn(move || serve_control(&server_agent, b));
    let client = Client::connect(a, &Hello::new("test", "0")).unwrap();
    Harness {
        agent,
        client,
        rootfs,
        tmp,
    }
}

/// A spec for `args` with busybox defaults; `extra` is merged in.
fn spec(args: &[&str], extra: Value) -> Box<Spec> {
    let mut base = json!({
        "ociVersion": "1.0.2",
        "hostname": "box",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
        },
    });
    merge(&mut base, extra);
    Box::new(serde_json::from_value(base).unwrap())
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

impl Harness {
    fn create(&mut self, id: &str, spec: Box<Spec>, stdin: bool) -> Result<i32, ProtoError> {
        let req = CreateContainer {
            container_id: id.into(),
            spec,
            rootfs: Rootfs {
                device: self.rootfs.clone(),
                fstype: "bind".into(),
                read_only: true,
                size_bytes: None,
            },
            scratch: Scratch::Tmpfs {
                size_bytes: Some(64 << 20),
            },
            stdin,
            files: Vec::new(),
            shares: Vec::new(),
        };
        self.client.create_container(req).map(|info| info.pid)
    }

    /// Attaches a stream; returns the host end.
    fn attach(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StreamKind,
    ) -> Result<UnixStream, String> {
        let a = self.send_hello(id, exec_id, stream, 0);
        attached(a)
    }

    /// A stdio connection with its hello sent (the reply not read).
    fn send_hello(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StreamKind,
        wait_ms: u64,
    ) -> UnixStream {
        let (mut a, b) = UnixStream::pair().unwrap();
        let agent = Arc::clone(&self.agent);
        thread::spawn(move || serve_stdio(&agent, b));
        let hello = StreamHello {
            version: PROTOCOL_VERSION,
            container_id: id.into(),
            exec_id: exec_id.map(Into::into),
            stream,
            wait_ms,
        };
        write_frame(&mut a, &hello).unwrap();
        a
    }

    fn wait(&mut self, id: &str, exec_id: Option<&str>) -> ExitStatus {
        self.client
            .wait(ProcessRef {
                container_id: id.into(),
                exec_id: exec_id.map(Into::into),
            })
            .unwrap()
    }

    /// SIGKILLs a container's init and waits for its 137.
    fn kill_init(&mut self, id: &str) {
        self.client
            .signal(Signal {
                container_id: id.into(),
                exec_id: None,
                signal: 9,
            })
            .unwrap();
        assert_eq!(self.wait(id, None).exit_code, 137);
    }

    /// Create, attach stdout/stderr, start, wait.
    fn run(&mut self, id: &str, spec: Box<Spec>) -> Run {
        self.create(id, spec, false).unwrap();
        let out = reader(self.attach(id, None, StreamKind::Stdout).unwrap());
        let err = reader(self.attach(id, None, StreamKind::Stderr).unwrap());
        self.client.start(id).unwrap();
        let status = self.wait(id, None);
        Run {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

/// The stream, if the agent's reply to its hello attached it.
fn attached(mut a: UnixStream) -> Result<UnixStream, String> {
    match read_frame(&mut a).unwrap() {
        StreamReply::Attached => Ok(a),
        StreamReply::Rejected(e) => Err(e.message),
    }
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn reader(mut s: UnixStream) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    })
}

#[test]
fn echo_goes_to_stdout_and_stderr_separately() {
    let mut h = harness("echo");
    let r = h.run(
        "c1",
        spec(&["sh", "-c", "echo hi; echo oops >&2"], json!({})),
    );
    assert_eq!(
        (r.status.exit_code, r.status.signal, r.status.oom_killed),
        (0, None, false)
    );
    assert_eq!(r.stdout, "hi\n");
    assert_eq!(r.stderr, "oops\n");
    let t = r.status.timestamps;
    assert!(
        t.created_ns.unwrap() <= t.exec_ns.unwrap() && t.exec_ns.unwrap() <= t.exited_ns.unwrap(),
        "{t:?}"
    );
}

#[test]
fn a_dev_symlink_in_the_image_stays_inside_the_root() {
    let mut h = harness("devlink");
    fs::remove_dir(h.rootfs.join("dev")).unwrap();
    fs::create_dir(h.rootfs.join("realdev")).unwrap();
    symlink("/realdev", h.rootfs.join("dev")).unwrap();
    let r = h.run(
        "c",
        spec(
            &[
                "sh",
                "-c",
                "echo x >/dev/null && test -c /realdev/zero && echo ok",
            ],
            json!({}),
        ),
    );
    assert_eq!(
        (r.status.exit_code, r.stdout.as_str()),
        (0, "ok\n"),
        "{}",
        r.stderr
    );
    assert!(!Path::new("/realdev").exists(), "made on the host");
}

#[test]
fn exit_codes_and_exec_failures() {
    let mut h = harness("exit");
    let r = h.run("three", spec(&["sh", "-c", "exit 3"], json!({})));
    assert_eq!(r.status.exit_code, 3);

    let r = h.run("missing", spec(&["nosuchprogram", "x"], json!({})));
    assert_eq!(r.status.exit_code, 127);
    assert_eq!(
        r.stderr,
        "exec: \"nosuchprogram\": executable file not found in $PATH\n"
    );

    let r = h.run("missing-path", spec(&["/bin/nosuch"], json!({})));
    assert_eq!(r.status.exit_code, 127);
    assert!(
        r.stderr.contains("no such file or directory"),
        "{}",
        r.stderr
    );

    let r = h.run("notexec", spec(&["/bin/notexec"], json!({})));
    assert_eq!(r.status.exit_code, 126);
    assert!(r.stderr.contains("permission denied"), "{}", r.stderr);
    assert_eq!(r.stdout, "");
}

#[test]
fn env_cwd_user_and_hostname() {
    let mut h = harness("env");
    let s = spec(
        &[
            "sh",
            "-c",
            "echo $FOO; pwd; id -u; id -g; id -G; hostname; echo w > /dev/stdout; \
             stat -c '%n %a %u:%g %t:%T' /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty; \
             echo x > /dev/null && head -c 1 /dev/zero | wc -c",
        ],
        json!({"process": {
            "env": ["PATH=/bin", "FOO=bar baz"],
            "cwd": "/work/dir",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000, 3000]},
        }}),
    );
    let r = h.run("env", s);
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.stdout,
        "bar baz\n/work/dir\n1000\n1000\n1000 2000 3000\nbox\nw\n\
         /dev/null 666 0:0 1:3\n/dev/zero 666 0:0 1:5\n/dev/full 666 0:0 1:7\n\
         /dev/random 666 0:0 1:8\n/dev/urandom 666 0:0 1:9\n/dev/tty 666 0:0 5:0\n1\n"
    );
    assert_eq!(r.status.exit_code, 0);
}

#[test]
fn spec_devices_get_their_mode_owner_and_place() {
    let mut h = harness("devnodes");
    let script = "stat -c '%n %a %u:%g %t:%T %F' /dev/fuse /dev/null /dev/net/tun /dev/myfifo";
    let devices = json!({"linux": {"devices": [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
         "fileMode": 416, "uid": 1000, "gid": 1001},
        // A default node listed again is replaced by the spec's.
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 384},
        {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
        {"path": "/dev/myfifo", "type": "p", "fileMode": 2544},
    ]}});
    let r = h.run("nodes", spec(&["sh", "-c", script], devices));
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.stdout,
        "/dev/fuse 640 1000:1001 a:e5 character special file\n\
         /dev/null 600 0:0 1:3 character special file\n\
         /dev/net/tun 666 0:0 a:c8 character special file\n\
         /dev/myfifo 4760 0:0 0:0 fifo\n"
    );
    assert_eq!(r.status.exit_code, 0);
}

#[test]
fn streams_opened_before_the_create_attach_once_it_ends() {
    let mut h = harness("early");
    let long = 60_000;
    // Hellos first (as husk run sends them while the create runs), then
    // the create: both streams attach and carry the output.
    let out = h.send_hello("early", None, StreamKind::Stdout, long);
    let err = h.send_hello("early", None, StreamKind::Stderr, long);
    thread::sleep(Duration::from_millis(100));
    let script = spec(&["sh", "-c", "echo out; echo err >&2"], json!({}));
    h.create("early", script, false).unwrap();
    let (out, err) = (
        reader(attached(out).unwrap()),
        reader(attached(err).unwrap()),
    );
    h.client.start("early").unwrap();
    assert_eq!(h.wait("early", None).exit_code, 0);
    assert_eq!(
        (out.join().unwrap(), err.join().unwrap()),
        ("out\n".into(), "err\n".into())
    );

    // A create that fails answers the waiting stream at once.
    let t = Instant::now();
    let out = h.send_hello("bad", None, StreamKind::Stdout, long);
    thread::sleep(Duration::from_millis(100));
    let bad = spec(&["true"], json!({"process": {"cwd": "/bin/sh/x"}}));
    h.create("bad", bad, false).unwrap_err();
    let e = attached(out).unwrap_err();
    assert!(e.contains("no container"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Without a wait, an unknown container is refused at once.
    let e = h.attach("none", None, StreamKind::Stdout).unwrap_err();
    assert!(e.contains("no container"), "{e}");
}

#[test]
fn stdin_is_relayed_byte_exact_and_eof_propagates() {
    let mut h = harness("stdin");
    h.create("cat", spec(&["cat"], json!({})), true).unwrap();
    let mut stdin = h.attach("cat", None, StreamKind::Stdin).unwrap();
    let out = h.attach("cat", None, StreamKind::Stdout).unwrap();
    let reader = thread::spawn(move || {
        let mut out = out;
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    h.client.start("cat").unwrap();
    // 1 MiB of pseudo-random bytes (xorshift).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let input = data.clone();
    let writer = thread::spawn(move || {
        stdin.write_all(&input).unwrap();
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let status = h.wait("cat", None);
    writer.join().unwrap();
    assert_eq!(status.exit_code, 0);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "stdin/stdout differ");
    // A second attach of the same stream is refused.
    let e = h.attach("cat", None, StreamKind::Stdout).unwrap_err();
    assert!(e.contains("already attached"), "{e}");
}

#[test]
fn signals_reach_the_container() {
    let mut h = harness("signal");
    h.create("kill", spec(&["sleep", "100"], json!({})), false)
        .unwrap();
    h.client.start("kill").unwrap();
    let wait = h
        .client
        .send(Request::Wait(ProcessRef {
            container_id: "kill".into(),
            exec_id: None,
        }))
        .unwrap();
    h.client
        .signal(Signal {
            container_id: "kill".into(),
            exec_id: None,
            signal: libc::SIGKILL,
        })
        .unwrap();
    let husk_proto::Response::Exited(s) = h.client.receive(wait).unwrap() else {
        panic!("not exited");
    };
    assert_eq!((s.exit_code, s.signal, s.oom_killed), (137, Some(9), false));

    // SIGTERM to a process that handles it.
    let script = "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.05; done";
    h.create("term", spec(&["sh", "-c", script], json!({})), false)
        .unwrap();
    let mut out = h.attach("term", None, StreamKind::Stdout).unwrap();
    h.client.start("term").unwrap();
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready).unwrap();
    h.client
        .signal(Signal {
            container_id: "term".into(),
            exec_id: None,
            signal: libc::SIGTERM,
        })
        .unwrap();
    assert_eq!(h.wait("term", None).exit_code, 42);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got TERM\n");
    // Signalling an exited process is an error.
    let e = h.client.signal(Signal {
        container_id: "term".into(),
        exec_id: None,
        signal: 15,
    });
    assert!(matches!(e, Err(ProtoError::Remote(b)) if b.code == ErrorCode::InvalidState));
}

#[test]
fn exec_joins_the_running_container() {
    let mut h = harness("exec");
    h.create("main", spec(&["sleep", "100"], json!({})), false)
        .unwrap();
    h.client.start("main").unwrap();
    let mut process: Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "echo $$; hostname; cat /proc/1/cmdline; echo; exit 5"],
        "env": ["PATH=/bin"],
        "cwd": "/tmp",
    }))
    .unwrap();
    let info = h
        .client
        .exec(Exec {
            container_id: "main".into(),
            exec_id: "e1".into(),
            process: Box::new(process.clone()),
            stdin: false,
        })
        .unwrap();
    assert!(info.pid > 0 && info.timestamps.exec_ns.is_some());
    let out = reader(h.attach("main", Some("e1"), StreamKind::Stdout).unwrap());
    let status = h.wait("main", Some("e1"));
    assert_eq!(status.exit_code, 5);
    let out = out.join().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    // A pid inside the container's pid namespace, its hostname, its init.
    let pid: i32 = lines[0].parse().unwrap();
    assert!(pid > 1 && pid < 100, "{out}");
    assert_eq!(lines[1], "box");
    assert_eq!(lines[2].replace('\0', " ").trim(), "sleep 100");

    // An exec whose program is missing.
    process.set_args(Some(vec!["nosuch".into()]));
    h.client
        .exec(Exec {
            container_id: "main".into(),
            exec_id: "e2".into(),
            process: Box::new(process),
            stdin: false,
        })
        .unwrap();
    let err = reader(h.attach("main", Some("e2"), StreamKind::Stderr).unwrap());
    assert_eq!(h.wait("main", Some("e2")).exit_code, 127);
    assert!(err.join().unwrap().contains("not found"));

    h.kill_init("main");
}

#[test]
fn terminal_gives_a_tty() {
    let mut h = harness("tty");
    let s = spec(
        &["sh", "-c", "tty; stty size; read line; echo got $line"],
        json!({"process": {"terminal": true, "consoleSize": {"height": 40, "width": 120}}}),
    );
    h.create("t", s, false).unwrap();
    let e = h.attach("t", None, StreamKind::Stdout).unwrap_err();
    assert!(e.contains("terminal"), "{e}");
    let mut pty = h.attach("t", None, StreamKind::Pty).unwrap();
    h.client.start("t").unwrap();
    h.client
        .resize_tty(ResizeTty {
            container_id: "t".into(),
            exec_id: None,
            rows: 40,
            cols: 120,
        })
        .unwrap();
    // Type only once the size was printed, so that the terminal's echo of
    // the input comes after it.
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("40 120") {
        assert_eq!(pty.read(&mut byte).unwrap(), 1, "{seen:?}");
        seen.push(byte[0]);
    }
    pty.write_all(b"hello\n").unwrap();
    let status = h.wait("t", None);
    let mut rest = String::new();
    pty.read_to_string(&mut rest).unwrap();
    let out = (String::from_utf8_lossy(&seen) + rest.as_str()).replace('\r', "");
    assert_eq!(status.exit_code, 0, "{out}");
    assert_eq!(out, "/dev/pts/0\n40 120\nhello\ngot hello\n");
}

#[test]
fn root_is_an_overlay_over_a_read_only_lower() {
    let mut h = harness("overlay");
    let script = "echo data > /newfile && cat /newfile && ls /dev && test -c /dev/null && test -d /dev/pts \
                  && test -L /dev/ptmx && echo x > /dev/null && cat /proc/self/status | grep NoNewPrivs";
    let r = h.run(
        "ov",
        spec(
            &["sh", "-c", script],
            json!({"process": {"noNewPrivileges": true}}),
        ),
    );
    assert_eq!(r.status.exit_code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("data\n"), "{}", r.stdout);
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == dev),
            "{dev} missing: {}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
    // The write went to the upper layer, not to the image.
    assert!(!h.rootfs.join("newfile").exists());

    // A read-only root refuses writes.
    let r = h.run(
        "ro",
        spec(
            &["touch", "/x"],
            json!({"root": {"path": "rootfs", "readonly": true}}),
        ),
    );
    assert_ne!(r.status.exit_code, 0);
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
}

#[test]
fn capabilities_and_rlimits_apply() {
    let mut h = harness("caps");
    let s = spec(
        &[
            "sh",
            "-c",
            "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; ulimit -n",
        ],
        json!({"process": {
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"],
                             "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
        }}),
    );
    let r = h.run("caps", s);
    assert_eq!(r.status.exit_code, 0, "{}", r.stderr);
    // uid 0 gets the bounding set at exec, as under runc.
    assert_eq!(
        r.stdout,
        "CapPrm:\t0000000000000021\nCapEff:\t0000000000000021\nCapBnd:\t0000000000000021\n123\n"
    );

    // Another uid keeps exactly what is ambient.
    let s = spec(
        &[
            "sh",
            "-c",
            "grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status",
        ],
        json!({"process": {
            "user": {"uid": 1000, "gid": 1000},
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"],
                             "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]},
        }}),
    );
    let r = h.run("ambient", s);
    assert_eq!(r.status.exit_code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "CapInh:\t0000000000000020\nCapPrm:\t0000000000000020\nCapEff:\t0000000000000020\nCapAmb:\t0000000000000020\n"
    );
}

#[test]
fn memory_limit_oom_is_reported() {
    let mut h = harness("oom");
    // Doubling a shell string until the 32 MiB limit is hit.
    let s = spec(
        &["sh", "-c", "a=xxxxxxxx; while true; do a=\"$a$a\"; done"],
        json!({"linux": {"resources": {"memory": {"limit": 33554432, "swap": 33554432}}}}),
    );
    let r = h.run("oom", s);
    assert_eq!(
        (r.status.exit_code, r.status.signal, r.status.oom_killed),
        (137, Some(9), true)
    );
}

#[test]
fn stats_come_from_the_cgroup() {
    let mut h = harness("stats");
    let s = spec(
        &["sleep", "100"],
        json!({"linux": {"resources": {"memory": {"limit": 67108864}, "pids": {"limit": 20}}}}),
    );
    h.create("s", s, false).unwrap();
    h.client.start("s").unwrap();
    let stats = h.client.stats("s").unwrap();
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, Some(67108864));
    assert_eq!(stats.pids_current, Some(1));
    assert_eq!(stats.oom_kills, 0);
}

#[test]
fn cpu_limits_apply() {
    // The container sees its own limits (on cgroup2 the cpu controller is
    // enabled on demand, by the first container that sets a cpu limit; the
    // guest test checks that side).
    let mut h = harness("cpu");
    let script = "cd /sys/fs/cgroup; if [ -e cgroup.controllers ]; then cat cpu.max cpu.weight; \
                  else cat cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us cpu/cpu.shares; fi";
    let s = spec(
        &["sh", "-c", script],
        json!({
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
            ],
            "linux": {"resources": {"cpu": {"shares": 512, "quota": 50000, "period": 100000}}},
        }),
    );
    let r = h.run("cpu", s);
    assert_eq!(r.stderr, "");
    let v2 = "50000 100000\n20\n";
    let v1 = "50000\n100000\n512\n";
    assert!(r.stdout == v2 || r.stdout == v1, "{}", r.stdout);
    assert_eq!(r.status.exit_code, 0);
}

#[test]
fn the_first_container_takes_the_spare_cgroup() {
    let mut h = harness_with("spare", true);
    let spare = format!("/husk/.spare-{}", std::process::id());
    let cgroups = |h: &mut Harness, id: &str| {
        let r = h.run(id, spec(&["cat", "/proc/self/cgroup"], json!({})));
        assert_eq!((r.status.exit_code, r.stderr.as_str()), (0, ""));
        r.stdout
    };
    let first = cgroups(&mut h, "first");
    assert!(first.contains(&spare), "{first}");
    // Made ahead, so it is in every hierarchy a create would use.
    let second = cgroups(&mut h, "second");
    let lines = |s: &str| s.lines().filter(|l| l.contains("/husk/")).count();
    assert_eq!(lines(&first), lines(&second), "{first}\n{second}");
    assert!(second.contains("/husk/second"), "{second}");
    assert!(!second.contains(".spare"), "{second}");
}

#[test]
fn request_errors_are_typed_and_leave_nothing_behind() {
    let mut h = harness("errors");
    let code = |r: Result<i32, ProtoError>| match r {
        Err(ProtoError::Remote(e)) => e.code,
        other => panic!("expected an agent error, got {other:?}"),
    };
    let user_ns = spec(
        &["true"],
        json!({"linux": {"namespaces": [{"type": "user"}]}}),
    );
    assert_eq!(code(h.create("u", user_ns, false)), ErrorCode::Unsupported);
    assert_eq!(
        code(h.create("../x", spec(&["true"], json!({})), false)),
        ErrorCode::InvalidRequest
    );
    let bad_env = spec(&["true"], json!({"process": {"env": ["NOVALUE"]}}));
    assert_eq!(
        code(h.create("e", bad_env, false)),
        ErrorCode::InvalidRequest
    );

    // A rootfs that does not exist fails in the child; no cgroup remains.
    let saved = h.rootfs.clone();
    h.rootfs = h.tmp.0.join("nope");
    let e = h
        .create("norootfs", spec(&["true"], json!({})), false)
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    h.rootfs = saved;
    let leftover = fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("4:memory:")
                .or_else(|| l.split_once(":memory:").map(|x| x.1))
        })
        .map(|own| {
            Path::new("/sys/fs/cgroup/memory")
                .join(own.trim_start_matches('/'))
                .join("husk/norootfs")
        });
    if let Some(p) = leftover {
        assert!(!p.exists(), "{} left behind", p.display());
    }

    h.create("c", spec(&["true"], json!({})), false).unwrap();
    assert_eq!(
        code(h.create("c", spec(&["true"], json!({})), false)),
        ErrorCode::AlreadyExists
    );
    h.client.start("c").unwrap();
    let again = h.client.start("c").unwrap_err();
    assert!(matches!(again, ProtoError::Remote(e) if e.code == ErrorCode::InvalidState));
    let missing = h.client.start("nope").unwrap_err();
    assert!(matches!(missing, ProtoError::Remote(e) if e.code == ErrorCode::NotFound));
    assert_eq!(h.wait("c", None).exit_code, 0);
}

#[test]
fn containers_created_concurrently_all_finish() {
    let h = harness("concurrent");
    let rootfs = h.rootfs.clone();
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let agent = Arc::clone(&h.agent);
            let rootfs = rootfs.clone();
            thread::spawn(move || {
                let (a, b) = UnixStream::pair().unwrap();
                let server_agent = Arc::clone(&agent);
                thread::spawn(move || serve_control(&server_agent, b));
                let mut client = Client::connect(a, &Hello::new("test", "0")).unwrap();
                for i in 0..4 {
                    let id = format!("w{w}-{i}");
                    let msg = format!("hello from {id}");
                    client
                        .create_container(CreateContainer {
                            container_id: id.clone(),
                            spec: spec(&["echo", &msg], json!({})),
                            rootfs: Rootfs {
                                device: rootfs.clone(),
                                fstype: "bind".into(),
                                read_only: true,
                                size_bytes: None,
                            },
                            scratch: Scratch::default(),
                            stdin: false,
                            files: Vec::new(),
                            shares: Vec::new(),
                        })
                        .unwrap();
                    let (mut out, sb) = UnixStream::pair().unwrap();
                    let stdio_agent = Arc::clone(&agent);
                    thread::spawn(move || serve_stdio(&stdio_agent, sb));
                    let hello = StreamHello {
                        version: PROTOCOL_VERSION,
                        container_id: id.clone(),
                        exec_id: None,
                        stream: StreamKind::Stdout,
                        wait_ms: 0,
                    };
                    write_frame(&mut out, &hello).unwrap();
                    assert_eq!(
                        read_frame::<_, StreamReply>(&mut out).unwrap(),
                        StreamReply::Attached
                    );
                    client.start(&id).unwrap();
                    let status = client
                        .wait(ProcessRef {
                            container_id: id.clone(),
                            exec_id: None,
                        })
                        .unwrap();
                    assert_eq!(status.exit_code, 0);
                    let mut s = String::new();
                    out.read_to_string(&mut s).unwrap();
                    assert_eq!(s, format!("{msg}\n"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn seccomp_profile_applies_to_the_init_and_execs() {
    let mut h = harness("seccomp");
    // mkdir fails with EOPNOTSUPP, the rest is allowed; "socketcall" has
    // no x86_64 number and is skipped, as libseccomp does.
    let profile = json!({"linux": {"seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "socketcall"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": libc::EOPNOTSUPP},
        ],
    }}});
    let r = h.run(
        "init",
        spec(
            &[
                "sh",
                "-c",
                "grep '^Seccomp:' /proc/self/status; mkdir /tmp/d || echo REFUSED; touch /tmp/f && echo TOUCHED",
            ],
            profile.clone(),
        ),
    );
    assert_eq!(r.status.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "Seccomp:\t2\nREFUSED\nTOUCHED\n", "{}", r.stderr);
    assert!(r.stderr.contains("Operation not supported"), "{}", r.stderr);

    // An exec gets the container's profile, also with no_new_privs (the
    // filter is then installed after it rather than before the
    // capabilities are dropped).
    h.create("main", spec(&["sleep", "100"], profile), false)
        .unwrap();
    h.client.start("main").unwrap();
    let process: Process = serde_json::from_value(json!({
        "user": {"uid": 1000, "gid": 1000},
        "args": ["sh", "-c", "grep '^NoNewPrivs:' /proc/self/status; mkdir /tmp/e || exit 9"],
        "env": ["PATH=/bin"],
        "cwd": "/tmp",
        "noNewPrivileges": true,
    }))
    .unwrap();
    h.client
        .exec(Exec {
            container_id: "main".into(),
            exec_id: "e1".into(),
            process: Box::new(process),
            stdin: false,
        })
        .unwrap();
    let out = reader(h.attach("main", Some("e1"), StreamKind::Stdout).unwrap());
    assert_eq!(h.wait("main", Some("e1")).exit_code, 9);
    assert_eq!(out.join().unwrap(), "NoNewPrivs:\t1\n");
    h.kill_init("main");

    // A profile the guest cannot honour is refused at create, in one line.
    let e = h
        .create(
            "notify",
            spec(
                &["true"],
                json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}}),
            ),
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
}

#[test]
fn the_device_cgroup_allows_only_the_listed_devices() {
    let mut h = harness("devices");
    // /dev/fuse (10:229) is root-only on the host, so only the device
    // cgroup stands between container root and it.
    let script = "mknod /dev/fusex c 10 229 && echo MADE; \
                  (exec 3</dev/fusex) && echo OPENED || echo DENIED; \
                  echo x > /dev/null && echo NULL-OK";
    let r = h.run("deny", spec(&["sh", "-c", script], json!({})));
    assert_eq!(r.stdout, "MADE\nDENIED\nNULL-OK\n", "{}", r.stderr);
    assert!(r.stderr.contains("Operation not permitted"), "{}", r.stderr);

    let allow = json!({"linux": {"resources": {"devices": [
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
    ]}}});
    let r = h.run("allow", spec(&["sh", "-c", script], allow));
    assert_eq!(r.stdout, "MADE\nOPENED\nNULL-OK\n", "{}", r.stderr);
}
