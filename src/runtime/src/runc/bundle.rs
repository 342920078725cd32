//! An OCI bundle (config.json + root filesystem) and the spec the guest
//! agent gets from it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

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

/// The spec the agent gets: the bundle's, checked for what a VM cannot do
/// yet (host bind mounts, hooks, a terminal without a console socket).
pub fn guest_spec(b: &Bundle, console_socket: bool) -> Result<Spec, RuntimeError> {
    let spec = b.spec.clone();
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("config.json has no process".into()))?;
    if process.terminal().unwrap_or(false) && !console_socket {
        return Err(RuntimeError::Invalid(
            "cannot allocate tty if husk will detach without setting console socket".into(),
        ));
    }
    for m in spec.mounts().iter().flatten() {
        if is_bind(m) {
            return Err(RuntimeError::Invalid(format!(
                "mount {} (bind of host path {}): host directories and files cannot reach \
                 the VM yet (file sharing is not built)",
                m.destination().display(),
                m.source()
                    .as_deref()
                    .map_or_else(|| "?".into(), |s| s.display().to_string()),
            )));
        }
    }
    if let Some(hooks) = spec.hooks() {
        let named = [
            ("prestart", hooks.prestart()),
            ("createRuntime", hooks.create_runtime()),
            ("createContainer", hooks.create_container()),
            ("startContainer", hooks.start_container()),
            ("poststart", hooks.poststart()),
            ("poststop", hooks.poststop()),
        ];
        for (name, list) in named {
            if let Some(h) = list.as_ref().and_then(|l| l.first()) {
                return Err(RuntimeError::Invalid(format!(
                    "{name} hook {}: hooks are not supported yet",
                    h.path().display()
                )));
            }
        }
    }
    Ok(spec)
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
    fn refusals_name_what_is_refused() {
        let mut c = base();
        c["mounts"] = serde_json::json!([{"destination": "/data", "type": "none",
            "source": "/srv/data", "options": ["rbind", "ro"]}]);
        let (dir, b) = bundle(&c);
        let e = guest_spec(&b.unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("/data") && e.contains("/srv/data"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();

        let mut c = base();
        c["hooks"] = serde_json::json!({"prestart": [{"path": "/usr/bin/hook"}]});
        let (dir, b) = bundle(&c);
        let e = guest_spec(&b.unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("prestart hook /usr/bin/hook"), "{e}");
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
