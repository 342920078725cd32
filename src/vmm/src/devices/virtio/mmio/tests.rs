//! Register semantics, status transitions and feature negotiation of the
//! MMIO transport, against a dummy device.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::device::ActivateError;
use crate::devices::virtio::features::VIRTIO_RING_F_INDIRECT_DESC;
use crate::devices::virtio::{InterruptKind, IrqfdInterrupt};

const MEM_SIZE: usize = 0x10_0000;
const DUMMY_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC)
    | 1;

/// (queue count, acked features, (size, event_idx) per queue).
type Activation = (usize, u64, Vec<(u16, bool)>);

#[derive(Default)]
struct Record {
    activations: Vec<Activation>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct Dummy {
    evts: Vec<EventFd>,
    sizes: Vec<u16>,
    active: bool,
    fail_activation: bool,
    rec: Arc<Mutex<Record>>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        DUMMY_FEATURES
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&[0xa0, 0xa1, 0xa2, 0xa3], offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::QueueCount {
                expected: 9,
                got: ctx.queues.len(),
            });
        }
        self.active = true;
        self.rec.lock().unwrap().activations.push((
            ctx.queues.len(),
            ctx.acked_features,
            ctx.queues
                .iter()
                .map(|q| (q.size(), q.event_idx_enabled()))
                .collect(),
        ));
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active
    }
    fn reset(&mut self) {
        self.active = false;
        self.rec.lock().unwrap().resets += 1;
    }
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
}

struct Fixture {
    t: MmioTransport,
    rec: Arc<Mutex<Record>>,
    irq: Arc<IrqfdInterrupt>,
    irq_evt: EventFd,
}

fn fixture_with(fail_activation: bool) -> Fixture {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let rec = Arc::new(Mutex::new(Record::default()));
    let dummy = Dummy {
        evts: vec![
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ],
        sizes: vec![256, 16],
        active: false,
        fail_activation,
        rec: rec.clone(),
    };
    let irq_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(IrqfdInterrupt::new(irq_evt.try_clone().unwrap()));
    let t = MmioTransport::new(Arc::new(Mutex::new(dummy)), mem, irq.clone()).unwrap();
    Fixture {
        t,
        rec,
        irq,
        irq_evt,
    }
}

fn fixture() -> Fixture {
    fixture_with(false)
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
    wr(t, regs::STATUS, status::ACKNOWLEDGE);
    wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, regs::DRIVER_FEATURES_SEL, 0);
    wr(t, regs::DRIVER_FEATURES, features as u32);
    wr(t, regs::DRIVER_FEATURES_SEL, 1);
    wr(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    rd(t, regs::STATUS) & status::FEATURES_OK != 0
}

