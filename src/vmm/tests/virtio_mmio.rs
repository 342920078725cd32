//! virtio-mmio on real KVM: a tiny guest reads the identification
//! registers of the slots the builder allocated, through the MMIO bus.

mod common;

use common::tiny;
use husk_vmm::config::{Console, DiskConfig, VmConfig};
use husk_vmm::{ConsoleInputSource, VmExit};

/// Prints the 4 bytes of eax (little endian) on COM1.
fn print_eax() -> Vec<u8> {
    let mut v = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for _ in 0..3 {
        v.extend([0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
    v.push(0xee);
    v
}

#[test]
fn guest_reads_virtio_mmio_identification_registers() {
    let dir = tiny::tempdir("virtio-mmio");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let mut code = Vec::new();
    // Slot 0, then slot 1: MagicValue, then '0' + Version, '0' + DeviceID.
    for base in [0xd000_0000u32, 0xd000_1000] {
        code.push(0xbf); // mov edi, base
        code.extend(base.to_le_bytes());
        code.extend([0x8b, 0x07]); // mov eax, [rdi]
        code.extend(print_eax());
        code.extend([0x8b, 0x47, 0x04, 0x04, 0x30, 0xee]); // mov eax, [rdi+4]; add al, '0'; out
        code.extend([0x8b, 0x47, 0x08, 0x04, 0x30, 0xee]); // mov eax, [rdi+8]; add al, '0'; out
    }
    // The next slot is empty: reads float high.
    code.extend([0xbf, 0x00, 0x20, 0x00, 0xd0, 0x8b, 0x07, 0xee]);
    code.extend(tiny::i8042_reset());
    let kernel = tiny::write_kernel(&dir, "k", &code);
    let out = dir.join("console");
    let disk = |id: &str| DiskConfig {
        path: img.clone(),
        read_only: true,
        id: Some(id.into()),
        direct: false,
    };
    let cfg = VmConfig {
        kernel: Some(kernel),
        console: Console::File(out.clone()),
        mem_mib: 64,
        disks: vec![disk("a"), disk("b")],
        ..Default::default()
    };
    let vm = husk_vmm::build(&cfg).unwrap();
    assert!(
        vm.cmdline()
            .contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{}",
        vm.cmdline()
    );
    assert_eq!(vm.run(ConsoleInputSource::None), VmExit::GuestReset);
    let mut want = b"virt22virt22".to_vec();
    want.push(0xff);
    assert_eq!(std::fs::read(&out).unwrap(), want);
    std::fs::remove_dir_all(dir).unwrap();
}
