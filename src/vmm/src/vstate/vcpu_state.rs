//! One vCPU's architectural state, read from KVM and written back: what a
//! snapshot holds for each vCPU. The order of the writes follows what KVM
//! needs (CPUID before anything that depends on it, the LAPIC before the
//! MSRs that point into it, pending events last).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Most MSRs one KVM_GET/SET_MSRS call takes (KVM_MAX_MSR_ENTRIES).
const MSR_CHUNK: usize = 256;

/// Errors reading or writing vCPU state. `what` names the ioctl.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// KVM did not take an MSR the snapshot holds.
    #[error("KVM refused MSR {0:#x} from the snapshot")]
    Msr(u32),
    /// A list does not fit KVM's bounds.
    #[error("{0}: too many entries")]
    TooMany(&'static str),
}

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// Everything KVM keeps about one vCPU that a guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was created with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM would read back (from KVM_GET_MSR_INDEX_LIST).
    pub msrs: Vec<MsrValue>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The in-kernel local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |e| VcpuStateError::Ioctl(what, e)
}

/// Reads the MSRs in `indices` that KVM can read; an index KVM refuses is
/// skipped (KVM_GET_MSRS stops at the first one it cannot read).
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR list"))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        // The n-th could not be read: skip it and go on after it.
        let advance = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[advance..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with no I/O left
    /// half done (see `Vcpu::settle`). `cpuid` is what it was created with.
    pub fn save(fd: &VcpuFd, cpuid: &CpuId, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        // The MP state first: reading it also makes KVM process pending
        // LAPIC events (INIT/SIPI) into the state read below.
        let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// The CPUID to create the vCPU with.
    pub fn cpuid(&self) -> Result<CpuId, VcpuStateError> {
        CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany("CPUID"))
    }

    /// Writes the state into a freshly created vCPU whose CPUID is already set.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: `xsave` is a whole kvm_xsave read by KVM_GET_XSAVE, the
        // legacy fixed-size layout this ioctl expects (no trailing FAM).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.data,
                    ..Default::default()
                })
                .collect();
            let msrs =
                Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR list"))?;
            let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if n < chunk.len() {
                return Err(VcpuStateError::Msr(chunk[n].index));
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
