//! 8250 UART on COM1: guest output goes to the console sink, host input is
//! queued into the receive FIFO with back-pressure.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::bus::BusDevice;

/// Raises the UART's interrupt line through a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side when the guest has drained the receive FIFO, so the
/// host stops reading its stdin while the FIFO is full instead of dropping
/// bytes or spinning.
pub struct SerialInputEvents {
    /// Written when the receive FIFO becomes empty.
    pub fifo_drained: EventFd,
}

impl SerialEvents for SerialInputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.fifo_drained.write(1);
    }
}

type Uart = Serial<EventFdTrigger, SerialInputEvents, Box<dyn Write + Send>>;

/// The UART's registers and receive FIFO, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// COM1 as a bus device.
pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and writes guest output to `out`.
    pub fn new(irq: EventFd, fifo_drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(EventFdTrigger(irq), SerialInputEvents { fifo_drained }, out),
        }
    }

    /// A UART in the snapshot's `state`; a pending interrupt is raised
    /// again. Errors: a receive FIFO larger than the UART's.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        fifo_drained: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &s,
            EventFdTrigger(irq),
            SerialInputEvents { fifo_drained },
            out,
        )
        .map_err(|e| format!("serial port: {e:?}"))?;
        Ok(Self { uart })
    }

    /// The UART's state.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::warn!("serial input: {e}");
                0
            }
        }
    }

    /// Writes guest console text to the sink, as a run of transmit
    /// register writes with the UART's interrupts off would: no interrupt,
    /// and a sink that fails loses the text, not the guest's time.
    pub fn write_text(&mut self, text: &[u8]) {
        let out = self.uart.writer_mut();
        if let Err(e) = out.write_all(text).and_then(|()| out.flush()) {
            tracing::debug!("serial output: {e}");
        }
    }

    /// Flushes the console sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            // A console sink that fails (closed pipe, full disk) loses the
            // byte; the guest must not notice.
            if let Err(e) = self.uart.write(off, data[0]) {
                tracing::debug!("serial output: {e}");
            }
        }
    }
}

/// A console sink that keeps what it is given (tests of COM1's users).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct TestSink(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for TestSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (SerialDevice, TestSink, EventFd, EventFd) {
        let sink = TestSink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = SerialDevice::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(sink.clone()),
        );
        (d, sink, irq, drained)
    }

    #[test]
    fn output_reaches_the_sink() {
        let (mut d, sink, _, _) = dev();
        for b in b"hi\n" {
            d.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Wide accesses are ignored, not fatal.
        d.write(0, &[1, 2]);
        let mut w = [0u8; 2];
        d.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trips_with_pending_input_and_interrupt() {
        let (mut d, _, _, _) = dev();
        d.write(1, &[0x01]); // IER: received-data interrupt on
        d.write(7, &[0x5a]); // scratch
        assert_eq!(d.enqueue(b"ab"), 2);
        let state = d.state();
        assert_eq!(state.in_buffer, b"ab");
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialDevice::from_state(
            &back,
            irq.try_clone().unwrap(),
            drained,
            Box::new(TestSink::default()),
        )
        .unwrap();
        // The pending byte raises the line again and reads back in order.
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8; 1];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        r.read(0, &mut b);
        assert_eq!(b[0], b'b');
        // A FIFO larger than the UART's is refused.
        let mut big = back.clone();
        big.in_buffer = vec![0; 4096];
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(
            SerialDevice::from_state(&big, irq2, drained2, Box::new(TestSink::default())).is_err()
        );
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_signals_when_drained() {
        let (mut d, _, irq, drained) = dev();
        d.write(1, &[0x01]); // IER: received-data interrupt on
        let big = vec![b'x'; 100];
        let n = d.enqueue(&big);
        assert!(n > 0 && n < 100);
        assert_eq!(d.enqueue(&big), 0);
        assert!(irq.read().is_ok());
        let mut b = [0u8; 1];
        for _ in 0..n {
            d.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(d.fifo_capacity(), n);
    }
}
