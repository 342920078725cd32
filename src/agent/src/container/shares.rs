//! Host directories shared through virtio-fs: each device is mounted once
//! per VM at `SHARES_DIR/<tag>`, where the spec's bind mounts name it.

use std::fs;
use std::path::{Path, PathBuf};

use husk_proto::{ErrorCode, Share, SHARES_DIR};

use crate::sys;

/// Longest tag a virtio-fs device carries.
const TAG_MAX: usize = 36;

/// Where `tag` is mounted in the guest.
pub fn mount_point(tag: &str) -> PathBuf {
    Path::new(SHARES_DIR).join(tag)
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(parent)) = (fs::metadata(path), path.parent()) else {
        return false;
    };
    fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

/// Mounts every share not mounted yet (a second container of the VM may
/// use the same one).
pub fn mount(shares: &[Share]) -> Result<(), (ErrorCode, String)> {
    for s in shares {
        let plain = !s.tag.is_empty()
            && s.tag.len() <= TAG_MAX
            && s.tag != "."
            && s.tag != ".."
            && s.tag.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
        if !plain {
            return Err((
                ErrorCode::InvalidRequest,
                format!(
                    "share tag {:?} is not 1 to {TAG_MAX} printable bytes without '/'",
                    s.tag
                ),
            ));
        }
        let target = mount_point(&s.tag);
        if is_mounted(&target) {
            continue;
        }
        fs::create_dir_all(&target).map_err(|e| {
            (
                ErrorCode::SetupFailed,
                format!("create {}: {e}", target.display()),
            )
        })?;
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if s.read_only {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(
            Some(Path::new(&s.tag)),
            &target,
            Some("virtiofs"),
            flags,
            None,
        )
        .map_err(|e| {
            (
                ErrorCode::SetupFailed,
                format!("mount virtio-fs share {:?}: {e}", s.tag),
            )
        })?;
    }
    Ok(())
}
