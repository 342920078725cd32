//! `husk start`, `husk kill` and `husk delete`: process operations go
//! straight to the guest agent over the VM's vsock socket; the VMM process
//! is only signalled to tear a container down.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::{Client, Signal, CONTROL_PORT};

use super::hooks::{self, HookState, Stage};
use super::store::{process_alive, Container, Status};
use super::vmm;
use crate::run::CONTAINER_ID;
use crate::{uds, RuntimeError};

/// How long a SIGKILLed VMM process may take to go away.
const VMM_EXIT: Duration = Duration::from_secs(10);

/// A control connection to the agent of the container in `dir`; each
/// reply may take up to the boot timeout ($HUSK_BOOT_TIMEOUT).
pub fn agent(dir: &Path) -> Result<Client<UnixStream>, RuntimeError> {
    agent_with(dir, true)
}

/// As [`agent`], with replies unbounded: for `Wait`, which lasts as long
/// as the process.
pub fn agent_waiting(dir: &Path) -> Result<Client<UnixStream>, RuntimeError> {
    agent_with(dir, false)
}

fn agent_with(dir: &Path, bounded_replies: bool) -> Result<Client<UnixStream>, RuntimeError> {
    let sock = super::store::vsock_path(dir);
    // The agent is up once `create` returned, but on a slow or loaded
    // host (kvm_pvm emulates the guest kernel) accepting and answering
    // can take seconds: the boot timeout bounds it, as the error says.
    let bound = Duration::from_secs(crate::boot_timeout(None)?);
    let deadline = Instant::now() + bound;
    let s = uds::connect(&sock, CONTROL_PORT, deadline)
        .map_err(|e| RuntimeError::Io(format!("the container's agent ({})", sock.display()), e))?;
    uds::client(s, deadline, bounded_replies.then_some(bound))
}

/// Says at which `step` of talking to the agent of the container in `dir`
/// `e` happened; when the connection itself failed (rather than the agent
/// refusing), adds the guest console's last line, which usually says why.
pub fn in_step(dir: &Path, step: &'static str, e: RuntimeError) -> RuntimeError {
    let connection_failed = match &e {
        RuntimeError::Agent(husk_proto::ProtoError::Remote(_)) => false,
        RuntimeError::Agent(_) | RuntimeError::Io(..) | RuntimeError::AgentTimeout(_) => true,
        _ => false,
    };
    let console = match connection_failed {
        true => crate::sandbox::console_note(&super::store::vm_dir(dir)),
        false => String::new(),
    };
    RuntimeError::AgentStep {
        step,
        source: Box::new(e),
        console,
    }
}

