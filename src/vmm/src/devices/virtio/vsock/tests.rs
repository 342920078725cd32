//! virtio-vsock: the host protocol, data both ways, credit and
//! back-pressure, teardown and hostile guests. The guest side is a small
//! driver over virtio-queue's mock rings; the device runs in a real
//! event-manager loop against real Unix sockets in a temporary directory.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::Header;
use super::*;
use crate::devices::virtio::device::{ActivateContext, DeviceFailure, VirtioDevice};
use crate::devices::virtio::{GuestMem, IrqfdInterrupt, VirtioInterrupt};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM_SIZE: usize = 0x200_0000;
const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const EVQ: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const EV_BUFS: u64 = 0x30_0000;
const TX_BUFS: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_1000;
const CID: u64 = 3;
/// RX buffers the test driver keeps posted, Linux 6.1 style: a 44-byte
/// header buffer and a 4 KiB payload buffer.
const RX_POSTED: usize = 32;
const RX_PAYLOAD: u32 = 4096;

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// One buffer of a chain the test driver adds.
enum Part<'a> {
    /// Device-readable, holding these bytes.
    Out(&'a [u8]),
    /// Device-writable, this long.
    In(u32),
    /// Exactly this descriptor (hostile chains); NEXT on the last one
    /// makes it point to itself.
    Raw(u64, u32, u16),
}

type ChainRecord = (Vec<u16>, Vec<(u64, u32)>);

/// The driver side of one queue, over virtio-queue's mock rings.
/// (`MockSplitQueue::create` is not used: it places the used ring over
/// the second half of the available ring, which breaks once more than
/// half the queue is in flight.)
struct Driver<'m> {
    ring: u64,
    desc: DescriptorTable<'m, GuestMem>,
    avail_ring: AvailRing<'m, GuestMem>,
    used_ring: UsedRing<'m, GuestMem>,
    mem: &'m GuestMem,
    buf_base: u64,
    stride: u64,
    free: VecDeque<u16>,
    /// Per chain in flight: its descriptor ids and (address, length)s.
    chains: HashMap<u16, ChainRecord>,
    avail: u16,
    used: u16,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMem, ring: u64, buf_base: u64, stride: u64) -> Self {
        let (avail, used) = Self::rings(ring);
        Self {
            ring,
            desc: DescriptorTable::new(mem, GuestAddress(ring), QUEUE_SIZE),
            avail_ring: AvailRing::new(mem, GuestAddress(avail), QUEUE_SIZE),
            used_ring: UsedRing::new(mem, GuestAddress(used), QUEUE_SIZE),
            mem,
            buf_base,
            stride,
            free: (0..QUEUE_SIZE).collect(),
            chains: HashMap::new(),
            avail: 0,
            used: 0,
        }
    }

    /// Available and used ring addresses after the descriptor table at `ring`.
    fn rings(ring: u64) -> (u64, u64) {
        let size = u64::from(QUEUE_SIZE);
        let avail = ring + 16 * size;
        (avail, (avail + 6 + 2 * size + 3) & !3)
    }

    fn queue(&self) -> Queue {
        let (avail, used) = Self::rings(self.ring);
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.ring))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        q
    }

    fn add(&mut self, parts: &[Part<'_>]) -> u16 {
        let ids: Vec<u16> = (0..parts.len())
            .map(|_| self.free.pop_front().expect("test ring full"))
            .collect();
        let mut layout = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let d = ids[i];
            let own = self.buf_base + u64::from(d) * self.stride;
            let (addr, len, mut flags) = match p {
                Part::Out(b) => {
                    self.mem.write_slice(b, GuestAddress(own)).unwrap();
                    (own, b.len() as u32, 0)
                }
                Part::In(n) => (own, *n, WRITE),
                Part::Raw(a, n, f) => (*a, *n, *f),
            };
            let last = i + 1 == parts.len();
            let next = if last {
                // A NEXT flag on the last Raw part: a loop onto itself.
                d
            } else {
                flags |= NEXT;
                ids[i + 1]
            };
            self.desc.store(d, desc(addr, len, flags, next)).unwrap();
            layout.push((addr, len));
        }
        let head = ids[0];
        let slot = usize::from(self.avail % QUEUE_SIZE);
        self.avail_ring.ring().ref_at(slot).unwrap().store(head);
        self.avail = self.avail.wrapping_add(1);
        self.avail_ring.idx().store(self.avail);
        self.chains.insert(head, (ids, layout));
        head
    }

    /// Used elements since the last call: (head, len, the first len bytes).
    fn take_used(&mut self) -> Vec<(u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while self.used != self.used_ring.idx().load() {
            let slot = usize::from(self.used % QUEUE_SIZE);
            let e = self.used_ring.ring().ref_at(slot).unwrap().load();
            self.used = self.used.wrapping_add(1);
            let head = e.id() as u16;
            let (ids, layout) = self.chains.remove(&head).expect("unknown used head");
            let mut data = Vec::new();
            let mut left = e.len() as usize;
            for (addr, len) in layout {
                let n = left.min(len as usize);
                if n == 0 {
                    break;
                }
                let mut b = vec![0u8; n];
                if self.mem.read_slice(&mut b, GuestAddress(addr)).is_ok() {
                    data.extend(b);
                }
                left -= n;
            }
            self.free.extend(ids);
            out.push((head, e.len(), data));
        }
        out
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A device in an event loop, a guest driver, and the socket directory.
struct Rig<'m> {
    dir: PathBuf,
    uds: PathBuf,
    mem: &'m GuestMem,
    dev: Arc<Mutex<Vsock>>,
    em: Em,
    rx: Driver<'m>,
    tx: Driver<'m>,
    ev: Driver<'m>,
    failed: Arc<AtomicBool>,
    _irq: EventFd,
    /// Packets the guest received, not yet looked at.
    inbox: VecDeque<(Header, Vec<u8>)>,
    /// Re-post each RX buffer once used (a well-behaved driver).
    refill: bool,
    /// Receive buffer as (header part, payload part); payload 0: one buffer.
    rx_shape: (u32, u32),
}

