//! `husk create`: the bundle's root is shared with the VM through
//! virtio-fs (or, with annotation `io.husk.rootfs=image`, copied into a
//! cached ext4 disk), a VMM process boots the VM and creates the container
//! in it, and `create`
//! returns once the container exists, leaving the VMM process behind for
//! the caller's subreaper (its pid goes to `--pid-file`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use super::bundle;
use super::console;
use super::detach;
use super::hooks::{self, HookState};
use super::query::OCI_VERSION;
use super::store::{process_start, write_atomic, Container, ContainerState};
use super::vmm::{self, VmmConfig};
use crate::net::{HostNetwork, Netns};
use crate::run::{vcpus_for, vm_mem_mib, GuestRoot, SessionConfig};
use crate::{paths, RuntimeError};

/// `create` options.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Where to write the VMM process's pid.
    pub pid_file: Option<PathBuf>,
    /// Unix socket to send the terminal's master to.
    pub console_socket: Option<PathBuf>,
    /// Our stdio is a terminal the container may use as its own (runc's
    /// foreground `run`).
    pub stdio_terminal: bool,
    /// Guest kernel; None: default.
    pub kernel: Option<PathBuf>,
    /// Agent binary; None: default.
    pub agent: Option<PathBuf>,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
    /// Arguments for the VMM process before its subcommand (log settings).
    pub vmm_args: Vec<String>,
}

/// The annotation that picks how the bundle's root reaches the VM.
pub const ROOTFS_ANNOTATION: &str = "io.husk.rootfs";

/// How the bundle's root reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootMode {
    /// Shared live through virtio-fs: the container writes into the
    /// bundle's rootfs, as under runc (`docker diff`/`cp` see it).
    Share,
    /// Copied into a cached read-only ext4 image; writes stay in the VM.
    Image,
}

/// Whether VMM processes are jailed: unless `HUSK_JAIL` is off (for
/// debugging, as `HUSK_SECCOMP=off`).
pub fn jail_enabled_by_env() -> bool {
    !crate::env_off("HUSK_JAIL")
}

/// The bundle's choice (annotation `io.husk.rootfs`), else
/// `$HUSK_ROOTFS`, else sharing.
pub fn root_mode(spec: &oci_spec::runtime::Spec) -> Result<RootMode, RuntimeError> {
    let annotated = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ROOTFS_ANNOTATION).cloned());
    let (value, from) = match annotated {
        Some(v) => (v, format!("annotation {ROOTFS_ANNOTATION}")),
        None => match std::env::var("HUSK_ROOTFS") {
            Ok(v) if !v.is_empty() => (v, "HUSK_ROOTFS".to_string()),
            _ => return Ok(RootMode::Share),
        },
    };
    match value.as_str() {
        "share" => Ok(RootMode::Share),
        "image" => Ok(RootMode::Image),
        other => Err(RuntimeError::Invalid(format!(
            "{from}: {other:?} is not share or image"
        ))),
    }
}

