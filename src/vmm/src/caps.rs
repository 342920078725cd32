//! Giving up capabilities. The threads that serve the guest (vCPUs, the
//! event loop, the console) work only on descriptors opened before the
//! guest ran, so each drops every capability, and its bounding set, before
//! it installs its seccomp filter: a thread the guest took over keeps
//! neither the syscalls nor the privileges it never needed (uid 0 still
//! owns what husk created, so plain file permissions keep working).
//! `husk vm`'s main thread drops them too once the VM is built.
//!
//! Capabilities are per thread; a thread started later inherits its
//! creator's.

use std::io;

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops the calling thread's bounding, ambient, effective, permitted and
/// inheritable capabilities. Without CAP_SETPCAP (not root) the bounding
/// set is left as it is: there is nothing the thread could raise anyway.
pub fn drop_all() -> io::Result<()> {
    drop_bounding()?;
    clear_ambient_and_sets()
}

/// Drops the calling thread's bounding set; without CAP_SETPCAP it is left
/// as it is.
pub fn drop_bounding() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability, or not privileged.
                Some(libc::EINVAL) | Some(libc::EPERM) => break,
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
    Ok(())
}

fn clear_ambient_and_sets() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: the header and two data structs are the kernel's v3 layout
    // and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of the calling thread's status.
    fn status_field(name: &str) -> String {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_thread_that_drops_keeps_nothing_and_others_keep_theirs() {
        let before = status_field("CapEff:");
        let (eff, bnd) = std::thread::spawn(|| {
            drop_all().unwrap();
            (status_field("CapEff:"), status_field("CapBnd:"))
        })
        .join()
        .unwrap();
        assert_eq!(eff, "0000000000000000");
        if before != "0000000000000000" {
            // Privileged: the bounding set went too.
            assert_eq!(bnd, "0000000000000000");
        }
        assert_eq!(status_field("CapEff:"), before, "per thread");
    }
}
