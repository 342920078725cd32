//! Container state on the host, runc-style: one directory per container
//! under the state root (`--root`, default /run/husk), holding `state.json`
//! (written atomically), a `lock` file whose flock serializes commands on
//! the container, the VMM's config and log, and `vm/` (the VM's sockets
//! and console, removed by the VMM process when it ends).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// What husk records about a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute rootfs path.
    pub rootfs: PathBuf,
    /// The VMM process (its exit status is the container's).
    pub pid: i32,
    /// The VMM process's start time (/proc/PID/stat field 22), so that a
    /// reused pid is not taken for it.
    pub pid_start: u64,
    /// When it was created (RFC 3339).
    pub created: String,
    /// `start` succeeded.
    pub started: bool,
    /// `pause` stopped the VMM process (its vCPUs with it).
    #[serde(default)]
    pub paused: bool,
    /// The bundle's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// OCI runtime states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, its process not started.
    Created,
    /// Its process runs.
    Running,
    /// Its VM is stopped (no vCPU runs).
    Paused,
    /// Its process exited (or its VM is gone).
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// Checks a container id the way runc does: letters, digits, `_+-.`, not
/// `.` or `..` (it becomes a directory name).
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "invalid container id format: {id}"
        )))
    }
}

fn io(p: &Path) -> impl FnOnce(io::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Io(p.display().to_string(), e)
}

/// A container's directory, locked for the life of this value.
pub struct Container {
    /// The directory.
    pub dir: PathBuf,
    /// What was recorded (None while `create` has not finished).
    pub state: Option<ContainerState>,
    _lock: File,
}

fn lock_dir(dir: &Path) -> Result<File, RuntimeError> {
    let p = dir.join("lock");
    crate::paths::lock(&p)
}

impl Container {
    /// Makes the directory of a new container `id` under `root`, locked;
    /// fails if the id is taken.
    pub fn create(root: &Path, id: &str) -> Result<Self, RuntimeError> {
        validate_id(id)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(io(root))?;
        let dir = root.join(id);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::Invalid(format!(
                    "container with id exists: {id}"
                )))
            }
            Err(e) => return Err(io(&dir)(e)),
        }
        let lock = lock_dir(&dir)?;
        Ok(Container {
            dir,
            state: None,
            _lock: lock,
        })
    }

    /// Opens and locks container `id`.
    pub fn open(root: &Path, id: &str) -> Result<Self, RuntimeError> {
        validate_id(id)?;
        let dir = root.join(id);
        if !dir.is_dir() {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        let lock = lock_dir(&dir)?;
        let state = read_state(&dir)?;
        Ok(Container {
            dir,
            state,
            _lock: lock,
        })
    }

    /// The recorded state; an error while `create` has not finished.
    pub fn state(&self) -> Result<&ContainerState, RuntimeError> {
        self.state.as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "container {} is still being created",
                self.dir.file_name().unwrap_or_default().to_string_lossy()
            ))
        })
    }

    /// Writes `state.json` atomically.
    pub fn save(&mut self, state: ContainerState) -> Result<(), RuntimeError> {
        let bytes =
            serde_json::to_vec(&state).map_err(|e| RuntimeError::Invalid(format!("state: {e}")))?;
        write_atomic(&self.dir.join("state.json"), &bytes)?;
        self.state = Some(state);
        Ok(())
    }

    /// The container's status now.
    pub fn status(&self) -> Status {
        match &self.state {
            Some(s) => status_of(s),
            None => Status::Stopped,
        }
    }

    /// Checks that the container's agent can answer: the container exists
    /// and its VM is not paused or gone.
    pub fn require_agent(&self) -> Result<(), RuntimeError> {
        self.state()?;
        match self.status() {
            Status::Created | Status::Running => Ok(()),
            Status::Paused => Err(RuntimeError::Invalid(
                "container is paused: resume it first".into(),
            )),
            Status::Stopped => Err(RuntimeError::Invalid("container not running".into())),
        }
    }

    /// The VM's run directory: see [`vm_dir`].
    pub fn vm_dir(&self) -> PathBuf {
        vm_dir(&self.dir)
    }

    /// Removes the directory (and the VM's, left behind by a killed VMM).
    pub fn remove(self) -> Result<(), RuntimeError> {
        let vm = self.vm_dir();
        if vm.exists() {
            fs::remove_dir_all(&vm).map_err(io(&vm))?;
        }
        fs::remove_dir_all(&self.dir).map_err(io(&self.dir))
    }
}

