//! i8042 controller: only the CPU reset line (0xfe to port 0x64) matters;
//! it ends the VM cleanly, as a reboot.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::exit::VmExit;
use crate::vstate::bus::BusDevice;
use crate::vstate::vcpu::ExitLatch;

/// Records a guest reset in the VM's exit latch.
pub struct ResetTrigger(pub Arc<ExitLatch>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.stop(VmExit::GuestReset);
        Ok(())
    }
}

/// The i8042 on ports 0x60..=0x64.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller whose reset line stops the VM through `latch`.
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(latch)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            let Ok(()) = self.dev.write(off, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm_as_a_reset() {
        let latch = Arc::new(ExitLatch::new().unwrap());
        let mut d = I8042::new(latch.clone());
        d.write(0, &[0xfe]); // data port: not a reset
        assert!(latch.reason().is_none());
        let mut s = [0u8; 1];
        d.read(4, &mut s); // status: input buffer empty, so kb_wait() passes
        assert_eq!(s[0] & 0x2, 0);
        d.write(4, &[0xfe]);
        assert_eq!(latch.reason(), Some(VmExit::GuestReset));
    }
}