impl<'m> Rig<'m> {
    fn new(mem: &'m GuestMem, tag: &str) -> Self {
        let dir = tempdir(tag);
        let uds = dir.join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(CID as u32, &uds).unwrap()));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Rig {
            dir,
            uds,
            mem,
            dev,
            em,
            rx: Driver::new(mem, RXQ, RX_BUFS, RX_STRIDE),
            tx: Driver::new(mem, TXQ, TX_BUFS, TX_STRIDE),
            ev: Driver::new(mem, EVQ, EV_BUFS, 0x100),
            failed: Arc::new(AtomicBool::new(false)),
            _irq: irq,
            inbox: VecDeque::new(),
            refill: true,
            rx_shape: (HDR_LEN as u32, RX_PAYLOAD),
        }
    }

    /// A running device with RX and event buffers posted.
    fn started(mem: &'m GuestMem, tag: &str) -> Self {
        let mut r = Self::new(mem, tag);
        r.post_rx(RX_POSTED);
        r.activate();
        r
    }

    fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    fn activate(&mut self) {
        for _ in 0..4 {
            self.ev.add(&[Part::In(4)]);
        }
        let irq: Arc<dyn VirtioInterrupt> =
            Arc::new(IrqfdInterrupt::new(self._irq.try_clone().unwrap()));
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: vec![self.rx.queue(), self.tx.queue(), self.ev.queue()],
            interrupt: irq.clone(),
            acked_features: self.dev().avail_features(),
            failure: DeviceFailure::new(self.failed.clone(), irq),
        };
        self.dev().activate(ctx).unwrap();
        self.pump();
    }

    fn post_rx(&mut self, n: usize) {
        let (h, p) = self.rx_shape;
        for _ in 0..n {
            if p == 0 {
                self.rx.add(&[Part::In(h)]);
            } else {
                self.rx.add(&[Part::In(h), Part::In(p)]);
            }
        }
    }

    fn kick(&self, queue: usize) {
        self.dev().queue_events()[queue].write(1).unwrap();
    }

    /// Moves used RX buffers to the inbox (re-posting them); returns how many.
    fn collect_rx(&mut self) -> usize {
        let used = self.rx.take_used();
        let n = used.len();
        for (_, len, data) in used {
            if len == 0 {
                continue;
            }
            assert!(data.len() >= HDR_LEN, "short packet of {len} bytes");
            let h = Header::read(data[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                h.len as usize,
                data.len() - HDR_LEN,
                "len matches the used length"
            );
            self.inbox.push_back((h, data[HDR_LEN..].to_vec()));
        }
        self.tx.take_used();
        if n > 0 && self.refill {
            self.post_rx(n);
            self.kick(RX_INDEX);
        }
        n
    }

    /// Runs the event loop until nothing happens for a few milliseconds.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            let events = self.em.run_with_timeout(3).unwrap();
            let got = self.collect_rx();
            if events == 0 && got == 0 {
                return;
            }
        }
        panic!("the event loop never went quiet");
    }

    /// Events the loop dispatches in `ms` once it settled (busy-loop check).
    fn quiet_events(&mut self, ms: i32) -> usize {
        self.pump();
        self.em.run_with_timeout(ms).unwrap()
    }

    /// The guest transmits a packet: header and payload in two buffers.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let hdr = Header {
            len: payload.len() as u32,
            ..h
        }
        .bytes();
        if payload.is_empty() {
            self.tx.add(&[Part::Out(&hdr)]);
        } else {
            self.tx.add(&[Part::Out(&hdr), Part::Out(payload)]);
        }
        self.kick(TX_INDEX);
        self.pump();
    }

    /// The guest transmits a hand-made chain.
    fn send_parts(&mut self, parts: &[Part<'_>]) {
        self.tx.add(parts);
        self.kick(TX_INDEX);
        self.pump();
    }

    fn next(&mut self) -> Option<(Header, Vec<u8>)> {
        self.inbox.pop_front()
    }

    /// The next packet the guest got, which must be `op`.
    fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        let p = self
            .next()
            .unwrap_or_else(|| panic!("no packet, expected op {op}"));
        assert_eq!(p.0.op, op, "{:?}", p.0);
        assert_eq!((p.0.src_cid, p.0.dst_cid), (HOST_CID, CID));
        assert_eq!(p.0.type_, socket_type::STREAM);
        p
    }

    fn expect_none(&mut self) {
        assert!(self.inbox.is_empty(), "unexpected {:?}", self.inbox.front());
    }

    /// A host client asks for guest port `port`; returns its stream and
    /// the REQUEST the guest got.
    fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        let (req, _) = self.expect(op::REQUEST);
        assert_eq!(req.dst_port, port);
        (s, req)
    }

    /// A host-initiated connection the guest accepted: the stream (after
    /// its `OK` line) and the guest's view (guest port, host port).
    fn host_connection(&mut self, port: u32) -> (UnixStream, u32) {
        let (mut s, req) = self.host_connect(port);
        self.send(gh(op::RESPONSE, port, req.src_port), &[]);
        let line = read_line(&mut s);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }

    /// A guest-initiated connection from `guest_port` to host `port`,
    /// accepted on `listener`.
    fn guest_connection(&mut self, l: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send(gh(op::REQUEST, guest_port, port), &[]);
        let (h, _) = self.expect(op::RESPONSE);
        assert_eq!((h.src_port, h.dst_port), (port, guest_port));
        assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn listen(&self, port: u32) -> UnixListener {
        let p = format!("{}_{port}", self.uds.display());
        UnixListener::bind(p).unwrap()
    }

    fn assert_healthy(&self) {
        assert!(!self.failed.load(Ordering::SeqCst), "device needs reset");
    }
}

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A guest packet header from guest port `src` to host port `dst`.
fn gh(op: u16, src: u32, dst: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len: 0,
        type_: socket_type::STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_SIZE,
        fwd_cnt: 0,
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Whether the host side of `s` was closed (EOF, or reset).
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_holds_the_cid_and_three_queues() {
    let mem = mem();
    let r = Rig::new(&mem, "cfg");
    let d = r.dev();
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes(), &[64, 256, 256]);
    let mut b = [0xffu8; 8];
    d.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0xffu8; 4];
    d.read_config(4, &mut b);
    assert_eq!(b, [0; 4], "upper half of the CID");
    d.read_config(8, &mut b);
    assert_eq!(b, [0; 4], "past config space");
    let f = d.avail_features();
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
    // No device-specific bits: stream is implied, SEQPACKET not offered.
    assert_eq!(f & 0xff_ffff, 0);
    assert!(r.uds.exists());
}

