//! Tiny-guest KVM tests: real KVM, hand-assembled guests, no Linux.

mod common;

use std::sync::{Arc, Mutex};

use common::tiny;
use husk_vmm::config::{Console, VmConfig};
use husk_vmm::vstate::bus::BusDevice;
use husk_vmm::{ConsoleInputSource, VmExit};

fn config(kernel: std::path::PathBuf, console: std::path::PathBuf, vcpus: u8) -> VmConfig {
    VmConfig {
        kernel: Some(kernel),
        console: Console::File(console),
        vcpus,
        mem_mib: 64,
        ..Default::default()
    }
}

#[test]
fn serial_output_reaches_the_sink_and_reset_ends_the_vm() {
    let dir = tiny::tempdir("serial");
    let mut code = tiny::serial_out(b"hello from a tiny guest\n");
    code.extend(tiny::i8042_reset());
    let k = tiny::write_kernel(&dir, "k", &code);
    let out = dir.join("console");
    let vm = husk_vmm::build(&config(k, out.clone(), 1)).unwrap();
    let exit = vm.run(ConsoleInputSource::None);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(exit.exit_code(), 0);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello from a tiny guest\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn undeliverable_exception_is_a_triple_fault() {
    let dir = tiny::tempdir("triple");
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let k = tiny::write_kernel(&dir, "k", &[0x0f, 0x0b]);
    let vm = husk_vmm::build(&config(k, dir.join("c"), 1)).unwrap();
    let exit = vm.run(ConsoleInputSource::None);
    assert_eq!(exit, VmExit::TripleFault { vcpu: 0 });
    assert_eq!(exit.exit_code(), husk_vmm::exit::code::TRIPLE_FAULT);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A device that records writes and answers reads with a fixed value.
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Probe {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = b'a' + offset as u8;
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn mmio_accesses_are_routed_to_the_right_device() {
    let dir = tiny::tempdir("mmio");
    let other = Arc::new(Mutex::new(Probe { writes: vec![] }));
    let probe = Arc::new(Mutex::new(Probe { writes: vec![] }));
    let base = 0xd000_1000u64;
    let mut code = vec![
        0xbf, 0x08, 0x10, 0x00, 0xd0, // mov edi, 0xd0001008
        0xc7, 0x07, 0x78, 0x56, 0x34, 0x12, // mov dword [rdi], 0x12345678
        0x8a, 0x47, 0x02, // mov al, [rdi+2]  (offset 0xa -> 'k')
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xbf, 0x00, 0x00, 0x00, 0xd1, // mov edi, 0xd1000000 (unclaimed)
        0xc7, 0x07, 0x01, 0x00, 0x00, 0x00, // mov dword [rdi], 1: ignored
        0x8a, 0x07, // mov al, [rdi]: reads 0xff
        0xee, // out dx, al
    ];
    code.extend(tiny::i8042_reset());
    let k = tiny::write_kernel(&dir, "k", &code);
    let out = dir.join("c");
    let vm = husk_vmm::build_with_mmio(
        &config(k, out.clone(), 1),
        vec![
            (other.clone(), 0xd000_0000, 0x1000),
            (probe.clone(), base, 0x1000),
        ],
    )
    .unwrap();
    assert_eq!(vm.run(ConsoleInputSource::None), VmExit::GuestReset);
    assert_eq!(
        probe.lock().unwrap().writes,
        vec![(8, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
    assert!(other.lock().unwrap().writes.is_empty());
    assert_eq!(std::fs::read(&out).unwrap(), vec![b'k', 0xff]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_vcpu_runs() {
    let dir = tiny::tempdir("smp");
    let vcpus = 4u8;
    let k = dir.join("k");
    std::fs::write(
        &k,
        tiny::elf(
            tiny::ENTRY,
            &[
                (tiny::ENTRY, tiny::start_aps_then_reset(vcpus - 1)),
                (tiny::AP_TRAMPOLINE, tiny::ap_trampoline()),
            ],
        ),
    )
    .unwrap();
    let out = dir.join("c");
    let vm = husk_vmm::build(&config(k, out.clone(), vcpus)).unwrap();
    assert_eq!(vm.run(ConsoleInputSource::None), VmExit::GuestReset);
    let text = std::fs::read_to_string(&out).unwrap();
    let mut ids: Vec<char> = text.chars().filter(|c| c.is_ascii_digit()).collect();
    ids.sort();
    assert_eq!(ids, vec!['1', '2', '3'], "console: {text:?}");
    assert!(text.ends_with("B\n"), "console: {text:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_halted_guest_does_not_hang_the_vmm() {
    // With the in-kernel LAPIC a `cli; hlt` vCPU sleeps inside KVM_RUN
    // forever; the VMM must still be able to stop it (kick signal).
    let dir = tiny::tempdir("hlt");
    let mut code = tiny::serial_out(b"H");
    code.extend(tiny::halt_forever());
    let k = tiny::write_kernel(&dir, "k", &code);
    let out = dir.join("c");
    let vm = husk_vmm::build(&config(k, out.clone(), 2)).unwrap();
    let latch_probe = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run(ConsoleInputSource::None));
    // Wait for the guest to print, then stop it from outside.
    for _ in 0..500 {
        if std::fs::read(&out).map(|b| b == b"H").unwrap_or(false) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    latch_probe.stop(VmExit::Killed(15));
    assert_eq!(t.join().unwrap(), VmExit::Killed(15));
    assert_eq!(std::fs::read(&out).unwrap(), b"H");
    std::fs::remove_dir_all(dir).unwrap();
}
