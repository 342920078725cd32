//! Creating a container: its plan, cgroup and init process, spawned
//! stopped until `start`; and spawning any of its processes.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use husk_proto::{CreateContainer, ErrorBody, ErrorCode, ProcessInfo, Timestamps};

use super::{check_id, err, lock, plan_err, Agent};
use crate::container::cgroup::{Cgroup, DeviceRule};
use crate::container::child::{spawn, SpawnConfig, SpawnKind};
use crate::container::plan::{plan_container, ProcessPlan};
use crate::log;
use crate::marks;
use crate::state::{Container, Proc, StdioEnds};
use crate::sys;

impl Agent {
    pub(super) fn create(self: &Arc<Self>, req: CreateContainer) -> Result<ProcessInfo, ErrorBody> {
        let id = req.container_id.clone();
        check_id(&id)?;
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(err(
                    ErrorCode::AlreadyExists,
                    format!("container {id:?} exists"),
                ));
            }
        }
        let result = self.create_reserved(req);
        lock(&self.creating).remove(&id);
        self.creates.ended(id);
        result
    }

    fn create_reserved(self: &Arc<Self>, req: CreateContainer) -> Result<ProcessInfo, ErrorBody> {
        let id = &req.container_id;
        marks::start();
        let mut plan = plan_container(&req.spec, self.cap_last_cap).map_err(plan_err)?;
        self.add_platform_env(&mut plan.process);
        marks::mark("plan");
        if !plan.shared_namespaces.is_empty() {
            log!(
                "container {id}: namespaces with a host path ({}) are shared with the guest",
                plan.shared_namespaces.join(", ")
            );
        }
        crate::container::shares::mount(&req.shares).map_err(|(code, msg)| err(code, msg))?;
        let files_dir = Path::new(husk_proto::FILES_DIR).join(id);
        if let Err((code, msg)) = crate::container::files::write(&files_dir, &req.files) {
            let _ = fs::remove_dir_all(&files_dir);
            return Err(err(code, msg));
        }
        marks::mark("shares and files");
        let cgroup = match self.make_cgroup(id, &req, &plan.device_rules) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&files_dir);
                return Err(e);
            }
        };
        marks::mark("cgroup");
        let staging = self.cfg.staging_dir.join(id);
        let result = (|| {
            fs::create_dir_all(&staging).map_err(|e| {
                err(
                    ErrorCode::Internal,
                    format!("create {}: {e}", staging.display()),
                )
            })?;
            let kind = SpawnKind::Init {
                plan: &plan,
                staging: &staging,
                rootfs: &req.rootfs,
                scratch: &req.scratch,
            };
            self.spawn_proc(kind, &plan.process, req.stdin, cgroup.as_ref())
        })();
        let (proc, mut spawned) = match result {
            Ok(v) => v,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                let _ = fs::remove_dir(&staging);
                let _ = fs::remove_dir_all(&files_dir);
                return Err(e);
            }
        };
        let setup = std::mem::take(&mut spawned.setup);
        let oom_baseline = cgroup.as_ref().map_or(0, Cgroup::oom_kills);
        // Held by the agent, the container's mount namespace outlives its
        // init: the kernel does not unmount the root and every other mount
        // (evicting their page cache) in the init's exit path, before its
        // exit status can be reported. See `watch`.
        let mount_ns = sys::open_ro(Path::new(&format!("/proc/{}/ns/mnt", proc.pid))).ok();
        let container = Arc::new(Container {
            id: id.clone(),
            init: Arc::clone(&proc),
            clone_flags: plan.clone_flags,
            cgroup,
            oom_baseline,
            execs: Mutex::new(HashMap::new()),
            pending_start: Mutex::new(Some(spawned)),
            mount_ns: Mutex::new(mount_ns),
            seccomp: plan.process.seccomp.clone(),
        });
        lock(&self.containers).insert(id.clone(), Arc::clone(&container));
        self.watch(container, Arc::clone(&proc), true);
        Ok(ProcessInfo {
            pid: proc.pid,
            timestamps: proc.timestamps(),
            setup,
        })
    }

    /// What the platform adds to every container process's environment
    /// (a container's init and each exec): the guest's glibc tunables.
    pub(super) fn add_platform_env(&self, process: &mut ProcessPlan) {
        if let Some(t) = &self.cfg.glibc_tunables {
            process.add_glibc_tunables(t);
        }
    }

    fn make_cgroup(
        &self,
        id: &str,
        req: &CreateContainer,
        device_rules: &[DeviceRule],
    ) -> Result<Option<Cgroup>, ErrorBody> {
        let Some(system) = &self.cgroups else {
            return Ok(None);
        };
        let spare = lock(&self.spare_cgroup).take();
        let cg = match spare {
            Some(cg) => cg,
            None => system
                .create(id)
                .map_err(|e| err(ErrorCode::SetupFailed, e.to_string()))?,
        };
        let resources = req
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let applied = match resources {
            Some(res) => cg.apply(res),
            None => Ok(()),
        }
        .and_then(|()| cg.apply_devices(device_rules));
        if let Err(e) = applied {
            cg.remove();
            return Err(err(ErrorCode::SetupFailed, e.to_string()));
        }
        Ok(Some(cg))
    }

    /// Pipes (or a pty), fork, setup; returns the process, ready to exec.
    pub(super) fn spawn_proc(
        &self,
        kind: SpawnKind,
        process: &ProcessPlan,
        want_stdin: bool,
        cgroup: Option<&Cgroup>,
    ) -> Result<(Arc<Proc>, crate::container::child::Spawned), ErrorBody> {
        let internal =
            |what: &str, e: std::io::Error| err(ErrorCode::Internal, format!("{what}: {e}"));
        let terminal = process.terminal;
        let mut ends = StdioEnds::default();
        let mut child_fds: Vec<OwnedFd> = Vec::new();
        if terminal {
            // The pty replaces all three; the child ignores these.
            let null =
                sys::open_ro(Path::new("/dev/null")).map_err(|e| internal("open /dev/null", e))?;
            child_fds.push(null);
        } else {
            if want_stdin {
                let (r, w) = sys::pipe().map_err(|e| internal("pipe", e))?;
                ends.stdin = Some(w);
                child_fds.push(r);
            } else {
                let null = sys::open_ro(Path::new("/dev/null"))
                    .map_err(|e| internal("open /dev/null", e))?;
                child_fds.push(null);
            }
            let (r, w) = sys::pipe().map_err(|e| internal("pipe", e))?;
            ends.stdout = Some(r);
            child_fds.push(w);
            let (r, w) = sys::pipe().map_err(|e| internal("pipe", e))?;
            ends.stderr = Some(r);
            child_fds.push(w);
        }
        let fd = |i: usize| {
            child_fds
                .get(i)
                .or(child_fds.first())
                .map_or(-1, |f| f.as_raw_fd())
        };
        let cfg = SpawnConfig {
            kind,
            process,
            stdio: [fd(0), fd(1), fd(2)],
            cgroup,
        };
        let mut spawned =
            spawn(&self.table, &cfg).map_err(|e| err(ErrorCode::SetupFailed, e.to_string()))?;
        drop(child_fds);
        let created_ns = sys::boottime_ns();
        let mut pty_control = None;
        if let Some(master) = spawned.pty_master.take() {
            pty_control = master.try_clone().ok();
            ends.pty = Some(master);
        }
        let timestamps = Timestamps {
            created_ns: Some(created_ns),
            ..self.base_timestamps()
        };
        let proc = Proc::new(
            spawned.pid,
            terminal,
            want_stdin && !terminal,
            ends,
            pty_control,
            timestamps,
        );
        Ok((Arc::new(proc), spawned))
    }
}
