//! What the control socket asks of a running VM: pause and resume with
//! the vCPUs' acknowledgement, a snapshot of the paused VM, stop. Runs on
//! the event-loop thread (see `api`), so no device works meanwhile.

use std::fs::File;
use std::sync::atomic::Ordering;

use crate::api::{self, Request, Response, VCPU_TIMEOUT};
use crate::builder::Vm;
use crate::exit::VmExit;
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vstate::vcpu::VcpuCommand;
use crate::vstate::vm::VmState;

impl Vm {
    /// Serves every connection waiting on the control socket.
    pub(crate) fn serve_api(&self) {
        let Some(api) = &self.api else {
            return;
        };
        while let Some(stream) = api.accept() {
            let incoming = api::read_request(&stream);
            let resp = match incoming.request {
                Ok(req) => self.handle(req, incoming.files),
                Err(e) => Response::err(e),
            };
            api::write_response(&stream, &resp);
        }
    }

    fn handle(&self, req: Request, files: Vec<File>) -> Response {
        let result = match req {
            Request::Pause => self.pause().map(|()| Response::ok()),
            Request::Resume => {
                self.resume();
                Ok(Response::ok())
            }
            Request::Status => Ok(Response {
                state: Some(
                    if self.paused.load(Ordering::SeqCst) {
                        "paused"
                    } else {
                        "running"
                    }
                    .into(),
                ),
                ..Response::ok()
            }),
            Request::Stop => {
                self.latch.stop(VmExit::Stopped);
                Ok(Response::ok())
            }
            Request::Snapshot => match <[File; 2]>::try_from(files) {
                Ok([mut state, memory]) => self.snapshot(&mut state, &memory).map(|n| Response {
                    memory_bytes_written: Some(n),
                    ..Response::ok()
                }),
                Err(v) => Err(format!(
                    "a snapshot request carries two files (state, memory), got {}",
                    v.len()
                )),
            },
        };
        result.unwrap_or_else(Response::err)
    }

    /// Takes every vCPU out of the guest and waits until each says so.
    /// On a failure the VM runs again.
    pub(crate) fn pause(&self) -> Result<(), String> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        for v in &self.vcpus {
            if let Err(e) = v.pause(VCPU_TIMEOUT) {
                self.resume();
                return Err(e);
            }
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub(crate) fn resume(&self) {
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Writes the paused VM's state and memory into the two files; returns
    /// the bytes of memory written (all-zero pages are left as holes).
    fn snapshot(&self, state: &mut File, memory: &File) -> Result<u64, String> {
        if !self.paused.load(Ordering::SeqCst) {
            return Err("the VM is running: pause it first".into());
        }
        if !self.config.fs.is_empty() {
            return Err(SnapshotError::Unsupported(
                "it shares a host directory (virtio-fs state lives in virtiofsd)".into(),
            )
            .to_string());
        }
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let transports: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let vm = VmState::save(&self.vm_fd).map_err(|e| e.to_string())?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(*v.save(VCPU_TIMEOUT)?);
        }
        let snap = Snapshot {
            format: snapshot::FORMAT.into(),
            version: snapshot::VERSION,
            husk_version: env!("CARGO_PKG_VERSION").into(),
            config: self.config.clone(),
            cmdline: self.cmdline.clone(),
            mem_bytes: crate::vstate::memory::size(&self.mem),
            vm,
            vcpus,
            serial: serial.state(),
            devices: transports.iter().map(|t| t.save()).collect(),
        };
        let written = snapshot::write_memory(&self.mem, memory).map_err(|e| e.to_string())?;
        snap.write_to(state).map_err(|e| e.to_string())?;
        Ok(written)
    }
}
