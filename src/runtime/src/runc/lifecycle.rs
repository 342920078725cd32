//! `husk start`, `husk kill` and `husk delete`: process operations go
//! straight to the guest agent over the VM's vsock socket; the VMM process
//! is only signalled to tear a container down.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::{Client, Hello, Signal, CONTROL_PORT};

use super::store::{process_alive, Container, Status};
use crate::run::CONTAINER_ID;
use crate::{uds, RuntimeError};

/// How long a container's agent may take to accept a connection (it is up
/// once `create` returned).
const AGENT_CONNECT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed VMM process may take to go away.
const VMM_EXIT: Duration = Duration::from_secs(10);

/// A control connection to the agent of the container in `dir`.
pub fn agent(dir: &Path) -> Result<Client<UnixStream>, RuntimeError> {
    let sock = dir.join("vm").join("vsock.sock");
    let s = uds::connect(&sock, CONTROL_PORT, Instant::now() + AGENT_CONNECT)
        .map_err(|e| RuntimeError::Io(format!("the container's agent ({})", sock.display()), e))?;
    Ok(Client::connect(
        s,
        &Hello::new("husk", env!("CARGO_PKG_VERSION")),
    )?)
}

fn id_of(c: &Container) -> String {
    c.dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Starts the container's process.
pub fn start(root: &Path, id: &str) -> Result<(), RuntimeError> {
    let mut c = Container::open(root, id)?;
    let mut state = c.state()?.clone();
    match c.status() {
        Status::Created => {}
        Status::Running => {
            return Err(RuntimeError::Invalid(
                "cannot start an already running container".into(),
            ))
        }
        Status::Stopped => {
            return Err(RuntimeError::Invalid(
                "cannot start a container that has stopped".into(),
            ))
        }
    }
    agent(&c.dir)?.start(CONTAINER_ID)?;
    state.started = true;
    c.save(state)
}

/// Parses a signal the way runc does: a number, or a name with or without
/// `SIG` (case-insensitive).
pub fn parse_signal(s: &str) -> Result<i32, RuntimeError> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    } else {
        let upper = s.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let n = match name {
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "ILL" => libc::SIGILL,
            "TRAP" => libc::SIGTRAP,
            "ABRT" | "IOT" => libc::SIGABRT,
            "BUS" => libc::SIGBUS,
            "FPE" => libc::SIGFPE,
            "KILL" => libc::SIGKILL,
            "USR1" => libc::SIGUSR1,
            "SEGV" => libc::SIGSEGV,
            "USR2" => libc::SIGUSR2,
            "PIPE" => libc::SIGPIPE,
            "ALRM" => libc::SIGALRM,
            "TERM" => libc::SIGTERM,
            "STKFLT" => libc::SIGSTKFLT,
            "CHLD" | "CLD" => libc::SIGCHLD,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            "TSTP" => libc::SIGTSTP,
            "TTIN" => libc::SIGTTIN,
            "TTOU" => libc::SIGTTOU,
            "URG" => libc::SIGURG,
            "XCPU" => libc::SIGXCPU,
            "XFSZ" => libc::SIGXFSZ,
            "VTALRM" => libc::SIGVTALRM,
            "PROF" => libc::SIGPROF,
            "WINCH" => libc::SIGWINCH,
            "IO" | "POLL" => libc::SIGIO,
            "PWR" => libc::SIGPWR,
            "SYS" => libc::SIGSYS,
            _ => 0,
        };
        if n != 0 {
            return Ok(n);
        }
    }
    Err(RuntimeError::Invalid(format!("unknown signal {s:?}")))
}

/// Sends `signal` to the container's process. `all`: to every process of
/// the container (its init's pid namespace dies with a SIGKILLed init; other
/// signals reach the init).
pub fn kill(root: &Path, id: &str, signal: &str, all: bool) -> Result<(), RuntimeError> {
    let signal = parse_signal(signal)?;
    let c = Container::open(root, id)?;
    c.state()?;
    if c.status() == Status::Stopped {
        if all {
            return Ok(());
        }
        return Err(RuntimeError::Invalid("container not running".into()));
    }
    agent(&c.dir)?.signal(Signal {
        container_id: CONTAINER_ID.into(),
        exec_id: None,
        signal,
    })?;
    Ok(())
}

/// SIGKILLs the VMM process (if it is still the one recorded) and waits,
/// bounded, until it has exited.
pub fn kill_vmm(pid: i32, start: u64) {
    if !process_alive(pid, start) {
        return;
    }
    // SAFETY: plain kill(2) of the process we recorded (start time checked).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + VMM_EXIT;
    while process_alive(pid, start) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deletes a stopped (or, like runc, a created) container; `force` deletes
/// a running one too, and an unknown id is no error.
pub fn delete(root: &Path, id: &str, force: bool) -> Result<(), RuntimeError> {
    let c = match Container::open(root, id) {
        Ok(c) => c,
        Err(RuntimeError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    let status = c.status();
    if status == Status::Running && !force {
        return Err(RuntimeError::Invalid(format!(
            "cannot delete container {} that is not stopped: {status}",
            id_of(&c)
        )));
    }
    if let Some(s) = &c.state {
        kill_vmm(s.pid, s.pid_start);
    }
    c.remove()
}
