//! A container's minimal `/dev`: a tmpfs with the default nodes, the
//! spec's devices (made, or bound from the guest's), devpts with its own
//! ptmx, /dev/shm, the usual symlinks, and the console.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use super::{create_file, ctx, mkdir_p, secure_join, MountError};
use crate::container::plan::{ContainerPlan, DevicePlan};
use crate::sys;

/// The device nodes every container gets: (name, major, minor).
pub const DEFAULT_DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Builds a minimal `/dev` unless the spec bind-mounts one: a tmpfs (unless
/// the spec mounted something there), the default nodes, `linux.devices`,
/// devpts with its own ptmx, /dev/shm, and the usual symlinks.
pub fn setup_dev(root: &Path, plan: &ContainerPlan) -> Result<(), MountError> {
    if plan.dev_is_bind() {
        return Ok(());
    }
    // Within the root, as any mount target: an image's /dev may be a
    // symlink, and an absolute one must not reach the agent's own tree.
    let dev = ctx(
        secure_join(root, Path::new("/dev")),
        "resolve",
        Path::new("/dev"),
    )?;
    if !plan.mounts_at("/dev") {
        ctx(mkdir_p(&dev), "create", &dev)?;
        let flags = libc::MS_NOSUID | libc::MS_STRICTATIME;
        let data = "mode=755,size=65536k";
        ctx(
            sys::mount(
                Some(Path::new("tmpfs")),
                &dev,
                Some("tmpfs"),
                flags,
                Some(data),
            ),
            "mount",
            &dev,
        )?;
    }
    // Nodes and links directly in /dev are made relative to one
    // descriptor: a system call or two each instead of a path walk per
    // step (resolve, mkdir, unlink, mknod, chown, chmod), each of which
    // costs milliseconds where guest kernel code is emulated.
    let dir = ctx(sys::open_dir_path(&dev), "open", &dev)?;
    let defaults = DEFAULT_DEVICES
        .iter()
        .map(|&(name, major, minor)| DevicePlan {
            path: PathBuf::from("/dev").join(name),
            kind: libc::S_IFCHR,
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        });
    for node in defaults.chain(plan.devices.iter().cloned()) {
        match name_in_dev(&node.path) {
            Some(name) => create_device_at(root, &dir, name, &node)?,
            None => create_device(root, &node)?,
        }
    }
    if !plan.mounts_at("/dev/pts") {
        let pts = dev.join("pts");
        ctx(mkdir_p(&pts), "create", &pts)?;
        let data = "newinstance,ptmxmode=0666,mode=0620";
        let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
        ctx(
            sys::mount(
                Some(Path::new("devpts")),
                &pts,
                Some("devpts"),
                flags,
                Some(data),
            ),
            "mount",
            &pts,
        )?;
    }
    if !plan.mounts_at("/dev/shm") {
        let shm = dev.join("shm");
        ctx(mkdir_p(&shm), "create", &shm)?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        ctx(
            sys::mount(
                Some(Path::new("shm")),
                &shm,
                Some("tmpfs"),
                flags,
                Some("mode=1777,size=65536k"),
            ),
            "mount",
            &shm,
        )?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        let name = OsStr::new(name);
        if name == "ptmx" {
            // The container's own devpts instance, not the guest's.
            let _ = sys::unlinkat(&dir, name);
        }
        match sys::symlinkat(OsStr::new(target), &dir, name) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return ctx(Err(e), "symlink", &dev.join(name));
            }
            _ => {}
        }
    }
    Ok(())
}

/// `null` for `/dev/null`: a node directly in /dev, by a plain name.
fn name_in_dev(path: &Path) -> Option<&OsStr> {
    let mut comps = path.components();
    match (comps.next(), comps.next(), comps.next(), comps.next()) {
        (
            Some(Component::RootDir),
            Some(Component::Normal(dev)),
            Some(Component::Normal(n)),
            None,
        ) if dev == "dev" => Some(n),
        _ => None,
    }
}

/// A node in the container's /dev (`dir`): mknodat with the exact mode
/// (no umask), a chown only for another owner. What is already there (an
/// image's file, a default the spec lists again) is replaced; where mknod
/// is refused, the guest's node is bind-mounted instead.
fn create_device_at(
    root: &Path,
    dir: &OwnedFd,
    name: &OsStr,
    d: &DevicePlan,
) -> Result<(), MountError> {
    let old_mask = sys::umask(0);
    let mut made = sys::mknodat(dir, name, d.kind | d.mode, d.major, d.minor);
    if matches!(&made, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
        made = sys::unlinkat(dir, name)
            .and_then(|()| sys::mknodat(dir, name, d.kind | d.mode, d.major, d.minor));
    }
    sys::umask(old_mask);
    match made {
        Ok(()) if (d.uid, d.gid) == (0, 0) => Ok(()),
        Ok(()) => {
            ctx(sys::fchownat(dir, name, d.uid, d.gid), "chown", &d.path)?;
            // A chown drops set-id bits; put the asked mode back.
            if d.mode & 0o6000 != 0 {
                ctx(sys::fchmodat(dir, name, d.mode), "chmod", &d.path)?;
            }
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => bind_device(root, d),
        Err(e) => ctx(Err(e), "mknod", &d.path),
    }
}

/// A node deeper than /dev (`/dev/net/tun`): its directory resolved in the
/// root and made, then as [`create_device_at`].
fn create_device(root: &Path, d: &DevicePlan) -> Result<(), MountError> {
    let path = ctx(secure_join(root, &d.path), "resolve", &d.path)?;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        let invalid = io::Error::from(io::ErrorKind::InvalidInput);
        return ctx(Err(invalid), "resolve", &d.path);
    };
    ctx(mkdir_p(parent), "create", parent)?;
    let dir = ctx(sys::open_dir_path(parent), "open", parent)?;
    create_device_at(root, &dir, name, d)
}

/// Where mknod is refused: the guest's node bind-mounted on a file there.
fn bind_device(root: &Path, d: &DevicePlan) -> Result<(), MountError> {
    let path = ctx(secure_join(root, &d.path), "resolve", &d.path)?;
    ctx(create_file(&path), "create", &path)?;
    ctx(
        sys::mount(Some(&d.path), &path, None, libc::MS_BIND, None),
        "bind-mount on",
        &path,
    )
}

/// Binds the terminal (`/proc/self/fd/N` of its slave) onto `/dev/console`.
pub fn bind_console(root: &Path, slave_fd: i32) -> Result<(), MountError> {
    let console = root.join("dev/console");
    ctx(create_file(&console), "create", &console)?;
    let src = PathBuf::from(format!("/proc/self/fd/{slave_fd}"));
    ctx(
        sys::mount(Some(&src), &console, None, libc::MS_BIND, None),
        "bind-mount on",
        &console,
    )
}

/// Whether `p` is a character device (used by tests and /dev checks).
pub fn is_char_device(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.file_type().is_char_device())
}
