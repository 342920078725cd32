//! The agent's guest-side stages measured on the host: the agent binary
//! runs natively (`husk-agent --unix DIR`, as its tests run it) and starts
//! the same container from the same tree. Its figures are the estimate of
//! the guest stages on a host with hardware virtualization, where guest
//! kernel code runs at native speed (on kvm_pvm hosts it is emulated).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_proto::{
    read_frame, write_frame, Client, CreateContainer, Hello, ProcessRef, Rootfs, Scratch,
    StreamHello, StreamKind, StreamReply, PROTOCOL_VERSION,
};

/// The stages, in ms: agent start → ready, request → container created,
/// created → exec, exec → exit.
pub const STAGES: [&str; 4] = [
    "agent start → ready",
    "request → container created",
    "created → exec",
    "exec → exit",
];

/// Kills the agent and removes its directory, also on errors.
struct Running {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One native run of `true` in `rootfs`; the stages in ms.
pub fn run_once(
    agent: &Path,
    rootfs: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<Vec<f64>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let child = Command::new(agent)
        .arg("--unix")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", agent.display()))?;
    let mut running = Running {
        child,
        dir: dir.to_path_buf(),
    };
    // The agent logs one line once both sockets listen.
    let stderr = running.child.stderr.take();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let Some(e) = stderr else { return };
        for line in BufReader::new(e).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("serving on") => break,
            Ok(_) => {}
            Err(_) => return Err("the native agent did not start serving".into()),
        }
    }
    let connect = |name: &str| {
        let s = UnixStream::connect(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    };
    let hello = Hello::new("husk-bench", env!("CARGO_PKG_VERSION"));
    let mut client =
        Client::connect(connect("control.sock")?, &hello).map_err(|e| e.to_string())?;
    let spec = husk_runtime::spec::build(&husk_runtime::spec::RunSpec {
        args: vec!["true".into()],
        hostname: "bench".into(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let requested = boottime_ns();
    client
        .create_container(CreateContainer {
            container_id: "bench".into(),
            spec: Box::new(spec),
            rootfs: Rootfs {
                device: rootfs.to_path_buf(),
                fstype: "bind".into(),
                read_only: true,
                size_bytes: None,
            },
            scratch: Scratch::Tmpfs {
                size_bytes: Some(64 << 20),
            },
            stdin: false,
            files: Vec::new(),
            shares: Vec::new(),
        })
        .map_err(|e| format!("native create: {e}"))?;
    // Output streams attached before start, as husk run does.
    let mut streams = Vec::new();
    for kind in [StreamKind::Stdout, StreamKind::Stderr] {
        let mut s = connect("stdio.sock")?;
        let hello = StreamHello {
            version: PROTOCOL_VERSION,
            container_id: "bench".into(),
            exec_id: None,
            stream: kind,
            wait_ms: 0,
        };
        write_frame(&mut s, &hello).map_err(|e| e.to_string())?;
        match read_frame(&mut s).map_err(|e| e.to_string())? {
            StreamReply::Attached => streams.push(s),
            StreamReply::Rejected(e) => return Err(format!("native attach: {}", e.message)),
        }
    }
    client
        .start("bench")
        .map_err(|e| format!("native start: {e}"))?;
    let status = client
        .wait(ProcessRef {
            container_id: "bench".into(),
            exec_id: None,
        })
        .map_err(|e| format!("native wait: {e}"))?;
    if status.exit_code != 0 {
        return Err(format!("native `true` exited {}", status.exit_code));
    }
    let t = status.timestamps;
    let ms = |ns: u64| ns as f64 / 1e6;
    let created = t.created_ns.unwrap_or(requested);
    let exec = t.exec_ns.unwrap_or(created);
    let exited = t.exited_ns.unwrap_or(exec);
    Ok(vec![
        ms(t.agent_ready_ns.saturating_sub(t.agent_started_ns)),
        ms(created.saturating_sub(requested)),
        ms(exec.saturating_sub(created)),
        ms(exited.saturating_sub(exec)),
    ])
}