fn id_of(c: &Container) -> String {
    c.dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Starts the container's process; its hooks may take `hook_timeout` each
/// (unless they say otherwise).
pub fn start(root: &Path, id: &str, hook_timeout: Duration) -> Result<(), RuntimeError> {
    let mut c = Container::open(root, id)?;
    let mut state = c.state()?.clone();
    match c.status() {
        Status::Created => {}
        Status::Running | Status::Paused => {
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
    let hooks = hooks::load(&c.dir);
    let timeout = hook_timeout;
    let hook_state = |status: &str| HookState::of(&state, status);
    hooks::run(
        hooks.as_ref(),
        Stage::StartContainer,
        &hook_state("created"),
        None,
        timeout,
    )?;
    agent(&c.dir)?.start(CONTAINER_ID)?;
    // A failed poststart hook is only a warning (runtime spec).
    if let Err(e) = hooks::run(
        hooks.as_ref(),
        Stage::Poststart,
        &hook_state("running"),
        None,
        timeout,
    ) {
        tracing::warn!("{e}");
    }
    state.started = true;
    c.save(state)
}

/// Signal names (without SIG) and numbers; the first name of a number is
/// its own.
const SIGNALS: &[(&str, libc::c_int)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// `SIGTERM` for 15; None for a number without a name.
pub fn signal_name(n: libc::c_int) -> Option<String> {
    SIGNALS
        .iter()
        .find(|(_, v)| *v == n)
        .map(|(name, _)| format!("SIG{name}"))
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
        if let Some((_, n)) = SIGNALS.iter().find(|(k, _)| *k == name) {
            return Ok(*n);
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
    match c.status() {
        Status::Stopped if all => return Ok(()),
        Status::Stopped => return Err(RuntimeError::Invalid("container not running".into())),
        // SIGKILL needs no agent (which cannot answer while the VM is
        // paused, and may take seconds to on a loaded host): the container
        // and every process in it go with the VM, at once, and the caller
        // reaping the VMM process sees it killed by SIGKILL, as it would
        // the container's init under runc. Podman waits only 5 s for that.
        _ if signal == libc::SIGKILL => {
            let s = c.state()?;
            kill_vmm(s.pid, s.pid_start);
            return Ok(());
        }
        Status::Paused => {
            return Err(RuntimeError::Invalid(
                "container is paused: resume it first (SIGKILL works while paused)".into(),
            ))
        }
        Status::Created | Status::Running => {}
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
/// a running one too, and an unknown id is no error. Poststop hooks may
/// take `hook_timeout` each (unless they say otherwise).
pub fn delete(
    root: &Path,
    id: &str,
    force: bool,
    hook_timeout: Duration,
) -> Result<(), RuntimeError> {
    let c = match Container::open(root, id) {
        Ok(c) => c,
        Err(RuntimeError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    let status = c.status();
    if matches!(status, Status::Running | Status::Paused) && !force {
        return Err(RuntimeError::Invalid(format!(
            "cannot delete container {} that is not stopped: {status}",
            id_of(&c)
        )));
    }
    if let Some(s) = &c.state {
        kill_vmm(s.pid, s.pid_start);
    }
    vmm::clean_up(&c.dir);
    if let Some(s) = &c.state {
        let state = HookState::of(s, "stopped");
        // Failed poststop hooks are warnings (runtime spec).
        let hooks = hooks::load(&c.dir);
        if let Err(e) = hooks::run(hooks.as_ref(), Stage::Poststop, &state, None, hook_timeout) {
            tracing::warn!("{e}");
        }
    }
    c.remove()
}

/// Sends `sig` to the container's VMM process (recorded pid, start time
/// checked).
fn signal_vmm(pid: i32, start: u64, sig: i32) -> Result<(), RuntimeError> {
    if !process_alive(pid, start) {
        return Err(RuntimeError::Invalid("container not running".into()));
    }
    // SAFETY: kill(2) of the process we recorded.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(RuntimeError::Io(
            format!("signal the VMM process {pid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Pauses a running container: its VMM process is stopped (SIGSTOP), so
/// no vCPU runs and the VM uses no CPU; guest memory stays as it is.
pub fn pause(root: &Path, id: &str) -> Result<(), RuntimeError> {
    let mut c = Container::open(root, id)?;
    let mut state = c.state()?.clone();
    match c.status() {
        Status::Running => {}
        Status::Paused => return Err(RuntimeError::Invalid("container already paused".into())),
        s => return Err(RuntimeError::Invalid(format!("container not running: {s}"))),
    }
    signal_vmm(state.pid, state.pid_start, libc::SIGSTOP)?;
    state.paused = true;
    c.save(state)
}

/// Resumes a paused container (SIGCONT to its VMM process).
pub fn resume(root: &Path, id: &str) -> Result<(), RuntimeError> {
    let mut c = Container::open(root, id)?;
    let mut state = c.state()?.clone();
    if c.status() != Status::Paused {
        return Err(RuntimeError::Invalid("container not paused".into()));
    }
    signal_vmm(state.pid, state.pid_start, libc::SIGCONT)?;
    state.paused = false;
    c.save(state)
}

/// The host processes that stand for the container's processes: its VMM
/// process (the container's init) and the helpers of detached execs.
pub fn host_pids(root: &Path, id: &str) -> Result<Vec<i32>, RuntimeError> {
    let c = Container::open(root, id)?;
    let s = c.state()?;
    if !process_alive(s.pid, s.pid_start) {
        return Ok(Vec::new());
    }
    let mut pids = vec![s.pid];
    let needle = format!("exec-serve\0{}\0", c.dir.display());
    for e in std::fs::read_dir("/proc").map_err(|e| RuntimeError::Io("/proc".into(), e))? {
        let Ok(e) = e else { continue };
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::{in_step, parse_signal, signal_name};
    use crate::RuntimeError;
    use husk_proto::{ErrorBody, ErrorCode, FrameError, ProtoError};

    #[test]
    fn a_broken_agent_connection_names_the_step_and_the_guest_console() {
        let state = std::env::temp_dir().join(format!("husk-in-step-{}", std::process::id()));
        let vm = super::super::store::vm_dir(&state);
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(
            vm.join("console.log"),
            "boot\nhusk-agent: out of \x1b[1mmemory\n",
        )
        .unwrap();
        let closed = RuntimeError::Agent(ProtoError::Frame(FrameError::Closed));
        assert_eq!(
            in_step(&state, "starting the process", closed).to_string(),
            "starting the process: guest agent: connection closed by peer \
             (guest console: husk-agent: out of ?[1mmemory)"
        );
        // The agent answered: its answer says why; no console.
        let refused = RuntimeError::Agent(ProtoError::Remote(ErrorBody {
            code: ErrorCode::NotFound,
            message: "no such process".into(),
        }));
        let e = in_step(&state, "waiting for the process", refused).to_string();
        assert!(
            e.starts_with("waiting for the process: ") && !e.contains("console"),
            "{e}"
        );
        std::fs::remove_dir_all(&vm).unwrap();
    }

    #[test]
    fn signals_by_number_and_name_as_runc_takes_them() {
        assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("15").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(signal_name(libc::SIGTERM).as_deref(), Some("SIGTERM"));
        assert_eq!(signal_name(libc::SIGABRT).as_deref(), Some("SIGABRT"));
        assert_eq!(signal_name(libc::SIGCHLD).as_deref(), Some("SIGCHLD"));
        assert_eq!(signal_name(0), None);
        assert_eq!(parse_signal("term").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        for bad in ["0", "65", "-1", "SIGFOO", "", "SIG"] {
            assert!(parse_signal(bad).is_err(), "{bad:?}");
        }
    }
}
