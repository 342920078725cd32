//! Making a template: its VM boots in a `husk vm` process of its own
//! with every device slot filled by a placeholder, and is snapshotted
//! once its agent is ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_vmm::api::{self, Request};
use husk_vmm::snapshot;

use super::{dir, nic_mac};
use crate::sandbox::{vm_config, SandboxConfig};
use crate::{paths, RuntimeError};

/// The agent's console line once it listens.
const READY_LINE: &str = "husk-agent: ready";
/// Size of the placeholder root disk.
const PLACEHOLDER_BYTES: u64 = 1 << 20;
/// Where a template's shares point: an empty directory.
fn placeholder_share() -> Result<PathBuf, RuntimeError> {
    let p = dir().join("placeholder-share");
    std::fs::create_dir_all(&p).map_err(|e| RuntimeError::Io(p.display().to_string(), e))?;
    Ok(p)
}

/// A 1 MiB disk of zeroes the template boots with in the root's slot.
fn placeholder() -> Result<PathBuf, RuntimeError> {
    let p = dir().join("placeholder.img");
    if std::fs::metadata(&p).is_ok_and(|m| m.len() == PLACEHOLDER_BYTES) {
        return Ok(p);
    }
    let tmp = dir().join(format!(".placeholder-{}", std::process::id()));
    let io = |e| RuntimeError::Io(p.display().to_string(), e);
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(PLACEHOLDER_BYTES))
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(io)?;
    Ok(p)
}

/// Boots the template VM in a `husk vm` process of its own (its sockets
/// and console in a run dir of its own, whose paths are as short as a
/// sandbox's), waits for its agent, snapshots it into `work/snapshot`
/// through its control socket and stops it. When the sandbox's VMM would
/// be jailed, so is the template's: its run dir, a uid of its own, and a
/// PID namespace (nothing else runs in that process).
pub(super) fn build(
    cfg: &SandboxConfig,
    work: &Path,
    boot_timeout: Duration,
) -> Result<PathBuf, RuntimeError> {
    let run_dir = paths::new_run_dir("template")?;
    let result = build_in(cfg, work, &run_dir, boot_timeout);
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

fn build_in(
    cfg: &SandboxConfig,
    work: &Path,
    run_dir: &Path,
    boot_timeout: Duration,
) -> Result<PathBuf, RuntimeError> {
    let api_sock = run_dir.join("api.sock");
    let console = run_dir.join("console.log");
    let mut tcfg = cfg.clone();
    if cfg.rootfs_image.is_some() {
        tcfg.rootfs_image = Some(placeholder()?);
    }
    tcfg.run_dir = run_dir.to_path_buf();
    tcfg.jail_id = cfg.jail_id.map(|_| crate::runc::store::jail_id(run_dir));
    let mut vm_cfg = vm_config(&tcfg, &run_dir.join("vsock.sock"))?;
    vm_cfg.api_sock = Some(api_sock.clone());
    for (i, nic) in vm_cfg.net.iter_mut().enumerate() {
        nic.mac = Some(nic_mac(i).parse().map_err(RuntimeError::Invalid)?);
    }
    if !vm_cfg.fs.is_empty() {
        let empty = placeholder_share()?;
        for share in &mut vm_cfg.fs {
            share.dir = empty.clone();
            share.read_only = true;
        }
    }
    // The agent then prepares what every restore would otherwise do first
    // (see the agent's `CmdlineOptions::template`).
    if let Some(c) = &mut vm_cfg.cmdline {
        c.push(' ');
        c.push_str(husk_proto::TEMPLATE_CMDLINE_WORD);
    }
    if let Some(jail) = &mut vm_cfg.jail {
        jail.pidns = true;
        std::os::unix::fs::chown(run_dir, Some(jail.uid), Some(jail.gid))
            .map_err(|e| RuntimeError::Io(run_dir.display().to_string(), e))?;
    }
    let mut vmm = TemplateVmm::start(&vm_cfg, work, !vm_cfg.net.is_empty())?;
    let snap = work.join("snapshot");
    let result = (|| {
        wait_ready(&console, &mut || vmm.ended(), boot_timeout)?;
        let ask = |req, files: &[&std::fs::File]| {
            let r = api::request(
                &api_sock,
                req,
                files,
                boot_timeout.max(Duration::from_secs(60)),
            )
            .map_err(|e| RuntimeError::Invalid(format!("template: {e}")))?;
            if r.ok {
                Ok(())
            } else {
                Err(RuntimeError::Invalid(format!(
                    "template: {}",
                    r.error.unwrap_or_default()
                )))
            }
        };
        ask(Request::Pause, &[])?;
        let (state, memory) = snapshot::create_files(&snap)
            .map_err(|e| RuntimeError::Invalid(format!("template: {e}")))?;
        ask(Request::Snapshot, &[&state, &memory])?;
        // Asked to stop, it ends on its own; else it is killed below.
        let _ = ask(Request::Stop, &[]);
        Ok(())
    })();
    vmm.finish(STOP_WAIT);
    result.map(|()| snap)
}

/// How long a template VM that was asked to stop may take to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The `husk vm` process that boots a template (killed if dropped running).
struct TemplateVmm {
    child: std::process::Child,
    log: PathBuf,
}

impl TemplateVmm {
    /// Starts `husk vm --config WORK/vm.json`, its stderr in
    /// `WORK/vmm.log`; it dies with the thread that started it. With
    /// `own_netns` it runs in a new network namespace, where its taps are
    /// made and which goes with it.
    fn start(
        vm_cfg: &husk_vmm::VmConfig,
        work: &Path,
        own_netns: bool,
    ) -> Result<Self, RuntimeError> {
        use std::os::unix::process::CommandExt;
        let io = |p: &Path| {
            let shown = p.display().to_string();
            move |e| RuntimeError::Io(shown, e)
        };
        let config = work.join("vm.json");
        let json = serde_json::to_vec(vm_cfg).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        std::fs::write(&config, json).map_err(io(&config))?;
        let log = work.join("vmm.log");
        let stderr = std::fs::File::create(&log).map_err(io(&log))?;
        let exe = std::env::current_exe().map_err(|e| RuntimeError::Io("current exe".into(), e))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("vm")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        // SAFETY: between fork and exec only prctl(2) and unshare(2) with
        // integer arguments.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if own_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Io("start the template's VM".into(), e))?;
        Ok(TemplateVmm { child, log })
    }

    /// Why it ended, if it has: its exit status and its last words.
    fn ended(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        Some(self.why(status))
    }

    fn why(&self, status: std::process::ExitStatus) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(LOG_TAIL)..];
        match String::from_utf8_lossy(tail)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
        {
            Some(line) => format!("{status}: {}", line.trim()),
            None => status.to_string(),
        }
    }

    /// Waits up to `wait` for it to end; dropped, it is killed if it has
    /// not.
    fn finish(mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TemplateVmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes of a template VM's log read for its last line.
const LOG_TAIL: usize = 4096;

/// Waits for the agent's ready line on the template VM's console;
/// `ended` says why the VM is gone, if it is.
fn wait_ready(
    console: &Path,
    ended: &mut dyn FnMut() -> Option<String>,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = ended() {
            return Err(RuntimeError::VmStopped(format!("template VM: {r}")));
        }
        // The whole line: the agent is done printing it.
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text
            .find(READY_LINE)
            .is_some_and(|at| text[at..].contains('\n'))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::AgentTimeout(timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
