//! Tiny guests for tests: hand-assembled x86 code wrapped in a minimal
//! ELF64 executable, so it goes through husk's real vmlinux load path and
//! starts in 64-bit long mode like a Linux kernel would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Where the 64-bit code is loaded and entered.
pub const ENTRY: u64 = 0x10_0000;
/// Where real-mode AP code is loaded (SIPI vector 0x10).
pub const AP_TRAMPOLINE: u64 = 0x1_0000;

/// `mov dx, 0x3f8; mov al, c; out dx, al` for each byte.
pub fn serial_out(s: &[u8]) -> Vec<u8> {
    let mut v = vec![0x66, 0xba, 0xf8, 0x03];
    for &c in s {
        v.extend_from_slice(&[0xb0, c, 0xee]);
    }
    v
}

/// `mov al, 0xfe; out 0x64, al` then halt forever.
pub fn i8042_reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]
}

/// `cli; hlt` forever.
pub fn halt_forever() -> Vec<u8> {
    vec![0xfa, 0xf4, 0xeb, 0xfd]
}

/// An ELF64 image with `segments` as (physical address, bytes), entered at `entry`.
pub fn elf(entry: u64, segments: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let phoff = 64u64;
    let data_start = phoff + 56 * segments.len() as u64;
    let mut out = Vec::new();
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&phoff.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // no sections
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    let mut offset = data_start;
    for (paddr, bytes) in segments {
        out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out.extend_from_slice(&7u32.to_le_bytes()); // RWX
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes()); // vaddr
        out.extend_from_slice(&paddr.to_le_bytes()); // paddr
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
        offset += bytes.len() as u64;
    }
    for (_, bytes) in segments {
        out.extend_from_slice(bytes);
    }
    out
}

/// Writes a one-segment tiny kernel to `dir/name`.
pub fn write_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, elf(ENTRY, &[(ENTRY, code.to_vec())])).unwrap();
    p
}

/// A fresh temporary directory for one test.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// BSP code that starts every AP with INIT + SIPI (vector 0x10), waits
/// until `aps` of them have checked in at 0x600, then resets the VM.
pub fn start_aps_then_reset(aps: u8) -> Vec<u8> {
    let mut v = vec![
        0xbf, 0x00, 0x03, 0xe0, 0xfe, // mov edi, 0xfee00300 (ICR low)
        0xc7, 0x07, 0x00, 0x45, 0x0c, 0x00, // INIT, level assert, all excluding self
        0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00, // SIPI vector 0x10, all excluding self
        0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00, // second SIPI, as the MP spec says
        // wait: mov al, [0x600]; cmp al, aps; jne wait
        0x8a, 0x04, 0x25, 0x00, 0x06, 0x00, 0x00, 0x3c, aps, 0x75, 0xf5,
    ];
    v.extend(serial_out(b"B\n"));
    v.extend(i8042_reset());
    v
}

/// Real-mode AP code: print '0' + APIC id (from CPUID), count in at 0x600, halt.
pub fn ap_trampoline() -> Vec<u8> {
    vec![
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2, // cpuid
        0x66, 0xc1, 0xeb, 0x18, // shr ebx, 24
        0x88, 0xd8, // mov al, bl
        0x04, 0x30, // add al, '0'
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xf0, 0xfe, 0x06, 0x00, 0x06, // lock inc byte [0x600]
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
    ]
}
