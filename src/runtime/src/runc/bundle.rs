//! An OCI bundle (config.json + root filesystem) and the spec the guest
//! agent gets from it.

use std::path::{Path, PathBuf};

use husk_proto::{GuestFile, FILES_DIR};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::run::CONTAINER_ID;
use crate::shares::ShareSet;
use crate::RuntimeError;

/// Largest config.json read.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// Its config.json.
    pub spec: Spec,
    /// Absolute root filesystem directory.
    pub rootfs: PathBuf,
}

/// Reads `dir/config.json` and finds the root filesystem (`root.path`,
/// relative to the bundle unless absolute).
pub fn load(dir: &Path) -> Result<Bundle, RuntimeError> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| RuntimeError::Io(format!("bundle {}", dir.display()), e))?;
    let path = dir.join("config.json");
    let file =
        std::fs::File::open(&path).map_err(|e| RuntimeError::Io(path.display().to_string(), e))?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_CONFIG_BYTES + 1),
        &mut text,
    )
    .map_err(|e| RuntimeError::Io(path.display().to_string(), e))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(RuntimeError::Invalid(format!(
            "{}: larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        )));
    }
    let spec: Spec = serde_json::from_slice(&text)
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("config.json has no root".into()))?;
    let rootfs = dir.join(root.path());
    if !rootfs.is_dir() {
        return Err(RuntimeError::Invalid(format!(
            "rootfs {} is not a directory",
            rootfs.display()
        )));
    }
    Ok(Bundle { dir, spec, rootfs })
}

/// Whether a mount takes a host path (a bind mount).
fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// What the guest gets from a bundle.
#[derive(Debug, Clone)]
pub struct GuestPlan {
    /// The spec the agent gets.
    pub spec: Spec,
    /// Host files for its bind mounts.
    pub files: Vec<GuestFile>,
    /// Host directories for its bind mounts.
    pub shares: ShareSet,
}

/// The most host-file content a container takes into its VM (it travels
/// in one agent request).
const MAX_FILES_BYTES: usize = 128 << 10;