/// Creates container `o.id` under the state root `root`.
pub fn create(root: &Path, o: &CreateOptions) -> Result<(), RuntimeError> {
    let b = bundle::load(&o.bundle)?;
    let plan = bundle::guest_spec(&b, o.console_socket.is_some() || o.stdio_terminal)?;
    let spec = plan.spec;
    let tty = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let mut shares = plan.shares;
    let guest_root = match root_mode(&b.spec)? {
        // Shared read-write even for root.readonly: as runc does, the
        // agent makes missing mount points first and then remounts the
        // root read-only for the container.
        RootMode::Share => GuestRoot::Share(shares.add(&b.rootfs, false, "root.path")?),
        RootMode::Image => GuestRoot::Disk(husk_image::ext4::image_for_dir(
            &b.rootfs,
            &paths::image_cache(),
        )?),
    };
    // Fail early on what the VMM process would fail on.
    paths::agent_binary(o.agent.as_deref())?;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let memory = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    let cpus = resources.and_then(|r| r.cpu().as_ref()).and_then(|c| {
        let (quota, period) = (c.quota()?, c.period()?);
        (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
    });
    let mut c = Container::create(root, &o.id)?;
    let cfg = SessionConfig {
        mem_mib: vm_mem_mib(memory),
        vcpus: vcpus_for(cpus),
        spec,
        root: guest_root,
        // The VMM's stdio is the caller's, or with a terminal the pty
        // whose master went to the console socket.
        interactive: true,
        host_terminal: tty,
        kernel: o.kernel.clone(),
        agent: o.agent.clone(),
        boot_timeout: o.boot_timeout,
        run_dir: c.vm_dir(),
        network: HostNetwork::default(),
        files: plan.files,
        shares,
        // HUSK_SECCOMP, in the caller's environment, can still turn it off.
        seccomp: Default::default(),
        // HUSK_TEMPLATE=off likewise.
        template: crate::template::enabled_by_env(),
        // HUSK_JAIL=off likewise.
        jail_id: jail_enabled_by_env().then(|| super::store::jail_id(&c.dir)),
    };
    let annotations: BTreeMap<String, String> = b
        .spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let cfg = VmmConfig {
        session: cfg,
        netns: Netns::of(&b.spec),
        hooks: b.spec.hooks().clone(),
        state: HookState {
            oci_version: OCI_VERSION.into(),
            id: o.id.clone(),
            status: "creating".into(),
            pid: 0,
            bundle: b.dir.clone(),
            annotations: annotations.clone(),
        },
    };
    let pid = match start_vmm(&c, &cfg, o) {
        Ok(pid) => pid,
        Err(e) => {
            // The VMM process is gone (spawn reaped it).
            vmm::clean_up(&c.dir);
            let _ = c.remove();
            return Err(e);
        }
    };
    let result = (|| {
        let pid_start = process_start(pid)
            .ok_or_else(|| RuntimeError::Invalid("the VMM process exited".into()))?;
        c.save(ContainerState {
            id: o.id.clone(),
            bundle: b.dir.clone(),
            rootfs: b.rootfs.clone(),
            pid,
            pid_start,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            started: false,
            paused: false,
            annotations,
        })?;
        match &o.pid_file {
            Some(p) => write_atomic(p, pid.to_string().as_bytes()),
            None => Ok(()),
        }
    })();
    if result.is_err() {
        super::lifecycle::kill_vmm(pid, process_start(pid).unwrap_or(0));
        vmm::clean_up(&c.dir);
        let _ = c.remove();
    }
    result
}

/// Starts the VMM process and waits for its report; returns its pid.
fn start_vmm(c: &Container, cfg: &VmmConfig, o: &CreateOptions) -> Result<i32, RuntimeError> {
    let json = serde_json::to_vec(cfg).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    write_atomic(&c.dir.join("vmm.json"), &json)?;
    if let Some(h) = &cfg.hooks {
        let json = serde_json::to_vec(h).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        write_atomic(&hooks::file(&c.dir), &json)?;
    }
    let mut args: Vec<OsString> = o.vmm_args.iter().map(OsString::from).collect();
    args.push("vmm-serve".into());
    args.push(c.dir.clone().into());
    let terminal = match (&o.console_socket, cfg.session.host_terminal) {
        (Some(socket), true) => Some(console::hand_over(socket)?),
        _ => None,
    };
    // The VMM boots the guest and creates the container: the boot timeout
    // bounds it, with room for building the VM.
    detach::spawn(
        &args,
        o.boot_timeout + Duration::from_secs(10),
        terminal.as_ref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotation: Option<&str>) -> oci_spec::runtime::Spec {
        let mut s = oci_spec::runtime::Spec::default();
        if let Some(v) = annotation {
            s.set_annotations(Some(
                [(ROOTFS_ANNOTATION.to_string(), v.to_string())].into(),
            ));
        }
        s
    }

    #[test]
    fn the_annotation_picks_the_root_mode_and_bad_values_are_named() {
        assert_eq!(root_mode(&spec(Some("image"))).unwrap(), RootMode::Image);
        assert_eq!(root_mode(&spec(Some("share"))).unwrap(), RootMode::Share);
        let e = root_mode(&spec(Some("disk"))).unwrap_err().to_string();
        assert!(e.contains(ROOTFS_ANNOTATION) && e.contains("disk"), "{e}");
        if std::env::var_os("HUSK_ROOTFS").is_none() {
            assert_eq!(root_mode(&spec(None)).unwrap(), RootMode::Share);
        }
    }
}
