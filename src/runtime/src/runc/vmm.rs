//! The VMM process of a runtime container (`husk vmm-serve DIR`, started
//! by `husk create`): it enters the container's network namespace, runs
//! the create-time hooks, takes over the interfaces the hooks put there,
//! owns the VM and the container's stdio (the fds the caller gave
//! `create`), tells `create` when the container exists, and exits with the
//! container's exit status, so that a shim reaping the pid in `--pid-file`
//! learns it without knowing about VMs.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Hooks;
use serde::{Deserialize, Serialize};

use super::cgroups;
use super::detach;
use super::hooks::{self, HookState, Stage};
use super::store::write_atomic;
use crate::net::{self, Netns};
use crate::run::{Session, SessionConfig};
use crate::RuntimeError;

/// Exit status of a VMM process that lost its container (VM or agent
/// failure): not a status a container reports.
pub const LOST: i32 = 255;

/// What `create` hands its VMM process (`DIR/vmm.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmConfig {
    /// The VM and the container in it.
    pub session: SessionConfig,
    /// The network namespace to live in.
    pub netns: Netns,
    /// The config's hooks.
    pub hooks: Option<Hooks>,
    /// The state hooks see (pid and status filled in here).
    pub state: HookState,
}

/// Where the VMM process records the interfaces it took over.
pub fn network_file(dir: &Path) -> PathBuf {
    dir.join("network.json")
}

fn prepare(dir: &Path) -> Result<SessionConfig, RuntimeError> {
    let p = dir.join("vmm.json");
    let bytes = std::fs::read(&p).map_err(|e| RuntimeError::Io(p.display().to_string(), e))?;
    let cfg: VmmConfig = serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", p.display())))?;
    let cgroups_path = cfg
        .session
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone());
    if let Some(path) = cgroups_path {
        let mut created = Vec::new();
        let placed = cgroups::place(&path.to_string_lossy(), std::process::id(), &mut created);
        // Recorded even on failure: `create` removes them once we are gone.
        let json =
            serde_json::to_vec(&created).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        write_atomic(&cgroups_file(dir), &json)?;
        placed?;
    }
    let host_ns = cfg.netns.enter()?;
    let mut state = cfg.state.clone();
    state.pid = std::process::id() as i32;
    state.status = "creating".into();
    for stage in [
        Stage::Prestart,
        Stage::CreateRuntime,
        Stage::CreateContainer,
    ] {
        hooks::run(
            cfg.hooks.as_ref(),
            stage,
            &state,
            host_ns.as_ref(),
            cfg.session.boot_timeout,
        )?;
    }
    let mut session = cfg.session;
    if cfg.netns != Netns::Host {
        session.network = net::discover()?;
        let json = serde_json::to_vec(&session.network)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        write_atomic(&network_file(dir), &json)?;
    }
    if let Some(parent) = session.run_dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(|e| RuntimeError::Io(parent.display().to_string(), e))?;
    }
    // The state dir is new, so a VM dir of the same name is a leftover of
    // an earlier container of that name whose state dir was removed by hand.
    let _ = std::fs::remove_dir_all(&session.run_dir);
    crate::paths::private_dir(&session.run_dir)?;
    session.give_run_dir_to_jail()?;
    Ok(session)
}

/// Where the VMM process records the host cgroups it made.
fn cgroups_file(dir: &Path) -> PathBuf {
    dir.join("cgroups.json")
}

/// Removes what a VMM process, once gone, left on the host: its cgroups,
/// and its filters in a network namespace that outlives it (a path the
/// caller gave; a new namespace went with the process).
pub fn clean_up(dir: &Path) {
    let cgroups = std::fs::read(cgroups_file(dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<PathBuf>>(&b).ok());
    if let Some(dirs) = cgroups {
        cgroups::remove(&dirs);
    }
    disconnect(dir);
}

fn disconnect(dir: &Path) {
    let cfg = std::fs::read(dir.join("vmm.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<VmmConfig>(&b).ok());
    let Some(Netns::Path(ns)) = cfg.map(|c| c.netns) else {
        return;
    };
    let net = std::fs::read(network_file(dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<net::HostNetwork>(&b).ok());
    if let Some(net) = net {
        if let Err(e) = net::disconnect(&ns, &net) {
            tracing::warn!("{e}");
        }
    }
}

/// Runs the VMM process for the container in `dir`; returns its exit code.
pub fn serve(dir: &Path) -> i32 {
    let ready = detach::ready_fd();
    let session = prepare(dir).and_then(|cfg| Session::create(&cfg, None));
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
        // In range: the protocol client checked it.
        Ok(st) => st.exit_code,
        Err(e) => {
            tracing::error!("{e}");
            LOST
        }
    }
}
