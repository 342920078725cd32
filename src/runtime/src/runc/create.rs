//! `husk create`: the bundle's root becomes a (cached) ext4 disk, a VMM
//! process boots the VM and creates the container in it, and `create`
//! returns once the container exists, leaving the VMM process behind for
//! the caller's subreaper (its pid goes to `--pid-file`).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::bundle;
use super::store::{process_start, write_atomic, Container, ContainerState};
use super::vmm::{VmmConfig, READY_FD_ENV};
use crate::run::{vcpus_for, vm_mem_mib};
use crate::{paths, RuntimeError};

/// `create` options.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Where to write the VMM process's pid.
    pub pid_file: Option<PathBuf>,
    /// Unix socket to send the terminal's master to.
    pub console_socket: Option<PathBuf>,
    /// Guest kernel; None: default.
    pub kernel: Option<PathBuf>,
    /// Agent binary; None: default.
    pub agent: Option<PathBuf>,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
    /// Arguments for the VMM process before its subcommand (log settings).
    pub vmm_args: Vec<String>,
}

/// Creates container `o.id` under the state root `root`.
pub fn create(root: &Path, o: &CreateOptions) -> Result<(), RuntimeError> {
    let b = bundle::load(&o.bundle)?;
    if o.console_socket.is_some() {
        return Err(RuntimeError::Invalid(
            "--console-socket: terminals for runtime containers are not supported yet".into(),
        ));
    }
    let spec = bundle::guest_spec(&b, o.console_socket.is_some())?;
    let image = husk_image::ext4::image_for_dir(&b.rootfs, &paths::image_cache())?;
    // Fail early on what the VMM process would fail on.
    paths::agent_binary(o.agent.as_deref())?;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let memory = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    let cpus = resources.and_then(|r| r.cpu().as_ref()).and_then(|c| {
        let (quota, period) = (c.quota()?, c.period()?);
        (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
    });
    let cfg = VmmConfig {
        mem_mib: vm_mem_mib(memory),
        vcpus: vcpus_for(cpus),
        spec,
        rootfs_image: image,
        kernel: o.kernel.clone(),
        agent: o.agent.clone(),
        boot_timeout_s: o.boot_timeout.as_secs(),
    };
    let mut c = Container::create(root, &o.id)?;
    let annotations = b
        .spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let result = start_vmm(&c, &cfg, o).and_then(|pid| {
        let pid_start = process_start(pid)
            .ok_or_else(|| RuntimeError::Invalid("the VMM process exited".into()))?;
        c.save(ContainerState {
            id: o.id.clone(),
            bundle: b.dir.clone(),
            rootfs: b.rootfs.clone(),
            pid,
            pid_start,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            started: false,
            annotations,
        })?;
        if let Some(p) = &o.pid_file {
            write_atomic(p, pid.to_string().as_bytes())?;
        }
        Ok(pid)
    });
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Some(s) = &c.state {
                super::lifecycle::kill_vmm(s.pid, s.pid_start);
            }
            let _ = c.remove();
            Err(e)
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RuntimeError::Io(
            "pipe".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the VMM process and waits for its report; returns its pid.
fn start_vmm(c: &Container, cfg: &VmmConfig, o: &CreateOptions) -> Result<i32, RuntimeError> {
    let json = serde_json::to_vec(cfg).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    write_atomic(&c.dir.join("vmm.json"), &json)?;
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Io("current exe".into(), e))?;
    let (r, w) = pipe()?;
    let w_fd = w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(&o.vmm_args)
        .arg("vmm-serve")
        .arg(&c.dir)
        .env(READY_FD_ENV, w_fd.to_string());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid
    // and fcntl on an fd we own.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(w_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Io("start the VMM process".into(), e))?;
    drop(w);
    let pid = child.id() as i32;
    // The VMM boots the guest and creates the container: the boot timeout
    // bounds it, with room for building the VM.
    let deadline = Instant::now() + o.boot_timeout + Duration::from_secs(10);
    match read_report(r, deadline) {
        Ok(line) if line == "ok" => Ok(pid),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let why = match other {
                Ok(line) => line.strip_prefix("error: ").unwrap_or(&line).to_owned(),
                Err(e) => e,
            };
            Err(RuntimeError::Invalid(why))
        }
    }
}

/// Reads the VMM's one-line report, bounded by `deadline`.
fn read_report(r: OwnedFd, deadline: Instant) -> Result<String, String> {
    let mut f = File::from(r);
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the VMM did not report within the boot timeout \
                        (set HUSK_BOOT_TIMEOUT to wait longer)"
                .into());
        }
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        let mut chunk = [0u8; 4096];
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 << 10 || buf.ends_with(b"\n") {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the VMM's report: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf).trim().to_owned();
    if text.is_empty() {
        Err("the VMM process exited before the container was created".into())
    } else {
        Ok(text)
    }
}
