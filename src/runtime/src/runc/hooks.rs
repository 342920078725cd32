//! OCI hooks, run on the host with the container's state JSON on stdin:
//! prestart, createRuntime and createContainer by the VMM process once its
//! network namespace exists (Docker's prestart hook finds the namespace
//! from the state's `pid`), startContainer and poststart by `start`,
//! poststop by `delete`. A VM has no container namespaces on the host to
//! run createContainer/startContainer in, so those run in the runtime's,
//! like the others.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// The state a hook reads on stdin (the runtime spec's state).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookState {
    /// The runtime-spec version.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// creating, created, running or stopped.
    pub status: String,
    /// The VMM process.
    pub pid: i32,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// The config's annotations.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl HookState {
    /// The state of a created container, as hooks see it.
    pub fn of(s: &super::store::ContainerState, status: &str) -> Self {
        HookState {
            oci_version: super::query::OCI_VERSION.into(),
            id: s.id.clone(),
            status: status.into(),
            pid: s.pid,
            bundle: s.bundle.clone(),
            annotations: s.annotations.clone(),
        }
    }
}

/// The stages, by the names the runtime spec gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Deprecated, at createRuntime's point.
    Prestart,
    /// After the namespaces exist.
    CreateRuntime,
    /// Before the container's root is entered.
    CreateContainer,
    /// Before the user process runs.
    StartContainer,
    /// After the user process started.
    Poststart,
    /// After the container is deleted.
    Poststop,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::StartContainer => "startContainer",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    fn of(self, h: &Hooks) -> Vec<Hook> {
        let list = match self {
            Stage::Prestart => h.prestart(),
            Stage::CreateRuntime => h.create_runtime(),
            Stage::CreateContainer => h.create_container(),
            Stage::StartContainer => h.start_container(),
            Stage::Poststart => h.poststart(),
            Stage::Poststop => h.poststop(),
        };
        list.clone().unwrap_or_default()
    }
}

/// Most hook output kept for an error message.
const OUTPUT_LIMIT: usize = 16 << 10;

/// Runs the hooks of `stage` in order; the first failure ends it.
/// `netns`: the namespace to run them in (the caller's, when the VMM
/// process has left it). Hooks without a timeout get `default_timeout`.
pub fn run(
    hooks: Option<&Hooks>,
    stage: Stage,
    state: &HookState,
    netns: Option<&OwnedFd>,
    default_timeout: Duration,
) -> Result<(), RuntimeError> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    let input = serde_json::to_vec(state).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    for h in stage.of(hooks) {
        let timeout = match h.timeout() {
            Some(t) if t > 0 => Duration::from_secs(t as u64),
            Some(t) => {
                return Err(RuntimeError::Invalid(format!(
                    "{} hook {}: timeout {t} must be positive",
                    stage.name(),
                    h.path().display()
                )))
            }
            None => default_timeout,
        };
        run_one(&h, &input, netns, timeout).map_err(|e| {
            RuntimeError::Invalid(format!("{} hook {}: {e}", stage.name(), h.path().display()))
        })?;
    }
    Ok(())
}

fn run_one(
    h: &Hook,
    input: &[u8],
    netns: Option<&OwnedFd>,
    timeout: Duration,
) -> Result<(), String> {
    let mut cmd = Command::new(h.path());
    if let Some(args) = h.args().as_ref().filter(|a| !a.is_empty()) {
        cmd.arg0(&args[0]).args(&args[1..]);
    }
    cmd.env_clear();
    for kv in h.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: the closure only calls setns(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    // A hook that does not read its stdin gets EPIPE: not an error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(r) = r {
                let _ = r.take(OUTPUT_LIMIT as u64).read_to_end(&mut out);
            }
            out
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", timeout.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = [
        err.join().unwrap_or_default(),
        out.join().unwrap_or_default(),
    ]
    .concat();
    let text = String::from_utf8_lossy(&text);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "{status}{}{}",
        if last.is_empty() { "" } else { ": " },
        last.trim()
    ))
}

/// Where a container's hooks are kept for `start` and `delete`.
pub fn file(dir: &Path) -> PathBuf {
    dir.join("hooks.json")
}

/// The hooks saved in a container's state dir, if any.
pub fn load(dir: &Path) -> Option<Hooks> {
    let bytes = std::fs::read(file(dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str, timeout: Option<i64>) -> Hooks {
        serde_json::from_value(serde_json::json!({"prestart": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", script],
            "env": ["HOOK_ENV=yes"],
            "timeout": timeout,
        }]}))
        .unwrap()
    }

    fn state() -> HookState {
        HookState {
            oci_version: "1.2.0".into(),
            id: "c1".into(),
            status: "creating".into(),
            pid: 42,
            bundle: "/b".into(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn a_hook_reads_the_state_and_its_env() {
        let dir = std::env::temp_dir().join(format!("husk-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let h = hook(
            &format!(
                "cat > {} && echo >> {0} && echo $HOOK_ENV >> {0}",
                out.display()
            ),
            None,
        );
        run(
            Some(&h),
            Stage::Prestart,
            &state(),
            None,
            Duration::from_secs(30),
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "creating");
        assert_eq!(v["ociVersion"], "1.2.0");
        assert_eq!(text.lines().nth(1), Some("yes"));
        // Other stages have no hooks here.
        run(
            Some(&h),
            Stage::Poststop,
            &state(),
            None,
            Duration::from_secs(30),
        )
        .unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failures_and_timeouts_name_the_hook() {
        let h = hook("echo it broke >&2; exit 3", None);
        let e = run(
            Some(&h),
            Stage::Prestart,
            &state(),
            None,
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("prestart hook /bin/sh") && e.contains("it broke"),
            "{e}"
        );
        let h = hook("exec sleep 30", Some(1));
        let e = run(
            Some(&h),
            Stage::Prestart,
            &state(),
            None,
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("timed out after 1 s"), "{e}");
    }
}