#[test]
fn host_client_connects_and_data_flows_both_ways() {
    let mem = mem();
    let mut r = Rig::started(&mem, "host");
    let (mut s, req) = r.host_connect(1024);
    assert!(req.src_port >= FIRST_HOST_PORT);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    // No OK before the guest accepts.
    s.set_nonblocking(true).unwrap();
    assert_eq!(
        s.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    s.set_nonblocking(false).unwrap();
    let hp = req.src_port;
    r.send(gh(op::RESPONSE, 1024, hp), &[]);
    assert_eq!(read_line(&mut s), format!("OK {hp}\n"));
    s.write_all(b"ping").unwrap();
    r.pump();
    let (h, data) = r.expect(op::RW);
    assert_eq!((h.src_port, h.dst_port), (hp, 1024));
    assert_eq!(data, b"ping");
    r.send(gh(op::RW, 1024, hp), b"pong");
    assert_eq!(read_n(&mut s, 4), b"pong");
    r.expect_none();
    assert_eq!(r.dev().connection_count(), 1);
    r.assert_healthy();
}

#[test]
fn data_a_host_client_sends_early_waits_for_the_guest() {
    let mem = mem();
    let mut r = Rig::started(&mem, "early");
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 7\nearly bytes").unwrap();
    r.pump();
    let (req, _) = r.expect(op::REQUEST);
    r.expect_none();
    r.send(gh(op::RESPONSE, 7, req.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    let (_, data) = r.expect(op::RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn a_guest_refusal_closes_the_host_client() {
    let mem = mem();
    let mut r = Rig::started(&mem, "refuse");
    let (mut s, req) = r.host_connect(99);
    r.send(gh(op::RST, 99, req.src_port), &[]);
    assert!(closed(&mut s));
    r.expect_none();
    assert_eq!(r.dev().connection_count(), 0);
    assert_eq!(r.dev().muxer.graveyard_len(), 0);
}

#[test]
fn bad_or_early_connect_lines_close_the_client() {
    let mem = mem();
    let mut r = Rig::new(&mem, "badline");
    // Before the driver runs: turned away.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    r.pump();
    assert!(closed(&mut s));
    r.post_rx(RX_POSTED);
    r.activate();
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'9'; 40],
    ] {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.write_all(line).unwrap();
        r.pump();
        assert!(closed(&mut s), "{:?}", String::from_utf8_lossy(line));
    }
    // A client that disconnects mid-line.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    r.pump();
    assert_eq!(r.dev().muxer.handshake_count(), 1);
    drop(s);
    r.pump();
    assert_eq!(r.dev().muxer.handshake_count(), 0);
    r.expect_none();
    assert_eq!(r.dev().connection_count(), 0);
}

#[test]
fn a_line_split_over_several_writes_is_accepted() {
    let mem = mem();
    let mut r = Rig::started(&mem, "split");
    let mut s = UnixStream::connect(&r.uds).unwrap();
    for part in [&b"CONN"[..], b"ECT 12", b"34\n"] {
        s.write_all(part).unwrap();
        r.pump();
    }
    let (req, _) = r.expect(op::REQUEST);
    assert_eq!(req.dst_port, 1234);
}

#[test]
fn silent_clients_and_unanswered_requests_time_out() {
    let mem = mem();
    let mut r = Rig::started(&mem, "timeout");
    r.dev().muxer.set_timeouts(
        Duration::from_millis(100),
        Duration::from_millis(150),
        CLOSE_TIMEOUT,
    );
    let mut silent = UnixStream::connect(&r.uds).unwrap();
    let (mut waiting, req) = r.host_connect(5);
    std::thread::sleep(Duration::from_millis(200));
    r.pump();
    assert!(closed(&mut silent));
    assert!(closed(&mut waiting));
    // The guest heard of the connection: it is told to forget it.
    let (h, _) = r.expect(op::RST);
    assert_eq!((h.src_port, h.dst_port), (req.src_port, 5));
    assert_eq!(r.dev().connection_count(), 0);
    assert_eq!(r.dev().muxer.handshake_count(), 0);
}

#[test]
fn host_ports_are_never_shared_by_live_connections() {
    let mem = mem();
    let mut r = Rig::started(&mem, "ports");
    let (_a, ra) = r.host_connect(5);
    let (b, rb) = r.host_connect(5);
    let (_c, rc) = r.host_connect(6);
    let ports = [ra.src_port, rb.src_port, rc.src_port];
    assert!(ports.iter().all(|&p| p >= FIRST_HOST_PORT));
    assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    // A client that gives up before the guest answers: the guest is told.
    drop(b);
    r.pump();
    assert_eq!(r.expect(op::RST).0.src_port, rb.src_port);
    let (_d, rd) = r.host_connect(5);
    assert!(rd.src_port != ra.src_port && rd.src_port != rc.src_port);
    assert_eq!(r.dev().connection_count(), 3);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mem = mem();
    let mut r = Rig::started(&mem, "guest");
    let l = r.listen(5000);
    let mut s = r.guest_connection(&l, 777, 5000);
    r.send(gh(op::RW, 777, 5000), b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");
    s.write_all(b"hello guest").unwrap();
    r.pump();
    let (h, data) = r.expect(op::RW);
    assert_eq!((h.src_port, h.dst_port), (5000, 777));
    assert_eq!(data, b"hello guest");
    r.assert_healthy();
}

#[test]
fn guest_connections_to_nothing_are_reset() {
    let mem = mem();
    let mut r = Rig::started(&mem, "nothing");
    r.send(gh(op::REQUEST, 777, 6000), &[]);
    let (h, _) = r.expect(op::RST);
    assert_eq!((h.src_port, h.dst_port), (6000, 777));
    // A plain file where the socket should be: same.
    std::fs::write(format!("{}_6001", r.uds.display()), b"x").unwrap();
    r.send(gh(op::REQUEST, 777, 6001), &[]);
    r.expect(op::RST);
    assert_eq!(r.dev().connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset_but_resets_are_not() {
    let mem = mem();
    let mut r = Rig::started(&mem, "unknown");
    for o in [
        op::RW,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        op::RESPONSE,
        0,
        99,
    ] {
        r.send(gh(o, 1, 2), b"x");
        let (h, _) = r.expect(op::RST);
        assert_eq!((h.src_port, h.dst_port), (2, 1), "op {o}");
    }
    r.send(gh(op::RST, 1, 2), &[]);
    r.expect_none();
    r.assert_healthy();
}

#[test]
fn misaddressed_packets_are_dropped_silently() {
    let mem = mem();
    let mut r = Rig::started(&mem, "cid");
    let l = r.listen(80);
    let mut s = r.guest_connection(&l, 1, 80);
    for (src, dst) in [
        (CID + 1, HOST_CID),
        (CID, CID),
        (CID, 1),
        (HOST_CID, HOST_CID),
    ] {
        let h = Header {
            src_cid: src,
            dst_cid: dst,
            ..gh(op::RW, 1, 80)
        };
        r.send(h, b"spoofed");
        r.expect_none();
    }
    // The connection on those ports is untouched.
    r.send(gh(op::RW, 1, 80), b"real");
    assert_eq!(read_n(&mut s, 4), b"real");
    assert_eq!(r.dev().counters().tx_bad_packets, 4);
}

#[test]
fn hostile_packets_fail_only_their_connection() {
    let mem = mem();
    let mut r = Rig::started(&mem, "hostile");
    let l = r.listen(80);
    let mut bystander = r.guest_connection(&l, 9, 80);
    let mut port = 100;
    let mut victim = |r: &mut Rig<'_>| {
        port += 1;
        let s = r.guest_connection(&l, port, 80);
        (s, port)
    };

    // An unknown op on a live connection.
    let (mut s, p) = victim(&mut r);
    r.send(gh(42, p, 80), &[]);
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // Another socket type.
    let (mut s, p) = victim(&mut r);
    r.send(
        Header {
            type_: 2,
            ..gh(op::RW, p, 80)
        },
        b"seq",
    );
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // len past the end of the chain.
    let (mut s, p) = victim(&mut r);
    let h = Header {
        len: 100,
        ..gh(op::RW, p, 80)
    }
    .bytes();
    r.send_parts(&[Part::Out(&h), Part::Out(&[7u8; 50])]);
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // len over the 64 KiB cap (with a chain that really holds it).
    let (mut s, p) = victim(&mut r);
    let big = vec![1u8; MAX_PAYLOAD + 1];
    r.send(gh(op::RW, p, 80), &big);
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // A second REQUEST for a live connection.
    let (mut s, p) = victim(&mut r);
    r.send(gh(op::REQUEST, p, 80), &[]);
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // RESPONSE on an established connection.
    let (mut s, p) = victim(&mut r);
    r.send(gh(op::RESPONSE, p, 80), &[]);
    assert_eq!(r.expect(op::RST).0.dst_port, p);
    assert!(closed(&mut s));

    // Chains with no readable header: dropped, nobody to answer.
    let hdr = gh(op::RW, 9, 80).bytes();
    let chains: Vec<Vec<Part<'_>>> = vec![
        vec![Part::Out(&hdr[..43])],
        vec![Part::In(64)],
        vec![Part::Out(&hdr), Part::In(16)],
        vec![Part::Raw(MEM_SIZE as u64 - 20, 44, 0)],
        vec![Part::Raw(TX_BUFS, 44, NEXT)],
        vec![Part::Raw(u64::MAX - 10, 44, 0)],
    ];
    for c in &chains {
        r.send_parts(c);
        r.expect_none();
    }
    // Through all of it, the bystander still works both ways.
    r.send(gh(op::RW, 9, 80), b"still here");
    assert_eq!(read_n(&mut bystander, 10), b"still here");
    bystander.write_all(b"yes").unwrap();
    r.pump();
    assert_eq!(r.expect(op::RW).1, b"yes");
    assert_eq!(r.dev().connection_count(), 1);
    r.assert_healthy();
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mem = mem();
    let mut r = Rig::started(&mem, "credit");
    let l = r.listen(80);
    let mut s = r.guest_connection(&l, 5, 80);
    // The host does not read: ignore the credit and keep sending.
    let chunk = pattern(MAX_PAYLOAD, 1);
    let mut sent = 0usize;
    let mut reset = None;
    while reset.is_none() && sent < 16 << 20 {
        r.send(gh(op::RW, 5, 80), &chunk);
        sent += chunk.len();
        while let Some((h, _)) = r.next() {
            match h.op {
                op::RST => reset = Some(h),
                op::CREDIT_UPDATE => {}
                o => panic!("op {o}"),
            }
        }
    }
    assert_eq!(reset.expect("no reset").dst_port, 5);
    assert_eq!(r.dev().counters().credit_violations, 1);
    // It got past the advertised buffer before the reset (the kernel
    // socket buffer takes some too).
    assert!(sent > CONN_BUF_SIZE as usize, "{sent}");
    // What reached the host is a prefix of what was sent.
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() < sent);
    assert!(got.chunks(MAX_PAYLOAD).all(|c| c == &chunk[..c.len()]));
    assert_eq!(r.dev().connection_count(), 0);
}

/// The guest side of one connection, honouring credit both ways.
struct GuestConn {
    port: u32,
    host_port: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    received: Vec<u8>,
}

impl GuestConn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc - self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)
    }

    fn take(&mut self, h: &Header, data: &[u8]) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if h.op == op::RW {
            self.received.extend_from_slice(data);
        }
    }
}