/// The spec the agent gets: the bundle's, with bind mounts of host files
/// turned into files the agent writes (Docker's /etc/hosts, hostname,
/// resolv.conf), a bind of a host directory on /dev/shm turned into the
/// guest's own tmpfs, other host directories shared through virtio-fs
/// (`ro` honoured by the backend too), no network namespace (the container
/// shares the guest's, where the VM's interfaces are), and no hooks (they
/// run on the host). Refused: binds of sockets or devices, a terminal
/// without a console socket.
pub fn guest_spec(b: &Bundle, console_socket: bool) -> Result<GuestPlan, RuntimeError> {
    let mut spec = b.spec.clone();
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("config.json has no process".into()))?;
    if process.terminal().unwrap_or(false) && !console_socket {
        return Err(RuntimeError::Invalid(
            "cannot allocate tty if husk will detach without setting console socket".into(),
        ));
    }
    let mut files = Vec::new();
    let mut shares = ShareSet::default();
    let mut total = 0;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in mounts.iter_mut() {
        if !is_bind(m) {
            continue;
        }
        let source = m.source().clone().unwrap_or_default();
        // Relative sources are relative to the bundle.
        let host = b.dir.join(&source);
        let meta = std::fs::metadata(&host).map_err(|e| {
            RuntimeError::Io(format!("mount {} source", m.destination().display()), e)
        })?;
        if meta.is_dir() && m.destination() == Path::new("/dev/shm") {
            m.set_typ(Some("tmpfs".into()));
            m.set_source(Some("shm".into()));
            m.set_options(Some(
                ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                    .map(String::from)
                    .to_vec(),
            ));
            continue;
        }
        if meta.is_dir() {
            let read_only = m
                .options()
                .as_ref()
                .is_some_and(|o| o.iter().any(|x| x == "ro"));
            let what = format!("mount {}", m.destination().display());
            m.set_source(Some(shares.add(&host, read_only, &what)?));
            continue;
        }
        if !meta.is_file() {
            return Err(RuntimeError::Invalid(format!(
                "mount {} (bind of host path {}): only regular files and directories \
                 can reach the VM",
                m.destination().display(),
                source.display(),
            )));
        }
        total += meta.len() as usize;
        if total > MAX_FILES_BYTES {
            return Err(RuntimeError::Invalid(format!(
                "mount {} (bind of host file {}): host files bound into a VM may hold \
                 {} KiB in all",
                m.destination().display(),
                source.display(),
                MAX_FILES_BYTES >> 10
            )));
        }
        let content =
            std::fs::read(&host).map_err(|e| RuntimeError::Io(host.display().to_string(), e))?;
        use std::os::unix::fs::PermissionsExt;
        let name = format!("f{}", files.len());
        m.set_source(Some(Path::new(FILES_DIR).join(CONTAINER_ID).join(&name)));
        files.push(GuestFile {
            name,
            mode: meta.permissions().mode() & 0o7777,
            content,
        });
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces_mut() {
            ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
    }
    spec.set_hooks(None);
    Ok(GuestPlan {
        spec,
        files,
        shares,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &serde_json::Value) -> (PathBuf, Result<Bundle, RuntimeError>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-bundle-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let b = load(&dir);
        (dir, b)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]
        })
    }

    #[test]
    fn a_relative_root_resolves_in_the_bundle() {
        let (dir, b) = bundle(&base());
        let b = b.unwrap();
        assert_eq!(
            b.rootfs,
            std::fs::canonicalize(&dir).unwrap().join("rootfs")
        );
        guest_spec(&b, false).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn host_files_travel_and_directories_are_shared() {
        let mut c = base();
        c["mounts"] = serde_json::json!([
            {"destination": "/etc/hosts", "type": "bind", "source": "hosts", "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "rootfs", "options": ["rbind"]},
            {"destination": "/data", "type": "none", "source": "rootfs", "options": ["rbind", "ro"]},
        ]);
        c["linux"] = serde_json::json!({"namespaces": [{"type": "network"}, {"type": "pid"}]});
        c["hooks"] = serde_json::json!({"prestart": [{"path": "/usr/bin/hook"}]});
        let (dir, b) = bundle(&c);
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let plan = guest_spec(&b.unwrap(), false).unwrap();
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].content, b"127.0.0.1 localhost\n");
        let mounts = plan.spec.mounts().clone().unwrap();
        assert_eq!(
            mounts[0].source().as_deref(),
            Some(Path::new("/run/husk/files/run/f0"))
        );
        assert_eq!(mounts[1].typ().as_deref(), Some("tmpfs"));
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("/run/husk/shares/husk0"))
        );
        assert_eq!(plan.shares.0.len(), 1);
        assert!(plan.shares.0[0].read_only);
        assert_eq!(
            plan.shares.0[0].dir,
            std::fs::canonicalize(dir.join("rootfs")).unwrap()
        );
        let ns = plan
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert_eq!(ns.len(), 1, "the network namespace is the guest's");
        assert!(plan.spec.hooks().is_none(), "hooks run on the host");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refusals_name_what_is_refused() {
        let mut c = base();
        c["mounts"] = serde_json::json!([{"destination": "/dev/nul", "type": "bind",
            "source": "/dev/null", "options": ["rbind"]}]);
        let (dir, b) = bundle(&c);
        let e = guest_spec(&b.unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("/dev/nul") && e.contains("/dev/null"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();

        let mut c = base();
        c["mounts"] = serde_json::json!([{"destination": "/big", "type": "bind",
            "source": "big", "options": ["bind"]}]);
        let (dir, b) = bundle(&c);
        std::fs::write(dir.join("big"), vec![0u8; MAX_FILES_BYTES + 1]).unwrap();
        let e = guest_spec(&b.unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("/big") && e.contains("KiB"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
        let mut c = base();
        c["process"]["terminal"] = serde_json::json!(true);
        let (dir, b) = bundle(&c);
        let e = guest_spec(&b.unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("console socket"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();

        let mut c = base();
        c["root"]["path"] = serde_json::json!("missing");
        let (dir, b) = bundle(&c);
        assert!(b.unwrap_err().to_string().contains("is not a directory"));
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, b) = bundle(&serde_json::json!({"ociVersion": 1}));
        assert!(b.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
