//! virtio-vsock on real KVM: a tiny guest reads the device's ID and CID
//! through the MMIO transport, then drives it as a driver would (status,
//! features, three queues, notifications through the KVM ioeventfds):
//! it connects to host port 5000, which reaches the test's Unix listener
//! at `<uds>_5000`, sends a line and prints what the host answers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::tiny;
use common::vsock_guest::{CID, PAYLOAD};
use husk_vmm::config::{Console, VmConfig, VsockConfig};
use husk_vmm::{ConsoleInputSource, VmExit};

#[test]
fn a_tiny_guest_talks_to_a_host_unix_socket_through_vsock() {
    // What this process inherited (from the shell that ran the tests)
    // is not the VMM's.
    let inherited = inheritable_fds();
    let dir = tiny::tempdir("vsock");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let kernel = dir.join("k");
    std::fs::write(&kernel, common::vsock_guest::kernel()).unwrap();
    let out = dir.join("console");
    let cfg = VmConfig {
        kernel: Some(kernel),
        console: Console::File(out.clone()),
        mem_mib: 64,
        vsock: Some(VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        }),
        ..Default::default()
    };
    let vm = husk_vmm::build(&cfg).unwrap();
    assert!(
        vm.cmdline()
            .split_whitespace()
            .any(|w| w == "virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        vm.cmdline()
    );
    assert!(uds.exists(), "the VM's socket is listening");
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(ConsoleInputSource::None));

    // The guest's connection arrives on the listener.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                stop.stop(VmExit::Killed(9));
                let _ = vm_thread.join();
                panic!(
                    "no connection from the guest ({e}); console: {:?}",
                    std::fs::read(&out)
                );
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // Now that every thread of the VM runs and the connection is up, none
    // of the VMM's descriptors would cross an exec (it starts virtiofsd).
    let leaky: Vec<_> = inheritable_fds()
        .into_iter()
        .filter(|fd| !inherited.contains(fd))
        .collect();
    if !leaky.is_empty() {
        stop.stop(VmExit::Killed(9));
        let _ = vm_thread.join();
        panic!("descriptors without FD_CLOEXEC: {leaky:?}");
    }
    let mut got = vec![0u8; PAYLOAD.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, PAYLOAD);
    conn.write_all(b"hey").unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm_thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !vm_thread.is_finished() {
        stop.stop(VmExit::Killed(9));
    }
    assert_eq!(vm_thread.join().unwrap(), VmExit::GuestReset);
    // DeviceID 19, CID 42, op 2 (RESPONSE), then the host's bytes.
    assert_eq!(std::fs::read(&out).unwrap(), [19, 42, 2, b'h', b'e', b'y']);
    // The guest's stream is gone with the VM, and so is the socket file.
    let mut rest = Vec::new();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0);
    assert!(!uds.exists(), "socket file left behind");
    std::fs::remove_dir_all(dir).unwrap();
}

/// This process's descriptors above stderr that an exec would keep, with
/// what each is.
fn inheritable_fds() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // flags < 0: closed since the listing was read.
        if fd > 2 && flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            let what = std::fs::read_link(e.path()).unwrap_or_default();
            out.push((fd, what.display().to_string()));
        }
    }
    out
}