#[test]
fn a_slow_host_reader_slows_its_connection_only() {
    let mem = mem();
    let mut r = Rig::started(&mem, "pressure");
    let l = r.listen(80);
    let mut slow = r.guest_connection(&l, 1, 80);
    let mut other = r.guest_connection(&l, 2, 80);
    let mut g = GuestConn {
        port: 1,
        host_port: 80,
        tx_cnt: 0,
        peer_buf_alloc: CONN_BUF_SIZE,
        peer_fwd_cnt: 0,
        received: Vec::new(),
    };
    let data = pattern(2 << 20, 7);
    let mut off = 0usize;
    // Send while there is credit; the host does not read.
    while g.credit() > 0 {
        let n = (g.credit() as usize).min(MAX_PAYLOAD).min(data.len() - off);
        r.send(gh(op::RW, g.port, g.host_port), &data[off..off + n]);
        off += n;
        g.tx_cnt = g.tx_cnt.wrapping_add(n as u32);
        while let Some((h, d)) = r.next() {
            g.take(&h, &d);
        }
    }
    assert!(off < data.len(), "credit ran out before the end");
    assert_eq!(r.dev().counters().credit_violations, 0);
    // The other connection is served meanwhile, both ways.
    r.send(gh(op::RW, 2, 80), b"other");
    assert_eq!(read_n(&mut other, 5), b"other");
    other.write_all(b"back").unwrap();
    r.pump();
    let (h, d) = r.expect(op::RW);
    assert_eq!((h.dst_port, d.as_slice()), (2, &b"back"[..]));
    // Now the host reads everything, the guest sends the rest as credit
    // updates come in.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 2 << 20];
        slow.read_exact(&mut got).unwrap();
        got
    });
    let mut spins = 0;
    while off < data.len() {
        r.pump();
        while let Some((h, d)) = r.next() {
            assert_eq!(h.dst_port, 1);
            assert!(matches!(h.op, op::CREDIT_UPDATE | op::RW), "{h:?}");
            g.take(&h, &d);
        }
        let n = (g.credit() as usize).min(MAX_PAYLOAD).min(data.len() - off);
        if n == 0 {
            spins += 1;
            assert!(spins < 1000, "no credit update came");
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        r.send(gh(op::RW, 1, 80), &data[off..off + n]);
        off += n;
        g.tx_cnt = g.tx_cnt.wrapping_add(n as u32);
    }
    r.pump();
    assert!(reader.join().unwrap() == data, "bytes differ");
    r.assert_healthy();
}