/// Where the VMs' run directories live.
pub const VM_DIR_ROOT: &str = "/run/husk-vm";

/// SHA-256 of a state dir's path: what names its VM's run dir and uid.
fn state_dir_hash(state_dir: &Path) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes()).into()
}

/// The run directory (vsock socket, console log) of the VM of the
/// container whose state dir is `state_dir`. It is not inside the state
/// dir: a socket path has room for 107 bytes, and a state root plus a
/// 64-character Docker id takes more. Named by a hash of the state dir, so
/// every command finds it.
pub fn vm_dir(state_dir: &Path) -> PathBuf {
    let hash = state_dir_hash(state_dir);
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(VM_DIR_ROOT).join(hex)
}

/// The first uid (and gid) of jailed VMM processes: a range no account
/// or subordinate-id allocation uses.
pub const JAIL_ID_BASE: u32 = 0x7000_0000;

/// The uid and gid the VMM process of the container whose state dir is
/// `state_dir` runs as once jailed: one per container (a hash of the state
/// dir, like `vm_dir`), so that two VMMs do not share a user.
pub fn jail_id(state_dir: &Path) -> u32 {
    let hash = state_dir_hash(state_dir);
    JAIL_ID_BASE + u32::from_be_bytes([0, hash[0], hash[1], hash[2]])
}

/// The agent's vsock socket in a container's VM.
pub fn vsock_path(state_dir: &Path) -> PathBuf {
    vm_dir(state_dir).join("vsock.sock")
}

/// The status a recorded state stands for now.
pub fn status_of(s: &ContainerState) -> Status {
    if !process_alive(s.pid, s.pid_start) {
        Status::Stopped
    } else if s.paused {
        Status::Paused
    } else if s.started {
        Status::Running
    } else {
        Status::Created
    }
}

fn read_state(dir: &Path) -> Result<Option<ContainerState>, RuntimeError> {
    let p = dir.join("state.json");
    match fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&p)(e)),
    }
}

/// Every container under `root` with a recorded state, by id.
pub fn list(root: &Path) -> Result<Vec<ContainerState>, RuntimeError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(root)(e)),
    };
    for e in entries.flatten() {
        if let Ok(Some(s)) = read_state(&e.path()) {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Writes `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Field 3 (state) and 22 (start time) of /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of process `pid`, if it exists.
pub fn process_start(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// Whether `pid` is the process that started at `start` and has not exited
/// (a zombie has exited).
pub fn process_alive(pid: i32, start: u64) -> bool {
    pid > 0 && matches!(proc_stat(pid), Some((st, s)) if s == start && st != 'Z' && st != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runc() {
        for ok in ["a", "abc-1_2.3+4", "x".repeat(200).as_str()] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let start = process_start(me).unwrap();
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
        assert!(!process_alive(0, 0));
    }

    #[test]
    fn create_open_save_list_remove() {
        let root = std::env::temp_dir().join(format!("husk-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut c = Container::create(&root, "one").unwrap();
        assert!(matches!(
            Container::create(&root, "one"),
            Err(RuntimeError::Invalid(m)) if m == "container with id exists: one"
        ));
        assert!(c.state().is_err());
        let me = std::process::id() as i32;
        c.save(ContainerState {
            id: "one".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid: me,
            pid_start: process_start(me).unwrap(),
            created: "2026-01-01T00:00:00Z".into(),
            started: false,
            paused: false,
            annotations: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(c.status(), Status::Created);
        drop(c);
        let c = Container::open(&root, "one").unwrap();
        assert_eq!(c.state().unwrap().pid, me);
        assert_eq!(list(&root).unwrap().len(), 1);
        c.remove().unwrap();
        assert!(matches!(
            Container::open(&root, "one"),
            Err(RuntimeError::NotFound(_))
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
