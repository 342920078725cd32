//! The VMM process of a runtime container (`husk vmm-serve DIR`, started
//! by `husk create`): it owns the VM and the container's stdio (the fds
//! the caller gave `create`), tells `create` when the container exists,
//! and exits with the container's exit status, so that a shim reaping the
//! pid in `--pid-file` learns it without knowing about VMs.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use super::detach;
use crate::run::{Session, SessionConfig};
use crate::RuntimeError;

/// Exit status of a VMM process that lost its container (VM or agent
/// failure): not a status a container reports.
pub const LOST: i32 = 255;

/// What `create` hands the VMM process (`DIR/vmm.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmConfig {
    /// The container's spec, for the agent.
    pub spec: Spec,
    /// The root filesystem's ext4 image.
    pub rootfs_image: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest kernel; None: default.
    pub kernel: Option<PathBuf>,
    /// Agent binary; None: default.
    pub agent: Option<PathBuf>,
    /// Seconds the guest may take to boot and answer.
    pub boot_timeout_s: u64,
}

/// Runs the VMM process for the container in `dir`; returns its exit code.
pub fn serve(dir: &Path) -> i32 {
    let ready = detach::ready_fd();
    let session = (|| {
        let p = dir.join("vmm.json");
        let bytes = std::fs::read(&p).map_err(|e| RuntimeError::Io(p.display().to_string(), e))?;
        let cfg: VmmConfig = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", p.display())))?;
        let run_dir = dir.join("vm");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&run_dir)
            .map_err(|e| RuntimeError::Io(run_dir.display().to_string(), e))?;
        Session::create(&SessionConfig {
            spec: cfg.spec,
            rootfs_image: cfg.rootfs_image,
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            interactive: true,
            host_terminal: false,
            kernel: cfg.kernel,
            agent: cfg.agent,
            boot_timeout: Duration::from_secs(cfg.boot_timeout_s),
            run_dir,
        })
    })();
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            detach::report(ready, &format!("error: {e}"));
            return LOST;
        }
    };
    detach::report(ready, "ok");
    match session.wait() {
        Ok(st) if (0..=255).contains(&st.exit_code) => st.exit_code,
        Ok(st) => {
            tracing::error!(
                "the agent reported exit code {} (out of range)",
                st.exit_code
            );
            LOST
        }
        Err(e) => {
            tracing::error!("{e}");
            LOST
        }
    }
}