#[test]
fn host_data_never_exceeds_the_guest_credit() {
    let mem = mem();
    let mut r = Rig::started(&mem, "guestcredit");
    let l = r.listen(80);
    r.send(
        Header {
            buf_alloc: 10_000,
            ..gh(op::REQUEST, 3, 80)
        },
        &[],
    );
    r.expect(op::RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    let data = pattern(100_000, 3);
    s.write_all(&data).unwrap();
    r.pump();
    let mut got = Vec::new();
    let mut asked = 0;
    while let Some((h, d)) = r.next() {
        match h.op {
            op::RW => got.extend(d),
            op::CREDIT_REQUEST => asked += 1,
            o => panic!("op {o}"),
        }
    }
    assert_eq!(got.len(), 10_000);
    assert_eq!(asked, 1, "one credit request while blocked");
    // Blocked on credit: the socket is not polled.
    assert_eq!(r.quiet_events(50), 0, "busy loop");
    // The guest consumed 6000 bytes.
    r.send(
        Header {
            buf_alloc: 10_000,
            fwd_cnt: 6000,
            ..gh(op::CREDIT_UPDATE, 3, 80)
        },
        &[],
    );
    while let Some((h, d)) = r.next() {
        if h.op == op::RW {
            got.extend(d);
        }
    }
    assert_eq!(got.len(), 16_000);
    // A guest claiming to have consumed more than it got earns nothing.
    r.send(
        Header {
            buf_alloc: 10_000,
            fwd_cnt: 1_000_000,
            ..gh(op::CREDIT_UPDATE, 3, 80)
        },
        &[],
    );
    assert!(r.inbox.iter().all(|(h, _)| h.op != op::RW));
    r.inbox.clear();
    // The guest consumes everything as it arrives.
    let mut spins = 0;
    while got.len() < data.len() {
        r.send(
            Header {
                buf_alloc: 10_000,
                fwd_cnt: got.len() as u32,
                ..gh(op::CREDIT_UPDATE, 3, 80)
            },
            &[],
        );
        while let Some((h, d)) = r.next() {
            if h.op == op::RW {
                got.extend(d);
            }
        }
        spins += 1;
        assert!(spins < 100);
    }
    assert!(got == data);
}

#[test]
fn without_receive_buffers_nothing_is_read_until_the_guest_adds_some() {
    let mem = mem();
    let mut r = Rig::new(&mem, "norx");
    r.refill = false;
    r.post_rx(1);
    r.activate();
    let l = r.listen(80);
    // The only buffer carries the RESPONSE.
    let mut s = r.guest_connection(&l, 4, 80);
    s.write_all(b"one").unwrap();
    r.send(gh(op::REQUEST, 5, 6001), &[]); // a reset is owed too
    r.pump();
    assert!(r.dev().muxer.rx_stalled());
    assert_eq!(r.quiet_events(50), 0, "busy loop");
    s.write_all(b" two").unwrap();
    assert_eq!(r.quiet_events(50), 0, "socket polled without buffers");
    r.post_rx(4);
    r.kick(RX_INDEX);
    r.pump();
    assert_eq!(r.expect(op::RST).0.dst_port, 5);
    let (_, d) = r.expect(op::RW);
    assert_eq!(d, b"one two");
    assert!(!r.dev().muxer.rx_stalled());
}

#[test]
fn resets_that_pile_up_pause_the_guest_until_it_takes_them() {
    let mem = mem();
    let mut r = Rig::new(&mem, "pile");
    r.refill = false;
    r.activate();
    // More refused requests than resets may wait: no buffers to take them.
    let n = MAX_QUEUED_RESETS + 50;
    let hdr: Vec<[u8; HDR_LEN]> = (0..n as u32).map(|i| gh(op::RW, i, 1).bytes()).collect();
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(200);
        for h in &hdr[sent..sent + batch] {
            r.tx.add(&[Part::Out(h)]);
        }
        sent += batch;
        r.kick(TX_INDEX);
        r.pump();
    }
    assert!(r.dev().tx_paused);
    assert_eq!(r.tx.used_ring.idx().load() as usize, MAX_QUEUED_RESETS);
    assert_eq!(r.quiet_events(50), 0, "busy loop");
    // The guest takes resets: the rest of its packets go through.
    r.refill = true;
    r.post_rx(64);
    r.kick(RX_INDEX);
    r.pump();
    assert_eq!(r.tx.used_ring.idx().load() as usize, n);
    let resets = r.inbox.iter().filter(|(h, _)| h.op == op::RST).count();
    assert_eq!(resets, n);
    r.assert_healthy();
}

