//! `husk exec`: another process in a running container. In the foreground
//! husk relays its own stdio and exits with the process's status; with
//! `--detach` a helper process (`husk exec-serve`) does that, and its pid
//! goes to `--pid-file`, so that a shim reaping it learns the status.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_proto::{Exec, ProcessRef, StreamHello, PROTOCOL_VERSION, STDIO_PORT};
use oci_spec::runtime::Process;

use super::store::{write_atomic, Container, Status};
use super::{bundle, console, detach, lifecycle};
use crate::relay::{attach_stdio, watch_winsize};
use crate::run::{CONTAINER_ID, UNDRAINED_GRACE};
use crate::{spec, uds, RuntimeError};

/// How long the process's output may take to arrive after it exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(30);
/// How long a detached exec helper may take to start the process.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the process comes from.
#[derive(Debug, Clone)]
pub enum ProcessSource {
    /// `--process FILE`: an OCI `process` JSON.
    File(PathBuf),
    /// Inline arguments on top of the container's own process.
    Inline {
        /// Command and arguments.
        args: Vec<String>,
        /// Working directory.
        cwd: Option<String>,
        /// Extra `K=V` environment.
        env: Vec<String>,
        /// `UID[:GID]`.
        user: Option<String>,
        /// Allocate a terminal.
        tty: bool,
    },
}

/// `exec` options.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Container id.
    pub id: String,
    /// The process.
    pub process: ProcessSource,
    /// Leave a helper process behind and return once the process runs.
    pub detach: bool,
    /// Where to write the helper's pid (with `detach`).
    pub pid_file: Option<PathBuf>,
    /// Unix socket for a terminal's master.
    pub console_socket: Option<PathBuf>,
    /// Arguments for the helper before its subcommand (log settings).
    pub helper_args: Vec<String>,
}

fn process_from(o: &ExecOptions, base: Option<&Process>) -> Result<Process, RuntimeError> {
    match &o.process {
        ProcessSource::File(p) => {
            let bytes =
                std::fs::read(p).map_err(|e| RuntimeError::Io(p.display().to_string(), e))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", p.display())))
        }
        ProcessSource::Inline {
            args,
            cwd,
            env,
            user,
            tty,
        } => {
            if args.is_empty() {
                return Err(RuntimeError::Invalid("exec: no command given".into()));
            }
            let mut p = base.cloned().unwrap_or_default();
            p.set_args(Some(args.clone()));
            p.set_terminal(Some(*tty));
            if let Some(c) = cwd {
                p.set_cwd(c.into());
            }
            let mut all = p.env().clone().unwrap_or_default();
            all.extend(env.iter().cloned());
            p.set_env(Some(all));
            if let Some(u) = user {
                let (uid, gid) = spec::parse_user(u)?;
                let mut usr = p.user().clone();
                usr.set_uid(uid);
                usr.set_gid(gid);
                p.set_user(usr);
            }
            Ok(p)
        }
    }
}

/// Runs `husk exec`; returns the exit code (the process's, in the
/// foreground).
pub fn exec(root: &Path, o: &ExecOptions) -> Result<i32, RuntimeError> {
    let c = Container::open(root, &o.id)?;
    let state = c.state()?.clone();
    match c.status() {
        Status::Running => {}
        s => {
            return Err(RuntimeError::Invalid(format!(
                "cannot exec in a {s} container"
            )))
        }
    }
    let base = bundle::load(&state.bundle)
        .ok()
        .and_then(|b| b.spec.process().clone());
    let process = process_from(o, base.as_ref())?;
    let tty = process.terminal().unwrap_or(false);
    if tty && o.detach && o.console_socket.is_none() {
        return Err(RuntimeError::Invalid(
            "cannot allocate tty if husk will detach without setting console socket".into(),
        ));
    }
    // Long-lived from here on: do not hold the container's lock.
    let dir = c.dir.clone();
    drop(c);
    let terminal = match &o.console_socket {
        Some(socket) if tty => Some(console::hand_over(socket)?),
        _ => None,
    };
    if !o.detach {
        if let Some(t) = &terminal {
            // The caller's pty becomes our stdio.
            for fd in 0..3 {
                // SAFETY: dup2(2) of a descriptor we own onto fds 0-2.
                if unsafe { libc::dup2(t.as_raw_fd(), fd) } < 0 {
                    return Err(RuntimeError::Io(
                        "dup the terminal".into(),
                        std::io::Error::last_os_error(),
                    ));
                }
            }
        }
        return run_process(&dir, process, Mode::Foreground);
    }
    let file = dir.join(format!("exec-{}.json", unique()));
    let json = serde_json::to_vec(&process).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    write_atomic(&file, &json)?;
    let mut args: Vec<OsString> = o.helper_args.iter().map(OsString::from).collect();
    args.extend([
        "exec-serve".into(),
        dir.into_os_string(),
        file.clone().into(),
    ]);
    let spawned = detach::spawn(&args, START_TIMEOUT, terminal.as_ref());
    let _ = std::fs::remove_file(&file);
    let pid = spawned?;
    if let Some(p) = &o.pid_file {
        write_atomic(p, pid.to_string().as_bytes())?;
    }
    Ok(0)
}

