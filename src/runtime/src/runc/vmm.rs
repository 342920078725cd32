//! The VMM process of a runtime container (`husk vmm-serve DIR`, started
//! by `husk create`): it owns the VM and the container's stdio (the fds
//! the caller gave `create`), tells `create` when the container exists,
//! and exits with the container's exit status, so that a shim reaping the
//! pid in `--pid-file` learns it without knowing about VMs.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::detach;
use crate::run::{Session, SessionConfig};
use crate::RuntimeError;

/// Exit status of a VMM process that lost its container (VM or agent
/// failure): not a status a container reports.
pub const LOST: i32 = 255;

/// Runs the VMM process for the container in `dir`; returns its exit code.
pub fn serve(dir: &Path) -> i32 {
    let ready = detach::ready_fd();
    let session = (|| {
        let p = dir.join("vmm.json");
        let bytes = std::fs::read(&p).map_err(|e| RuntimeError::Io(p.display().to_string(), e))?;
        let cfg: SessionConfig = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", p.display())))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&cfg.run_dir)
            .map_err(|e| RuntimeError::Io(cfg.run_dir.display().to_string(), e))?;
        Session::create(&cfg)
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