#[test]
fn shutdown_flags_map_to_unix_shutdown() {
    let mem = mem();
    let mut r = Rig::started(&mem, "shut");
    let l = r.listen(80);
    // SEND: the host reader sees EOF after the data, and can still write.
    let mut s = r.guest_connection(&l, 1, 80);
    r.send(gh(op::RW, 1, 80), b"last words");
    r.send(
        Header {
            flags: shutdown::SEND,
            ..gh(op::SHUTDOWN, 1, 80)
        },
        &[],
    );
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    s.write_all(b"reply").unwrap();
    r.pump();
    assert_eq!(r.expect(op::RW).1, b"reply");
    // Data after SHUTDOWN(SEND) breaks the protocol.
    r.send(gh(op::RW, 1, 80), b"zombie");
    r.expect(op::RST);
    assert!(closed(&mut s));
    assert_eq!(r.dev().connection_count(), 0);

    // RCV: the host writer gets EPIPE.
    let mut s = r.guest_connection(&l, 2, 80);
    r.send(
        Header {
            flags: shutdown::RCV,
            ..gh(op::SHUTDOWN, 2, 80)
        },
        &[],
    );
    let e = s.write_all(&[0u8; 1024]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);
    r.pump();
    r.expect_none();
    r.send(gh(op::RW, 2, 80), b"still sending");
    assert_eq!(read_n(&mut s, 13), b"still sending");

    // Both (cumulative): reset and closed.
    r.send(
        Header {
            flags: shutdown::SEND,
            ..gh(op::SHUTDOWN, 2, 80)
        },
        &[],
    );
    let (h, _) = r.expect(op::RST);
    assert_eq!(h.dst_port, 2);
    assert!(closed(&mut s));
    assert_eq!(r.dev().connection_count(), 0);
}