/// The detached helper (`husk exec-serve DIR FILE`): returns its exit code.
pub fn serve(dir: &Path, file: &Path) -> i32 {
    let ready = detach::ready_fd();
    let process = std::fs::read(file)
        .map_err(|e| RuntimeError::Io(file.display().to_string(), e))
        .and_then(|b| {
            serde_json::from_slice::<Process>(&b)
                .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", file.display())))
        });
    let result = process.and_then(|p| run_process(dir, p, Mode::Detached(ready)));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            super::vmm::LOST
        }
    }
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Who runs an exec'd process's stdio.
enum Mode {
    /// `husk exec` itself, for the user at fds 0-2 (a terminal is theirs).
    Foreground,
    /// A detached helper, which reports readiness on this fd.
    Detached(Option<std::fs::File>),
}

/// Starts `process` in the container of `dir`, relays fds 0-2 (reporting
/// readiness when detached), waits; returns its exit code.
fn run_process(dir: &Path, process: Process, mode: Mode) -> Result<i32, RuntimeError> {
    let tty = process.terminal().unwrap_or(false);
    let exec_id = format!("exec-{}", unique());
    let done = Arc::new(AtomicBool::new(false));
    let step = |step| move |e| lifecycle::in_step(dir, step, e);
    let started = (|| {
        let mut client = lifecycle::agent_waiting(dir).map_err(step("connecting to the agent"))?;
        client
            .exec(Exec {
                container_id: CONTAINER_ID.into(),
                exec_id: exec_id.clone(),
                process: Box::new(process),
                stdin: !tty,
            })
            .map_err(|e| step("starting the process")(e.into()))?;
        let sock = super::store::vsock_path(dir);
        let open = |kind| {
            let answer = Duration::from_secs(crate::boot_timeout(None)?);
            let s = uds::connect(&sock, STDIO_PORT, Instant::now() + answer)
                .map_err(|e| RuntimeError::Io(sock.display().to_string(), e))
                .map_err(step("attaching the process's stdio"))?;
            let hello = StreamHello {
                version: PROTOCOL_VERSION,
                container_id: CONTAINER_ID.into(),
                exec_id: Some(exec_id.clone()),
                stream: kind,
                wait_ms: 0,
            };
            uds::attach(s, &hello, Instant::now() + answer)
                .map_err(step("attaching the process's stdio"))
        };
        // A terminal of ours: the user's (foreground), or the pty whose
        // master went to the console socket (a detached helper's stdio).
        // SAFETY: isatty(3) of fd 0.
        let host_terminal =
            tty && (matches!(mode, Mode::Foreground) || unsafe { libc::isatty(0) } == 1);
        let (relays, raw) = attach_stdio(&open, tty, true, host_terminal)?;
        let resizer = match host_terminal {
            true => Some(watch_winsize(
                lifecycle::agent(dir).map_err(step("connecting for the terminal's size"))?,
                Some(exec_id.clone()),
                done.clone(),
            )),
            false => None,
        };
        Ok((client, relays, (raw, resizer)))
    })();
    let (mut client, relays, (raw, resizer)) = match (started, mode) {
        (Ok(v), Mode::Detached(r)) => {
            detach::report(r, "ok");
            v
        }
        (Ok(v), Mode::Foreground) => v,
        (Err(e), Mode::Detached(r)) => {
            detach::report(r, &format!("error: {e}"));
            return Err(e);
        }
        (Err(e), Mode::Foreground) => return Err(e),
    };
    let status = client
        .wait(ProcessRef {
            container_id: CONTAINER_ID.into(),
            exec_id: Some(exec_id),
        })
        .map_err(|e| step("waiting for the process")(e.into()))?;
    relays.wait(if status.output_drained {
        OUTPUT_DRAIN
    } else {
        UNDRAINED_GRACE
    });
    drop(raw);
    done.store(true, Ordering::SeqCst);
    if let Some(t) = resizer {
        let _ = t.join();
    }
    // In range: the protocol client checked it.
    Ok(status.exit_code)
}
