//! The agent binary in its debug mode (`--unix DIR`): the same servers as
//! in the guest, over Unix sockets instead of vsock.

use std::io::Read;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use husk_proto::{
    read_frame, write_frame, Client, CreateContainer, Hello, ProcessRef, Rootfs, Scratch,
    StreamHello, StreamKind, StreamReply, PROTOCOL_VERSION,
};

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", path.display()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn version_and_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("husk-agent "));
    // Not PID 1 and no --unix: refuses instead of setting up the host.
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn debug_server_runs_a_container_and_shuts_down() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (fails rather than passing unrun)"
    );
    let dir = std::env::temp_dir().join(format!("husk-agent-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    symlink("busybox", rootfs.join("bin/sh")).unwrap();

    let mut agent = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--unix")
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let result = std::panic::catch_unwind(|| {
        let control = connect(&dir.join("control.sock"));
        let mut client = Client::connect(control, &Hello::new("test", "0")).unwrap();
        assert_eq!(client.peer().name, "husk-agent");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo from the agent; exit 7"],
                        "env": ["PATH=/bin"], "cwd": "/"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        let info = client
            .create_container(CreateContainer {
                container_id: "bin".into(),
                spec: Box::new(serde_json::from_value(spec).unwrap()),
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
        assert!(info.timestamps.agent_ready_ns >= info.timestamps.agent_started_ns);
        let mut out = connect(&dir.join("stdio.sock"));
        let hello = StreamHello {
            version: PROTOCOL_VERSION,
            container_id: "bin".into(),
            exec_id: None,
            stream: StreamKind::Stdout,
            wait_ms: 0,
        };
        write_frame(&mut out, &hello).unwrap();
        assert_eq!(
            read_frame::<_, StreamReply>(&mut out).unwrap(),
            StreamReply::Attached
        );
        client.start("bin").unwrap();
        let status = client
            .wait(ProcessRef {
                container_id: "bin".into(),
                exec_id: None,
            })
            .unwrap();
        assert_eq!(status.exit_code, 7);
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        assert_eq!(s, "from the agent\n");
        client.shutdown().unwrap();
    });
    // Shutdown ends the debug server; kill it if the test failed first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    if exited.is_none() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "the agent did not exit after Shutdown"
    );
}