#[test]
fn host_eof_becomes_a_guest_shutdown_and_close_finishes_it() {
    let mem = mem();
    let mut r = Rig::started(&mem, "eof");
    let l = r.listen(80);
    let s = r.guest_connection(&l, 1, 80);
    (&s).write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    r.pump();
    assert_eq!(r.expect(op::RW).1, b"bye");
    let (h, _) = r.expect(op::SHUTDOWN);
    assert_eq!(h.flags, shutdown::SEND);
    r.expect_none();
    // The guest can still send; then it closes: RST, socket closed.
    r.send(gh(op::RW, 1, 80), b"ack");
    let mut s = s;
    assert_eq!(read_n(&mut s, 3), b"ack");
    r.send(
        Header {
            flags: shutdown::BOTH,
            ..gh(op::SHUTDOWN, 1, 80)
        },
        &[],
    );
    r.expect(op::RST);
    assert!(closed(&mut s));

    // A host peer that closes entirely: SHUTDOWN, then guest data is reset.
    let s = r.guest_connection(&l, 2, 80);
    drop(s);
    r.pump();
    let (h, _) = r.expect(op::SHUTDOWN);
    assert_eq!((h.dst_port, h.flags), (2, shutdown::SEND));
    r.send(gh(op::RW, 2, 80), b"anyone?");
    r.expect(op::RST);
    assert_eq!(r.dev().connection_count(), 0);
    assert_eq!(r.dev().muxer.graveyard_len(), 0);
}

/// A connection whose host peer does not read: the guest fills the
/// kernel socket buffer and some of husk's, then closes.
fn stuffed_connection(r: &mut Rig<'_>, l: &UnixListener, port: u32) -> (UnixStream, Vec<u8>) {
    let s = r.guest_connection(l, port, 80);
    let data = pattern(CONN_BUF_SIZE as usize + (256 << 10), 9);
    let mut sent = 0;
    for c in data.chunks(MAX_PAYLOAD) {
        r.send(gh(op::RW, port, 80), c);
        sent += c.len();
        assert!(r.inbox.drain(..).all(|(h, _)| h.op == op::CREDIT_UPDATE));
        if r.dev().muxer.pending_of(port) >= MAX_PAYLOAD {
            break;
        }
    }
    assert!(r.dev().muxer.pending_of(port) > 0, "nothing held back");
    r.send(
        Header {
            flags: shutdown::BOTH,
            ..gh(op::SHUTDOWN, port, 80)
        },
        &[],
    );
    r.expect_none();
    assert_eq!(r.dev().connection_count(), 1, "kept until flushed");
    (s, data[..sent].to_vec())
}

