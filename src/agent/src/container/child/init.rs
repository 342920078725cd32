//! A container's init: cloned on the agent's memory (see `vfork.rs`)
//! with its namespaces, instead of the fork, unshare and second fork an
//! exec'd process takes (`child.rs`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;

use husk_proto::{Rootfs, Scratch};

use super::{
    container_process, spawned, sys_err, Channel, SpawnConfig, SpawnError, SpawnKind, Spawned,
    MSG_ERROR, MSG_GO, MSG_PID, MSG_READY,
};
use crate::container::cgroup::Cgroup;
use crate::container::plan::{ContainerPlan, ProcessPlan};
use crate::marks;
use crate::reaper::ProcessTable;
use crate::sys;

/// What a container's init needs, owned: it runs on the agent's memory
/// until its exec (see `vfork.rs`), past the request that created it.
struct InitChild {
    plan: ContainerPlan,
    process: ProcessPlan,
    staging: PathBuf,
    rootfs: Rootfs,
    scratch: Scratch,
    stdio: [RawFd; 3],
    cgroup: Option<Cgroup>,
    chan: Channel,
    /// The handler's steps so far, which the child goes on with.
    steps: Vec<(&'static str, u64)>,
    /// The child's pid in the agent's namespace (stored by the kernel).
    pid: AtomicI32,
}

/// A container's init: cloned with its namespaces on the agent's memory
/// (no page-table copy, no copy-on-write faults, nothing to unmap at its
/// exec), by a thread that waits for that exec and then lets go of what
/// the child used. The child reports its pid, waits for the cgroup join
/// (then enters a new cgroup namespace, if asked, rooted there) and goes on
/// as `container_process`.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    table: &ProcessTable,
    cfg: &SpawnConfig,
    plan: &ContainerPlan,
    staging: &Path,
    rootfs: &Rootfs,
    scratch: &Scratch,
    chan: Channel,
    child_end: Channel,
) -> Result<Spawned, SpawnError> {
    let cgroup = cfg.cgroup;
    let init = InitChild {
        plan: plan.clone(),
        process: cfg.process.clone(),
        staging: staging.to_path_buf(),
        rootfs: rootfs.clone(),
        scratch: scratch.clone(),
        stdio: cfg.stdio,
        cgroup: cfg.cgroup.cloned(),
        chan: child_end,
        steps: marks::snapshot(),
        pid: AtomicI32::new(0),
    };
    let flags = init.plan.clone_flags & !libc::CLONE_NEWCGROUP;
    thread::Builder::new()
        .name("init-clone".into())
        .spawn(move || {
            marks::replace(init.steps.clone());
            let mut run = || init_main(&init);
            // SAFETY: `init_main` leaves through exec or _exit, and waits
            // only for the agent's handler, not for this thread. It is
            // killed only where it holds no lock: waiting on its channel
            // (which allocates nothing), or after it reported a failure.
            if let Err(e) = unsafe { crate::vfork::clone_vfork(flags, &init.pid, &mut run) } {
                let msg = format!("clone: {e}");
                let _ = init.chan.send(MSG_ERROR, msg.as_bytes(), None);
            }
            // The child exec'd or exited: `init` and its end of the
            // channel go now (the handler then sees the end of stream).
        })
        .map_err(sys_err("start the clone thread"))?;
    let pid = chan.expect_pid("before its setup")?;
    table.track(pid);
    let ready = (|| {
        if let Some(cg) = cgroup {
            cg.join_all_but_devices(pid)?;
        }
        chan.send(MSG_GO, &[], None)
            .map_err(sys_err("signal the container process"))?;
        let r = chan.expect(MSG_READY, "during setup")?;
        // Set up, waiting for START: now under the device rules.
        if let Some(cg) = cgroup {
            cg.join_devices(pid)?;
        }
        Ok(r)
    })();
    spawned(table, pid, chan, ready)
}

/// The init child, from its first instruction.
fn init_main(init: &InitChild) -> ! {
    let chan = &init.chan;
    let mut keep = vec![chan.0.as_raw_fd()];
    keep.extend_from_slice(&init.stdio);
    marks::mark("clone");
    sys::close_fds_except(&keep);
    sys::reset_signals();
    let pid = init.pid.load(Ordering::SeqCst);
    if chan.send(MSG_PID, &pid.to_le_bytes(), None).is_err() {
        sys::exit_now(1);
    }
    let cfg = SpawnConfig {
        kind: SpawnKind::Init {
            plan: &init.plan,
            staging: &init.staging,
            rootfs: &init.rootfs,
            scratch: &init.scratch,
        },
        process: &init.process,
        stdio: init.stdio,
        cgroup: init.cgroup.as_ref(),
    };
    let late = init.plan.clone_flags & libc::CLONE_NEWCGROUP;
    container_process(&cfg, chan, "cgroup join", late)
}
