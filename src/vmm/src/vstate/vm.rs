//! The KVM VM: memory slots, in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// Creates the VM with its memory, TSS, irqchip and PIT.
pub fn create(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::Create)?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VmError::Ioctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| {
                VmError::Ioctl("guest memory lookup", kvm_ioctls::Error::new(libc::EFAULT))
            })?;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the caller
        // keeps alive for as long as the VM (it is dropped after the vCPUs).
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    vm.create_irq_chip()
        .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
    Ok(vm)
}

/// An eventfd wired to guest interrupt line `gsi`.
pub fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmError> {
    let evt = crate::sys::eventfd().map_err(|e| {
        VmError::Ioctl(
            "eventfd",
            kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
        )
    })?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
    Ok(evt)
}

/// The VM-wide state KVM keeps: the in-kernel PICs, IOAPIC and PIT, and
/// the kvm-clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The 8259 master, slave and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The 8254 timer.
    pub pit: kvm_pit_state2,
    /// The kvm-clock, with the host's real time when KVM reports it.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| VmError::Ioctl("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| VmError::Ioctl("KVM_GET_PIT2", e))?;
        let mut clock = vm
            .get_clock()
            .map_err(|e| VmError::Ioctl("KVM_GET_CLOCK", e))?;
        // Only KVM_CLOCK_REALTIME means something to KVM_SET_CLOCK: with it,
        // the restored clock moves on by the real time spent in between.
        clock.flags &= KVM_CLOCK_REALTIME;
        Ok(Self {
            irqchips,
            pit,
            clock,
        })
    }

    /// Writes the state into a new VM (irqchip and PIT created, vCPUs
    /// restored). With `step_clock` the kvm-clock moves on by the real time
    /// since the snapshot (when KVM reported it); without, it goes on from
    /// the value it had, as if the VM had been paused.
    pub fn restore(&self, vm: &VmFd, step_clock: bool) -> Result<(), VmError> {
        vm.set_pit2(&self.pit)
            .map_err(|e| VmError::Ioctl("KVM_SET_PIT2", e))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|e| VmError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        let mut clock = self.clock;
        if !step_clock {
            clock.flags = 0;
        }
        vm.set_clock(&clock)
            .map_err(|e| VmError::Ioctl("KVM_SET_CLOCK", e))
    }

    /// Whether the three chips are there, in order.
    pub fn well_formed(&self) -> bool {
        self.irqchips.len() == IRQCHIPS.len()
            && self
                .irqchips
                .iter()
                .zip(IRQCHIPS)
                .all(|(c, id)| c.chip_id == id)
    }
}