#[test]
fn a_closing_guests_last_bytes_still_reach_a_slow_reader() {
    let mem = mem();
    let mut r = Rig::started(&mem, "linger");
    let l = r.listen(80);
    let (s, sent) = stuffed_connection(&mut r, &l, 1);
    // Linux resets a connection whose close was not acknowledged in time:
    // the data it sent before is still delivered.
    r.send(gh(op::RST, 1, 80), &[]);
    assert_eq!(r.dev().connection_count(), 1);
    let reader = std::thread::spawn(move || {
        let mut s = s;
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut spins = 0;
    while r.dev().connection_count() > 0 {
        r.pump();
        spins += 1;
        assert!(spins < 1000, "never flushed");
    }
    assert!(reader.join().unwrap() == sent);
    r.expect_none();

    // Same with a host reader that never reads: given up after the close timeout.
    r.dev().muxer.set_timeouts(
        HANDSHAKE_TIMEOUT,
        CONNECT_TIMEOUT,
        Duration::from_millis(100),
    );
    let (mut s, _) = stuffed_connection(&mut r, &l, 2);
    std::thread::sleep(Duration::from_millis(150));
    r.pump();
    assert_eq!(r.expect(op::RST).0.dst_port, 2);
    assert_eq!(r.dev().connection_count(), 0);
    // What was forwarded, then EOF.
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(!got.is_empty());
}

#[test]
fn a_guest_reset_closes_the_host_stream() {
    let mem = mem();
    let mut r = Rig::started(&mem, "rst");
    let (mut s, hp) = r.host_connection(1024);
    r.send(gh(op::RST, 1024, hp), &[]);
    assert!(closed(&mut s));
    r.expect_none();
    assert_eq!(r.dev().connection_count(), 0);
}

#[test]
fn a_driver_reset_drops_every_connection() {
    let mem = mem();
    let mut r = Rig::started(&mem, "reset");
    let l = r.listen(80);
    let mut a = r.guest_connection(&l, 1, 80);
    let (mut b, _) = r.host_connection(9);
    r.dev().reset();
    r.pump();
    assert!(closed(&mut a));
    assert!(closed(&mut b));
    assert_eq!(r.dev().connection_count(), 0);
    // Host clients are turned away until the driver is back.
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 9\n").unwrap();
    r.pump();
    assert!(closed(&mut c));
}

#[test]
fn sixty_four_connections_each_way_at_once() {
    let mem = mem();
    let mut r = Rig::started(&mem, "many");
    let l = r.listen(80);
    let n = 64u32;
    let mut host_side = Vec::new();
    for i in 0..n {
        let (s, hp) = r.host_connection(2000 + i);
        host_side.push((s, 2000 + i, hp));
    }
    let mut guest_side = Vec::new();
    for i in 0..n {
        guest_side.push((r.guest_connection(&l, 3000 + i, 80), 3000 + i));
    }
    assert_eq!(r.dev().connection_count(), 2 * n as usize);
    // Every host stream writes, every guest port sends: all interleaved.
    for (s, port, _) in host_side.iter_mut() {
        s.write_all(&pattern(1000, *port as u8)).unwrap();
    }
    for (s, port) in guest_side.iter_mut() {
        s.write_all(&pattern(1500, *port as u8)).unwrap();
    }
    for (_, port, hp) in &host_side {
        r.tx.add(&[
            Part::Out(
                &Header {
                    len: 700,
                    ..gh(op::RW, *port, *hp)
                }
                .bytes(),
            ),
            Part::Out(&pattern(700, !*port as u8)),
        ]);
    }
    r.kick(TX_INDEX);
    r.pump();
    let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
    while let Some((h, d)) = r.next() {
        assert_eq!(h.op, op::RW);
        got.entry(h.dst_port).or_default().extend(d);
    }
    for (s, port, _) in host_side.iter_mut() {
        assert_eq!(got[port], pattern(1000, *port as u8));
        assert_eq!(read_n(s, 700), pattern(700, !*port as u8));
    }
    for (_, port) in &guest_side {
        assert_eq!(got[port], pattern(1500, *port as u8));
    }
    // Close them all, half from each side.
    for (s, port, hp) in host_side.iter_mut() {
        r.send(
            Header {
                flags: shutdown::BOTH,
                ..gh(op::SHUTDOWN, *port, *hp)
            },
            &[],
        );
        assert!(closed(s));
    }
    drop(guest_side);
    r.pump();
    let mut shut = 0;
    while let Some((h, _)) = r.next() {
        match h.op {
            op::RST => {}
            op::SHUTDOWN => {
                shut += 1;
                r.send(
                    Header {
                        flags: shutdown::BOTH,
                        ..gh(op::SHUTDOWN, h.dst_port, h.src_port)
                    },
                    &[],
                );
            }
            o => panic!("op {o}"),
        }
    }
    assert_eq!(shut, n);
    assert_eq!(r.dev().connection_count(), 0);
    assert_eq!(r.dev().muxer.graveyard_len(), 0);
    let c = r.dev().counters();
    assert_eq!(c.connections_opened, c.connections_closed);
    r.assert_healthy();
}

#[test]
fn malformed_receive_chains_are_returned_empty() {
    let mem = mem();
    let mut r = Rig::new(&mem, "badrx");
    r.refill = false;
    r.rx.add(&[Part::Raw(RX_BUFS, 200, 0)]); // device-readable
    r.rx.add(&[Part::In(20)]); // too small for a header
    r.rx.add(&[Part::Raw(MEM_SIZE as u64 - 10, 100, WRITE)]); // outside memory
    r.rx.add(&[Part::Raw(RX_BUFS, 100, WRITE | NEXT)]); // loop
    r.rx_shape = (HDR_LEN as u32 + 100, 0);
    r.post_rx(1);
    r.activate();
    r.send(gh(op::RW, 1, 2), &[]);
    assert_eq!(r.expect(op::RST).0.dst_port, 1);
    assert_eq!(r.dev().counters().rx_bad_chains, 4);
    r.assert_healthy();
}

#[test]
fn a_broken_ring_needs_a_reset_and_the_event_queue_is_left_alone() {
    let mem = mem();
    let mut r = Rig::started(&mem, "ring");
    r.kick(EVENT_INDEX);
    r.pump();
    assert_eq!(r.ev.used_ring.idx().load(), 0);
    r.tx.avail_ring.idx().store(QUEUE_SIZE + 7);
    r.kick(TX_INDEX);
    r.pump();
    assert!(r.failed.load(Ordering::SeqCst));
    assert!(!r.dev().running());
}

#[test]
fn the_socket_file_goes_with_the_device() {
    let dir = tempdir("file");
    let p = dir.join("v.sock");
    let dev = Vsock::new(3, &p).unwrap();
    assert!(p.exists());
    assert!(matches!(Vsock::new(4, &p), Err(VsockError::PathInUse(_))));
    drop(dev);
    assert!(!p.exists());
    std::fs::write(&p, b"x").unwrap();
    assert!(matches!(Vsock::new(3, &p), Err(VsockError::PathInUse(_))));
    assert!(matches!(
        Vsock::new(3, &dir.join("no/such/dir")),
        Err(VsockError::Bind(..))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}
