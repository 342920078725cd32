//! Where husk keeps its state: `$HUSK_ROOT` (default /var/lib/husk).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::RuntimeError;

/// husk's root directory.
pub fn root() -> PathBuf {
    husk_vmm::builder::husk_root()
}

/// The guest agent binary: `explicit`, else `$HUSK_AGENT`, else
/// `$HUSK_ROOT/agent/husk-agent` (where tools/build-agent installs it).
pub fn agent_binary(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let p = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HUSK_AGENT").map(PathBuf::from))
        .unwrap_or_else(|| root().join("agent").join("husk-agent"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(RuntimeError::NoAgent(p.display().to_string()))
    }
}

/// Path of the agent inside its disk (the kernel's `init=`).
pub const AGENT_IN_DISK: &str = "/husk-agent";

/// The read-only ext4 disk holding only `agent` (as `/husk-agent`) and the
/// empty directories the boot needs, cached under the root by the agent's
/// content digest. The guest kernel mounts it as its root and runs the
/// agent from it: on kvm_pvm an initramfs costs ~1 s per MiB of emulated
/// unpacking, while a disk is read by DMA, and only the pages the agent
/// touches.
pub fn agent_disk(agent: &Path) -> Result<PathBuf, RuntimeError> {
    let shown = agent.display().to_string();
    let bytes = std::fs::read(agent).map_err(|e| RuntimeError::Io(shown, e))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = root().join("agent-disk");
    let io = |p: &Path| {
        let shown = p.display().to_string();
        move |e| RuntimeError::Io(shown, e)
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let out = dir.join(format!("agent-{digest}.ext4"));
    if out.exists() {
        return Ok(out);
    }
    let tag = format!("{digest}.{}", std::process::id());
    let tree = dir.join(format!(".tree-{tag}"));
    let tmp = dir.join(format!(".agent-{tag}.ext4"));
    let result = (|| {
        // /.root: the agent mounts a tmpfs there and makes it the root.
        for d in [".root", "dev", "proc", "sys"] {
            std::fs::create_dir_all(tree.join(d)).map_err(io(&tree))?;
        }
        let bin = tree.join(AGENT_IN_DISK.trim_start_matches('/'));
        std::fs::write(&bin, &bytes).map_err(io(&bin))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).map_err(io(&bin))?;
        let (_, size) = husk_image::ext4::fingerprint(&tree)?;
        husk_image::ext4::build(&tree, &tmp, size)?;
        std::fs::rename(&tmp, &out).map_err(io(&out))
    })();
    let _ = std::fs::remove_dir_all(&tree);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| out)
}

/// Where read-only rootfs images are cached.
pub fn image_cache() -> PathBuf {
    root().join("images")
}

/// A fresh private directory for one sandbox's sockets and logs.
pub fn new_run_dir(tag: &str) -> Result<PathBuf, RuntimeError> {
    let base = root().join("run");
    std::fs::create_dir_all(&base).map_err(|e| RuntimeError::Io(base.display().to_string(), e))?;
    let dir = base.join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` for this user only: it holds the VM's vsock socket,
/// through which the agent's ports are reached.
pub(crate) fn private_dir(dir: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| RuntimeError::Io(dir.display().to_string(), e))
}

/// An exclusive lock on `path` (created, mode 0600, if absent), held
/// while the returned file is open; waits for another holder to let go.
pub fn lock(path: &Path) -> Result<std::fs::File, RuntimeError> {
    flock(path, true)?.ok_or_else(|| {
        RuntimeError::Io(
            path.display().to_string(),
            std::io::ErrorKind::WouldBlock.into(),
        )
    })
}

/// [`lock`], or None at once when another process holds it.
pub fn try_lock(path: &Path) -> Result<Option<std::fs::File>, RuntimeError> {
    flock(path, false)
}

fn flock(path: &Path, wait: bool) -> Result<Option<std::fs::File>, RuntimeError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| RuntimeError::Io(path.display().to_string(), e);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let how = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock(2) on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), how) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) if !wait => Ok(None),
        _ => Err(io(e)),
    }
}

/// The run directory of a named container, with the name's lock held (a
/// shared name is refused while its holder runs; a dead holder's
/// directory is reused).
pub fn claim_name(name: &str) -> Result<(PathBuf, std::fs::File), RuntimeError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(RuntimeError::Invalid(format!(
            "invalid container name {name:?}: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 64"
        )));
    }
    let base = root().join("run");
    std::fs::create_dir_all(&base).map_err(|e| RuntimeError::Io(base.display().to_string(), e))?;
    let lock_path = base.join(format!("name-{name}.lock"));
    let Some(lock) = try_lock(&lock_path)? else {
        return Err(RuntimeError::Invalid(format!(
            "the container name {name:?} is already in use by a running container"
        )));
    };
    let dir = base.join(format!("name-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    private_dir(&dir)?;
    Ok((dir, lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("husk-paths-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let d = base.join("run-x");
        private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(private_dir(&d).is_err(), "an existing dir is not reused");
        std::fs::remove_dir_all(base).unwrap();
    }
}
