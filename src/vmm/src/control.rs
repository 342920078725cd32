//! What the control socket asks of a running VM: pause and resume with
//! the vCPUs' acknowledgement, a snapshot of the paused VM, stop. Runs on
//! the event-loop thread (see `api`), so no device works meanwhile.

use std::fs::File;
use std::sync::atomic::Ordering;

use crate::api::{self, Request, Response, VCPU_TIMEOUT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::builder::Vm;
use crate::config::FsConfig;
use crate::devices::virtio::device_type;
use crate::devices::virtio::mmio::TransportState;
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
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let transports: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let devices: Vec<_> = transports.iter().map(|t| t.save()).collect();
        check_shares_unused(&self.mem, &self.config.fs, &devices)?;
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
            devices,
        };
        let written = snapshot::write_memory(&self.mem, memory).map_err(|e| e.to_string())?;
        snap.write_to(state).map_err(|e| e.to_string())?;
        Ok(written)
    }
}

/// A share can be snapshotted only while the guest has never used it:
/// its FUSE session (open files, inode numbers) lives in virtiofsd, which
/// a snapshot does not hold. Unused (no request ever made available, as
/// in a template before any mount), a new virtiofsd can take the device
/// over at restore. `devices` are every transport's state, in slot order.
pub(crate) fn check_shares_unused(
    mem: &GuestMemoryMmap,
    shares: &[FsConfig],
    devices: &[TransportState],
) -> Result<(), String> {
    let fs = devices.iter().filter(|d| d.device_type == device_type::FS);
    for (share, d) in shares.iter().zip(fs) {
        for q in d.queues.iter().filter(|q| q.ready) {
            // avail.idx: how many requests the driver ever made available.
            let idx: u16 = mem
                .read_obj(GuestAddress(q.avail.wrapping_add(2)))
                .map_err(|e| format!("share {}: its ring: {e}", share.tag))?;
            if u16::from_le(idx) != 0 {
                return Err(SnapshotError::Unsupported(format!(
                    "the guest has used share {} (its FUSE session lives in virtiofsd)",
                    share.tag
                ))
                .to_string());
            }
        }
    }
    Ok(())
}
