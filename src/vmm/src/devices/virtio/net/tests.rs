//! virtio-net: RX/TX frame handling, back-pressure and hostile chains,
//! with virtio-queue's mock driver and a socketpair standing in for the tap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{VnetHdr, VNET_HDR_LEN};
use super::*;
use crate::devices::virtio::device::{ActivateContext, DeviceFailure, VirtioDevice};
use crate::devices::virtio::{GuestMem, IrqfdInterrupt, VirtioInterrupt};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM_SIZE: usize = 0x100_0000;
const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const BUF: u64 = 0x10_0000;
const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x42]);

struct Rig {
    mem: GuestMem,
    dev: Net,
    peer: OwnedFd,
    irq_evt: EventFd,
    failed: Arc<AtomicBool>,
}

fn rig() -> Rig {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two new fds into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both fds are new and owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Rig {
        mem: GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: Net::new(Tap::from_fd(a, "test0"), MAC).unwrap(),
        peer: b,
        irq_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        failed: Arc::new(AtomicBool::new(false)),
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A frame of `len` bytes after the header: dst, src, ethertype, payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn packet(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut p = hdr.bytes().to_vec();
    p.extend_from_slice(frame);
    p
}

impl Rig {
    fn activate(&mut self, rx: &MockSplitQueue<'_, GuestMem>, tx: &MockSplitQueue<'_, GuestMem>) {
        let irq: Arc<dyn VirtioInterrupt> =
            Arc::new(IrqfdInterrupt::new(self.irq_evt.try_clone().unwrap()));
        let rxq: Queue = rx.create_queue().unwrap();
        let txq: Queue = tx.create_queue().unwrap();
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues: vec![rxq, txq],
                interrupt: irq.clone(),
                acked_features: self.dev.avail_features(),
                failure: DeviceFailure::new(self.failed.clone(), irq),
            })
            .unwrap();
    }

    fn peer_send(&self, pkt: &[u8]) {
        // SAFETY: write(2) reads `pkt.len()` bytes from `pkt`.
        let n = unsafe { libc::write(self.peer.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        assert_eq!(n, pkt.len() as isize);
    }

    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }
}

fn used(m: &MockSplitQueue<'_, GuestMem>, i: usize) -> (u32, u32) {
    let e = m.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn config_space_holds_the_mac_and_no_offload_is_offered() {
    let r = rig();
    let mut d = [0u8; 8];
    r.dev.read_config(0, &mut d);
    assert_eq!(d, [2, 0, 0, 0, 0, 0x42, 0, 0]);
    let f = r.dev.avail_features();
    assert_ne!(f & (1 << 32), 0);
    assert_ne!(f & (1 << features::VIRTIO_NET_F_MAC), 0);
    // CSUM, GUEST_CSUM, TSO/UFO, MRG_RXBUF, CTRL_VQ: none.
    for bit in [0, 1, 7, 8, 10, 11, 12, 14, 15, 17] {
        assert_eq!(f & (1 << bit), 0, "bit {bit}");
    }
}

#[test]
fn tx_sends_the_frame_with_a_clean_header() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    let f = frame(100, 1);
    let pkt = packet(
        VnetHdr {
            csum_start: 77,
            ..Default::default()
        },
        &f,
    );
    // Header and frame in separate buffers.
    mem.write_slice(&pkt[..VNET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    mem.write_slice(&pkt[VNET_HDR_LEN..], GuestAddress(BUF + 0x1000))
        .unwrap();
    tx.add_desc_chains(
        &[
            desc(BUF, VNET_HDR_LEN as u32, NEXT, 1),
            desc(BUF + 0x1000, f.len() as u32, 0, 0),
        ],
        0,
    )
    .unwrap();
    r.activate(&rx, &tx);
    r.dev.process_tx();
    let got = r.peer_recv().unwrap();
    assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(tx.used().idx().load(), 1);
    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(r.irq_evt.read().unwrap(), 1);
    assert_eq!(r.dev.counters().tx_frames, 1);
}

#[test]
fn hostile_tx_chains_drop_only_their_frame() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    let good = packet(VnetHdr::default(), &frame(60, 2));
    mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let csum = packet(
        VnetHdr {
            flags: 1,
            ..Default::default()
        },
        &frame(60, 3),
    );
    mem.write_slice(&csum, GuestAddress(BUF + 0x1000)).unwrap();
    let n = good.len() as u32;
    let chains: Vec<Vec<RawDescriptor>> = vec![
        // Device-writable buffer in a TX chain.
        vec![desc(BUF, n, WRITE, 0)],
        // Offload asked for without negotiation.
        vec![desc(BUF + 0x1000, csum.len() as u32, 0, 0)],
        // Too short to hold a header and an Ethernet header.
        vec![desc(BUF, 20, 0, 0)],
        // Outside guest memory.
        vec![desc(MEM_SIZE as u64 - 10, n, 0, 0)],
        // Loops on itself.
        vec![desc(BUF, n, NEXT, 0)],
        // Absurdly long: 70000 bytes in two buffers.
        vec![desc(BUF, 35_000, NEXT, 1), desc(BUF, 35_000, 0, 0)],
        // Finally a good one.
        vec![desc(BUF, n, 0, 0)],
    ];
    let mut next = 0u16;
    for c in &chains {
        // Rebase `next` fields onto this chain's slot in the table.
        let rebased: Vec<RawDescriptor> = c
            .iter()
            .map(|d| {
                let s = SplitDescriptor::from(*d);
                let nx = if s.flags() & NEXT != 0 {
                    s.next() + next
                } else {
                    0
                };
                desc(s.addr().0, s.len(), s.flags(), nx)
            })
            .collect();
        tx.add_desc_chains(&rebased, next).unwrap();
        next += c.len() as u16;
    }
    r.activate(&rx, &tx);
    r.dev.process_tx();
    assert_eq!(tx.used().idx().load(), chains.len() as u16);
    assert_eq!(r.dev.counters().tx_dropped, chains.len() as u64 - 1);
    assert_eq!(r.dev.counters().tx_frames, 1);
    let got = r.peer_recv().unwrap();
    assert_eq!(got, good);
    assert!(r.peer_recv().is_none());
    assert!(!r.failed.load(Ordering::SeqCst));
}

#[test]
fn rx_delivers_a_frame_with_one_buffer_in_the_header() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    rx.add_desc_chains(&[desc(BUF, 1526, WRITE, 0)], 0).unwrap();
    r.activate(&rx, &tx);
    let f = frame(1514, 4);
    r.peer_send(&packet(
        VnetHdr {
            flags: 2, // DATA_VALID: not negotiated, cleared
            ..Default::default()
        },
        &f,
    ));
    r.dev.process_rx();
    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(used(&rx, 0), (0, 1526));
    let mut got = vec![0u8; 1526];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    let hdr = VnetHdr::read(got[..VNET_HDR_LEN].try_into().unwrap());
    assert_eq!(
        hdr,
        VnetHdr {
            num_buffers: 1,
            ..Default::default()
        }
    );
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(r.irq_evt.read().unwrap(), 1);
}

#[test]
fn rx_without_buffers_holds_the_frame_and_stops_reading() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    r.activate(&rx, &tx);
    let (f1, f2) = (frame(60, 5), frame(70, 6));
    r.peer_send(&packet(VnetHdr::default(), &f1));
    r.peer_send(&packet(VnetHdr::default(), &f2));
    r.dev.process_rx();
    assert!(r.dev.rx_stalled);
    // Only one packet was taken from the tap; the second is still queued there.
    let mut probe = [0u8; 1];
    // SAFETY: recv with MSG_PEEK into a one-byte buffer.
    let n = unsafe {
        libc::recv(
            r.dev.tap.as_raw_fd(),
            probe.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(n, 1, "second packet still queued on the tap");
    // The guest adds two buffers and kicks the RX queue.
    rx.add_desc_chains(
        &[
            desc(BUF, 2048, WRITE, 0),
            desc(BUF + 0x1000, 2048, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    r.dev.rx_buffers_added();
    r.dev.process_rx();
    assert!(!r.dev.rx_stalled);
    assert_eq!(rx.used().idx().load(), 2);
    let mut got = vec![0u8; f1.len()];
    mem.read_slice(&mut got, GuestAddress(BUF + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f1, "frames keep their order");
    let mut got = vec![0u8; f2.len()];
    mem.read_slice(&mut got, GuestAddress(BUF + 0x1000 + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f2);
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    rx.add_desc_chains(&[desc(BUF, 200, WRITE, 0)], 0).unwrap();
    r.activate(&rx, &tx);
    r.peer_send(&packet(VnetHdr::default(), &frame(1000, 7)));
    let small = frame(100, 8);
    r.peer_send(&packet(VnetHdr::default(), &small));
    r.dev.process_rx();
    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(used(&rx, 0).1, 112);
    assert_eq!(r.dev.counters().rx_dropped, 1);
    assert_eq!(r.dev.counters().rx_frames, 1);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    rx.add_desc_chains(
        &[
            desc(BUF, 2048, 0, 0),                       // device-readable
            desc(MEM_SIZE as u64 - 100, 2048, WRITE, 0), // outside memory
            desc(BUF, 2048, WRITE | NEXT, 2),            // loops on itself
        ],
        0,
    )
    .unwrap();
    rx.add_desc_chains(&[desc(BUF + 0x1000, 2048, WRITE, 0)], 3)
        .unwrap();
    r.activate(&rx, &tx);
    let f = frame(60, 9);
    r.peer_send(&packet(VnetHdr::default(), &f));
    r.dev.process_rx();
    assert_eq!(rx.used().idx().load(), 4);
    assert_eq!(used(&rx, 0), (0, 0));
    assert_eq!(used(&rx, 1), (1, 0));
    assert_eq!(used(&rx, 2), (2, 0));
    assert_eq!(used(&rx, 3), (3, 72));
    assert_eq!(r.dev.counters().rx_bad_chains, 3);
    assert!(!r.failed.load(Ordering::SeqCst));
}

#[test]
fn rx_offload_frames_from_the_tap_are_dropped() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    rx.add_desc_chains(&[desc(BUF, 2048, WRITE, 0)], 0).unwrap();
    r.activate(&rx, &tx);
    r.peer_send(&packet(
        VnetHdr {
            gso_type: 1,
            gso_size: 1448,
            ..Default::default()
        },
        &frame(60, 1),
    ));
    r.peer_send(&[0u8; 10]);
    r.dev.process_rx();
    assert_eq!(rx.used().idx().load(), 0);
    assert_eq!(r.dev.counters().rx_dropped, 2);
}

#[test]
fn a_broken_rx_ring_needs_reset() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    rx.avail().idx().store(QUEUE_SIZE + 5);
    r.activate(&rx, &tx);
    r.peer_send(&packet(VnetHdr::default(), &frame(60, 1)));
    r.dev.process_rx();
    assert!(r.failed.load(Ordering::SeqCst));
    assert!(!r.dev.running());
}

#[test]
fn reset_forgets_the_held_frame() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    r.activate(&rx, &tx);
    r.peer_send(&packet(VnetHdr::default(), &frame(60, 1)));
    r.dev.process_rx();
    assert!(r.dev.rx_stalled);
    r.dev.reset();
    assert!(!r.dev.is_activated());
    assert!(!r.dev.rx_stalled);
    r.dev.process_rx();
    r.dev.process_tx();
}

#[test]
fn the_event_loop_stops_polling_the_tap_while_the_guest_has_no_buffers() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QUEUE_SIZE);
    r.activate(&rx, &tx);
    for i in 0..3 {
        r.peer_send(&packet(VnetHdr::default(), &frame(60, i)));
    }
    let Rig { dev, peer, .. } = r;
    let net = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(net.clone());
    // Activation event, then whatever follows: must go quiet.
    let mut events = 0;
    for _ in 0..5 {
        events += em.run_with_timeout(10).unwrap();
    }
    assert!(events <= 3, "{events} events: the tap is being polled");
    assert_eq!(em.run_with_timeout(50).unwrap(), 0, "busy loop");
    assert!(net.lock().unwrap().rx_stalled);
    // Buffers arrive: all three frames go in, in order.
    rx.add_desc_chains(
        &[
            desc(BUF, 2048, WRITE, 0),
            desc(BUF + 0x1000, 2048, WRITE, 0),
            desc(BUF + 0x2000, 2048, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    net.lock().unwrap().queue_events()[RX_INDEX]
        .write(1)
        .unwrap();
    for _ in 0..5 {
        em.run_with_timeout(10).unwrap();
    }
    assert_eq!(rx.used().idx().load(), 3);
    assert_eq!(net.lock().unwrap().counters().rx_frames, 3);
    drop(peer);
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn mac_addresses_parse_and_print() {
    let m: MacAddr = "02:aB:00:00:00:01".parse().unwrap();
    assert_eq!(m.to_string(), "02:ab:00:00:00:01");
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "0g:00:00:00:00:01",
        "01:00:00:00:00:01",
        "00:00:00:00:00:00",
        "2:00:00:00:00:01",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
    let r = MacAddr::random();
    assert_eq!(r.0[0] & 3, 2, "locally administered unicast");
    assert_ne!(MacAddr::random(), r);
}