/// Queue `index` of `size` with its rings at `base` (desc, avail, used).
fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    wr(t, regs::QUEUE_SEL, index);
    wr(t, regs::QUEUE_NUM, size);
    wr(t, regs::QUEUE_DESC_LOW, base as u32);
    wr(t, regs::QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, regs::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    wr(t, regs::QUEUE_AVAIL_HIGH, 0);
    wr(t, regs::QUEUE_USED_LOW, (base + 0x2000) as u32);
    wr(t, regs::QUEUE_USED_HIGH, 0);
    wr(t, regs::QUEUE_READY, 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn bring_up(t: &mut MmioTransport) {
    assert!(negotiate(t, DUMMY_FEATURES));
    setup_queue(t, 0, 256, 0x1_0000);
    setup_queue(t, 1, 16, 0x2_0000);
    wr(t, regs::STATUS, ALL_OK);
}

#[test]
fn identification_registers() {
    let mut f = fixture();
    assert_eq!(rd(&mut f.t, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut f.t, regs::VERSION), 2);
    assert_eq!(rd(&mut f.t, regs::DEVICE_ID), 42);
    assert_eq!(rd(&mut f.t, regs::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut f.t, regs::SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut f.t, 0x0f0), 0, "unknown registers read 0");
}

#[test]
fn registers_need_aligned_32_bit_accesses() {
    let mut f = fixture();
    let mut d = [0xffu8; 2];
    f.t.read(regs::MAGIC_VALUE, &mut d);
    assert_eq!(d, [0, 0]);
    let mut d = [0xffu8; 4];
    f.t.read(regs::MAGIC_VALUE + 1, &mut d);
    assert_eq!(d, [0; 4]);
    let mut d = [0xffu8; 8];
    f.t.read(regs::MAGIC_VALUE, &mut d);
    assert_eq!(d, [0; 8]);
    f.t.write(regs::STATUS, &[1]);
    assert_eq!(rd(&mut f.t, regs::STATUS), 0);
    f.t.write(regs::STATUS + 2, &1u32.to_le_bytes());
    assert_eq!(rd(&mut f.t, regs::STATUS), 0);
}

#[test]
fn device_features_are_paged_by_the_selector() {
    let mut f = fixture();
    wr(&mut f.t, regs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut f.t, regs::DEVICE_FEATURES), DUMMY_FEATURES as u32);
    wr(&mut f.t, regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        rd(&mut f.t, regs::DEVICE_FEATURES),
        1,
        "VERSION_1 is bit 32"
    );
    wr(&mut f.t, regs::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut f.t, regs::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_requires_version_1() {
    let mut f = fixture();
    assert!(!negotiate(&mut f.t, 1));
    assert_eq!(
        rd(&mut f.t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    wr(&mut f.t, regs::STATUS, 0);
    assert!(negotiate(&mut f.t, feature(VIRTIO_F_VERSION_1)));
}

#[test]
fn features_ok_refuses_features_not_offered() {
    let mut f = fixture();
    assert!(!negotiate(
        &mut f.t,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_F_VERSION_1 + 1)
    ));
    wr(&mut f.t, regs::STATUS, 0);
    // Bits beyond 64 (selector 2) are never offered either.
    wr(&mut f.t, regs::STATUS, status::ACKNOWLEDGE);
    wr(&mut f.t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut f.t, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut f.t, regs::DRIVER_FEATURES, 1);
    wr(&mut f.t, regs::DRIVER_FEATURES_SEL, 2);
    wr(&mut f.t, regs::DRIVER_FEATURES, 1);
    wr(
        &mut f.t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut f.t, regs::STATUS) & status::FEATURES_OK, 0);
}

#[test]
fn driver_features_are_frozen_after_features_ok() {
    let mut f = fixture();
    assert!(negotiate(&mut f.t, feature(VIRTIO_F_VERSION_1)));
    wr(&mut f.t, regs::DRIVER_FEATURES_SEL, 0);
    wr(
        &mut f.t,
        regs::DRIVER_FEATURES,
        1 << VIRTIO_RING_F_EVENT_IDX,
    );
    setup_queue(&mut f.t, 0, 256, 0x1_0000);
    setup_queue(&mut f.t, 1, 16, 0x2_0000);
    wr(&mut f.t, regs::STATUS, ALL_OK);
    let rec = f.rec.lock().unwrap();
    assert_eq!(rec.activations.len(), 1);
    assert_eq!(rec.activations[0].1, feature(VIRTIO_F_VERSION_1));
    assert_eq!(rec.activations[0].2, vec![(256, false), (16, false)]);
}

#[test]
fn status_bits_must_come_in_order_and_never_clear() {
    let mut f = fixture();
    // DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER: refused.
    wr(&mut f.t, regs::STATUS, status::DRIVER);
    assert_eq!(rd(&mut f.t, regs::STATUS), 0);
    wr(
        &mut f.t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut f.t, regs::STATUS), status::ACKNOWLEDGE);
    // DRIVER_OK without FEATURES_OK: refused, nothing activated.
    wr(&mut f.t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(
        &mut f.t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        rd(&mut f.t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    assert!(f.rec.lock().unwrap().activations.is_empty());
    // Clearing a bit is ignored.
    wr(&mut f.t, regs::STATUS, status::DRIVER);
    assert_eq!(
        rd(&mut f.t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // The driver cannot set DEVICE_NEEDS_RESET; FAILED is always accepted.
    wr(
        &mut f.t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET | status::FAILED,
    );
    assert_eq!(
        rd(&mut f.t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
}

#[test]
fn queue_registers_are_only_writable_during_setup() {
    let mut f = fixture();
    // Before FEATURES_OK.
    setup_queue(&mut f.t, 0, 64, 0x1_0000);
    wr(&mut f.t, regs::QUEUE_SEL, 0);
    assert_eq!(rd(&mut f.t, regs::QUEUE_READY), 0);
    assert_eq!(rd(&mut f.t, regs::QUEUE_NUM_MAX), 256);
    wr(&mut f.t, regs::QUEUE_SEL, 1);
    assert_eq!(rd(&mut f.t, regs::QUEUE_NUM_MAX), 16);
    wr(&mut f.t, regs::QUEUE_SEL, 2);
    assert_eq!(rd(&mut f.t, regs::QUEUE_NUM_MAX), 0, "no queue 2");
    assert_eq!(rd(&mut f.t, regs::QUEUE_READY), 0);
    wr(&mut f.t, regs::QUEUE_READY, 1); // no such queue: ignored
    bring_up(&mut f.t);
    // After DRIVER_OK.
    wr(&mut f.t, regs::QUEUE_SEL, 0);
    wr(&mut f.t, regs::QUEUE_READY, 0);
    assert_eq!(rd(&mut f.t, regs::QUEUE_READY), 1);
    let rec = f.rec.lock().unwrap();
    assert_eq!(rec.activations.len(), 1);
    assert_eq!(rec.activations[0].0, 2);
    assert_eq!(rec.activations[0].2, vec![(256, true), (16, true)]);
}

#[test]
fn a_ready_queue_keeps_its_addresses() {
    let mut f = fixture();
    assert!(negotiate(&mut f.t, DUMMY_FEATURES));
    setup_queue(&mut f.t, 0, 128, 0x1_0000);
    // Ready: these writes are ignored.
    wr(&mut f.t, regs::QUEUE_NUM, 3);
    wr(&mut f.t, regs::QUEUE_DESC_LOW, 0xdead_0000);
    setup_queue(&mut f.t, 1, 16, 0x2_0000);
    wr(&mut f.t, regs::STATUS, ALL_OK);
    assert_eq!(rd(&mut f.t, regs::STATUS), ALL_OK);
    assert_eq!(f.rec.lock().unwrap().activations[0].2[0], (128, true));
}

fn assert_needs_reset(f: &mut Fixture) {
    assert_eq!(
        rd(&mut f.t, regs::STATUS),
        ALL_OK | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(rd(&mut f.t, regs::INTERRUPT_STATUS), 2, "config interrupt");
    assert_eq!(f.irq_evt.read().unwrap(), 1);
    assert!(f.rec.lock().unwrap().activations.is_empty());
}

#[test]
fn bad_queue_size_puts_the_device_in_needs_reset() {
    for size in [0u32, 3, 512, 0x1_0000] {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, DUMMY_FEATURES));
        setup_queue(&mut f.t, 0, size, 0x1_0000);
        setup_queue(&mut f.t, 1, 16, 0x2_0000);
        wr(&mut f.t, regs::STATUS, ALL_OK);
        assert_needs_reset(&mut f);
    }
}

#[test]
fn rings_outside_memory_or_misaligned_put_the_device_in_needs_reset() {
    for base in [MEM_SIZE as u64 - 0x1000, 0xffff_ffff_ffff_0000, 0x1_0008] {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, DUMMY_FEATURES));
        setup_queue(&mut f.t, 0, 256, base);
        setup_queue(&mut f.t, 1, 16, 0x2_0000);
        wr(&mut f.t, regs::STATUS, ALL_OK);
        assert_needs_reset(&mut f);
    }
}

#[test]
fn a_queue_left_unready_puts_the_device_in_needs_reset() {
    let mut f = fixture();
    assert!(negotiate(&mut f.t, DUMMY_FEATURES));
    setup_queue(&mut f.t, 0, 256, 0x1_0000);
    wr(&mut f.t, regs::STATUS, ALL_OK);
    assert_needs_reset(&mut f);
}

#[test]
fn failed_activation_puts_the_device_in_needs_reset() {
    let mut f = fixture_with(true);
    bring_up(&mut f.t);
    assert_needs_reset(&mut f);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    f.irq.trigger(InterruptKind::UsedBuffer).unwrap();
    f.irq.trigger(InterruptKind::ConfigChange).unwrap();
    assert_eq!(rd(&mut f.t, regs::INTERRUPT_STATUS), 3);
    wr(&mut f.t, regs::INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut f.t, regs::INTERRUPT_STATUS), 2);
    wr(&mut f.t, regs::INTERRUPT_ACK, 2);
    assert_eq!(rd(&mut f.t, regs::INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_only_existing_queues_of_a_running_device() {
    let mut f = fixture();
    let evts: Vec<EventFd> =
        f.t.queue_events()
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
    wr(&mut f.t, regs::QUEUE_NOTIFY, 0);
    assert!(evts[0].read().is_err(), "not running yet");
    bring_up(&mut f.t);
    wr(&mut f.t, regs::QUEUE_NOTIFY, 1);
    wr(&mut f.t, regs::QUEUE_NOTIFY, 7);
    wr(&mut f.t, regs::QUEUE_NOTIFY, u32::MAX);
    assert!(evts[0].read().is_err());
    assert_eq!(evts[1].read().unwrap(), 1);
}

#[test]
fn reset_tears_everything_down() {
    let mut f = fixture();
    bring_up(&mut f.t);
    f.irq.trigger(InterruptKind::UsedBuffer).unwrap();
    wr(&mut f.t, regs::QUEUE_SEL, 1);
    wr(&mut f.t, regs::STATUS, 0);
    assert_eq!(rd(&mut f.t, regs::STATUS), 0);
    assert_eq!(rd(&mut f.t, regs::INTERRUPT_STATUS), 0);
    assert_eq!(rd(&mut f.t, regs::QUEUE_READY), 0, "queue 0 selected again");
    wr(&mut f.t, regs::QUEUE_SEL, 1);
    assert_eq!(rd(&mut f.t, regs::QUEUE_READY), 0);
    assert_eq!(f.rec.lock().unwrap().resets, 1);
    // And the device comes up again.
    bring_up(&mut f.t);
    assert_eq!(rd(&mut f.t, regs::STATUS), ALL_OK);
    assert_eq!(f.rec.lock().unwrap().activations.len(), 2);
}

#[test]
fn reset_clears_needs_reset() {
    let mut f = fixture_with(true);
    bring_up(&mut f.t);
    assert_ne!(rd(&mut f.t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    wr(&mut f.t, regs::STATUS, 0);
    assert_eq!(rd(&mut f.t, regs::STATUS), 0);
}

#[test]
fn config_space_goes_to_the_device() {
    let mut f = fixture();
    let mut d = [0u8; 2];
    f.t.read(regs::CONFIG + 1, &mut d);
    assert_eq!(d, [0xa1, 0xa2]);
    let mut d = [0xffu8; 4];
    f.t.read(regs::CONFIG + 0x200, &mut d);
    assert_eq!(d, [0; 4]);
    f.t.write(regs::CONFIG + 3, &[7]);
    assert_eq!(f.rec.lock().unwrap().config_writes, vec![(3, vec![7])]);
    assert_eq!(rd(&mut f.t, regs::CONFIG_GENERATION), 0);
}
