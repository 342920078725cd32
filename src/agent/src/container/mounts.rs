//! Mount options, the container root (read-only disk + overlayfs upper),
//! OCI mounts, a minimal /dev (`mounts/dev.rs`), and pivot_root. The
//! functions that mount run in the container's child process, inside its
//! new mount namespace.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use husk_proto::{Rootfs, Scratch};

use super::plan::{ContainerPlan, MountPlan};
use crate::sys;

mod dev;

pub use dev::{bind_console, is_char_device, setup_dev, DEFAULT_DEVICES};

/// Parsed fstab-style options of one mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `MS_*` flags to set.
    pub flags: u64,
    /// Propagation changes (`MS_PRIVATE`, `MS_SLAVE | MS_REC`...), applied
    /// after the mount.
    pub propagation: Vec<u64>,
    /// Filesystem-specific options, comma-joined (`mode=755,size=64k`).
    pub data: String,
    /// `bind` or `rbind` was given.
    pub bind: bool,
}

const MS_FLAG_OPTIONS: &[(&str, bool, u64)] = &[
    // (name, clear?, flag)
    ("async", true, libc::MS_SYNCHRONOUS),
    ("atime", true, libc::MS_NOATIME),
    ("bind", false, libc::MS_BIND),
    ("defaults", false, 0),
    ("dev", true, libc::MS_NODEV),
    ("diratime", true, libc::MS_NODIRATIME),
    ("dirsync", false, libc::MS_DIRSYNC),
    ("exec", true, libc::MS_NOEXEC),
    ("mand", false, libc::MS_MANDLOCK),
    ("noatime", false, libc::MS_NOATIME),
    ("nodev", false, libc::MS_NODEV),
    ("nodiratime", false, libc::MS_NODIRATIME),
    ("noexec", false, libc::MS_NOEXEC),
    ("nomand", true, libc::MS_MANDLOCK),
    ("norelatime", true, libc::MS_RELATIME),
    ("nostrictatime", true, libc::MS_STRICTATIME),
    ("nosuid", false, libc::MS_NOSUID),
    ("rbind", false, libc::MS_BIND | libc::MS_REC),
    ("relatime", false, libc::MS_RELATIME),
    ("remount", false, libc::MS_REMOUNT),
    ("ro", false, libc::MS_RDONLY),
    ("rw", true, libc::MS_RDONLY),
    ("strictatime", false, libc::MS_STRICTATIME),
    ("suid", true, libc::MS_NOSUID),
    ("sync", false, libc::MS_SYNCHRONOUS),
];

/// The mount flags of a propagation option name.
pub fn propagation_flag(name: &str) -> Option<u64> {
    Some(match name {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

/// Parses OCI mount options the way runc does: known flag names set or
/// clear `MS_*` flags, propagation names are kept apart, anything else is
/// filesystem data. Options that need a feature the agent lacks are errors.
pub fn parse_mount_options(options: &[String]) -> Result<MountOptions, String> {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_str();
        if let Some(&(_, clear, flag)) = MS_FLAG_OPTIONS.iter().find(|(n, _, _)| *n == opt) {
            if clear {
                out.flags &= !flag;
            } else {
                out.flags |= flag;
            }
            if opt == "bind" || opt == "rbind" {
                out.bind = true;
            }
        } else if let Some(p) = propagation_flag(opt) {
            out.propagation.push(p);
        } else if matches!(opt, "idmap" | "ridmap") {
            return Err(format!(
                "mount option {opt} (id-mapped mounts) is not supported"
            ));
        } else if opt.starts_with("x-") || opt == "tmpcopyup" {
            // Userspace-only options (fstab helpers, crun's tmpcopyup).
        } else if !opt.is_empty() {
            data.push(opt);
        }
    }
    out.data = data.join(",");
    Ok(out)
}

/// Errors while building the container's filesystem.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct MountError {
    /// What was being done.
    pub what: &'static str,
    /// On which path.
    pub path: PathBuf,
    /// Why it failed.
    #[source]
    pub source: io::Error,
}

fn ctx<T>(r: io::Result<T>, what: &'static str, path: &Path) -> Result<T, MountError> {
    r.map_err(|source| MountError {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Resolves `unsafe_path` inside `root` the way the container would see it,
/// following symlinks but never leaving `root` (like runc's securejoin).
/// Missing components are appended as they are.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new(); // relative to root
    let mut pending: Vec<PathBuf> = vec![unsafe_path.to_owned()];
    let mut links = 0;
    while let Some(p) = pending.pop() {
        let mut comps: Vec<Component> = p.components().collect();
        comps.reverse();
        while let Some(c) = comps.pop() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let candidate = resolved.join(name);
                    match fs::symlink_metadata(root.join(&candidate)) {
                        Ok(m) if m.file_type().is_symlink() => {
                            links += 1;
                            if links > 40 {
                                return Err(io::Error::from_raw_os_error(libc::ELOOP));
                            }
                            let target = fs::read_link(root.join(&candidate))?;
                            if target.is_absolute() {
                                resolved = PathBuf::new();
                            }
                            // Resolve the link target, then the rest.
                            let rest: PathBuf = comps.iter().rev().collect();
                            pending.push(rest);
                            pending.push(target);
                            comps.clear();
                        }
                        _ => resolved = candidate,
                    }
                }
            }
        }
    }
    Ok(root.join(resolved))
}

/// Mounts the container's root filesystem at `<staging>/root` and returns
/// that path. `staging` lives on the agent's tmpfs; everything is mounted
/// in the caller's (new, private) mount namespace.
pub fn mount_rootfs(
    staging: &Path,
    rootfs: &Rootfs,
    scratch: &Scratch,
) -> Result<PathBuf, MountError> {
    let root = staging.join("root");
    ctx(mkdir_p(staging), "create", staging)?;
    if rootfs.fstype != "bind" {
        settle_device(&rootfs.device, rootfs.size_bytes)?;
    }
    if !rootfs.read_only {
        ctx(fs::create_dir_all(&root), "create", &root)?;
        mount_source(&rootfs.device, &root, &rootfs.fstype, false)?;
        return Ok(root);
    }
    let scratch_dir = staging.join("scratch");
    ctx(fs::create_dir_all(&scratch_dir), "create", &scratch_dir)?;
    match scratch {
        Scratch::Tmpfs { size_bytes } => {
            let data = match size_bytes {
                Some(n) => format!("mode=0755,size={n}"),
                None => "mode=0755".to_owned(),
            };
            ctx(
                sys::mount(
                    Some(Path::new("tmpfs")),
                    &scratch_dir,
                    Some("tmpfs"),
                    0,
                    Some(&data),
                ),
                "mount scratch tmpfs on",
                &scratch_dir,
            )?;
        }
        Scratch::Device { device, fstype } => {
            mount_source(device, &scratch_dir, fstype, false)?;
        }
    }
    let lower = staging.join("lower");
    let upper = scratch_dir.join("upper");
    let work = scratch_dir.join("work");
    for d in [&lower, &upper, &work, &root] {
        ctx(fs::create_dir_all(d), "create", d)?;
    }
    mount_source(&rootfs.device, &lower, &rootfs.fstype, true)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    ctx(
        sys::mount(
            Some(Path::new("overlay")),
            &root,
            Some("overlay"),
            0,
            Some(&data),
        ),
        "mount overlay on",
        &root,
    )?;
    Ok(root)
}

/// How long the guest may take to see a disk's new size after a restore.
const RESIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes a disk safe to mount in a VM restored from a template, where it
/// replaced the placeholder the template booted with: waits until the
/// guest sees `size_bytes` (the configuration-change interrupt is handled
/// by a kernel worker), then drops any block the placeholder left cached.
fn settle_device(dev: &Path, size_bytes: Option<u64>) -> Result<(), MountError> {
    // The device's own size (BLKGETSIZE64) rather than sysfs: one open for
    // both, and no sysfs lookups, slow where guest kernel code is emulated.
    let f = ctx(fs::File::open(dev), "open", dev)?;
    if let Some(want) = size_bytes {
        let deadline = std::time::Instant::now() + RESIZE_WAIT;
        // The guest rounds down to whole sectors.
        while sys::block_size_bytes(&f).ok() != Some(want / 512 * 512)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    ctx(sys::flush_block_cache(&f), "flush the cache of", dev)
}

/// Mounts a device (or, with fstype `bind`, a directory) at `target`.
fn mount_source(
    source: &Path,
    target: &Path,
    fstype: &str,
    read_only: bool,
) -> Result<(), MountError> {
    let ro = if read_only { libc::MS_RDONLY } else { 0 };
    if fstype == "bind" {
        let flags = libc::MS_BIND | libc::MS_REC;
        ctx(
            sys::mount(Some(source), target, None, flags, None),
            "bind-mount",
            source,
        )?;
        if read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            ctx(
                sys::mount(None, target, None, flags, None),
                "remount read-only",
                target,
            )?;
        }
        return Ok(());
    }
    ctx(
        sys::mount(Some(source), target, Some(fstype), ro, None),
        "mount",
        source,
    )
}

fn mkdir_p(p: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o755).create(p)
}

/// Performs the OCI mounts under `root`, in order.
pub fn mount_all(
    root: &Path,
    plan: &ContainerPlan,
    cgroup_dirs: &[PathBuf],
) -> Result<(), MountError> {
    for m in &plan.mounts {
        mount_one(root, m, cgroup_dirs)?;
    }
    Ok(())
}

fn mount_one(root: &Path, m: &MountPlan, cgroup_dirs: &[PathBuf]) -> Result<(), MountError> {
    let dest = ctx(secure_join(root, &m.destination), "resolve", &m.destination)?;
    let opts = &m.options;
    if m.is_bind() {
        let source = m.source.as_deref().unwrap_or(Path::new(""));
        let meta = ctx(fs::metadata(source), "bind source", source)?;
        if meta.is_dir() {
            ctx(mkdir_p(&dest), "create", &dest)?;
        } else {
            ctx(create_file(&dest), "create", &dest)?;
        }
        let flags = libc::MS_BIND | (opts.flags & libc::MS_REC);
        ctx(
            sys::mount(Some(source), &dest, None, flags, None),
            "bind-mount on",
            &dest,
        )?;
        let extra = opts.flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if extra != 0 {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | extra;
            ctx(sys::mount(None, &dest, None, flags, None), "remount", &dest)?;
        }
    } else if matches!(m.fstype.as_deref(), Some("cgroup" | "cgroup2")) {
        mount_cgroup(&dest, opts.flags, cgroup_dirs)?;
    } else {
        ctx(mkdir_p(&dest), "create", &dest)?;
        let fstype = m.fstype.as_deref();
        let source = m.source.as_deref().or(fstype.map(Path::new));
        ctx(
            sys::mount(source, &dest, fstype, opts.flags, Some(&opts.data)),
            "mount",
            &dest,
        )?;
    }
    for &p in &opts.propagation {
        ctx(
            sys::mount(None, &dest, None, p, None),
            "set propagation of",
            &dest,
        )?;
    }
    Ok(())
}

/// `/sys/fs/cgroup` in the container: cgroup2 when the guest uses it,
/// otherwise a tmpfs with the container's v1 cgroup directories bound in.
fn mount_cgroup(dest: &Path, flags: u64, cgroup_dirs: &[PathBuf]) -> Result<(), MountError> {
    ctx(mkdir_p(dest), "create", dest)?;
    let flags = flags & (libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return ctx(sys::mount_cgroup2(dest, flags), "mount", dest);
    }
    let tmpfs = Path::new("tmpfs");
    let data = "mode=0755";
    ctx(
        sys::mount(
            Some(tmpfs),
            dest,
            Some("tmpfs"),
            flags & !libc::MS_RDONLY,
            Some(data),
        ),
        "mount",
        dest,
    )?;
    for dir in cgroup_dirs {
        let Some(controller) = controller_of(dir) else {
            continue;
        };
        let target = dest.join(controller);
        ctx(mkdir_p(&target), "create", &target)?;
        ctx(
            sys::mount(Some(dir), &target, None, libc::MS_BIND, None),
            "bind-mount on",
            &target,
        )?;
        if flags & libc::MS_RDONLY != 0 {
            let f = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            ctx(sys::mount(None, &target, None, f, None), "remount", &target)?;
        }
    }
    if flags & libc::MS_RDONLY != 0 {
        let f = libc::MS_REMOUNT | libc::MS_RDONLY | flags;
        ctx(
            sys::mount(Some(tmpfs), dest, Some("tmpfs"), f, Some(data)),
            "remount",
            dest,
        )?;
    }
    Ok(())
}

/// `/sys/fs/cgroup/memory/a/b` -> `memory`: the hierarchy directory name.
fn controller_of(mut p: &Path) -> Option<String> {
    while let Some(parent) = p.parent() {
        if parent == Path::new("/sys/fs/cgroup") {
            return p.file_name().map(|n| n.to_string_lossy().into_owned());
        }
        p = parent;
    }
    None
}

fn create_file(p: &Path) -> io::Result<()> {
    if let Some(parent) = p.parent() {
        mkdir_p(parent)?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
    {
        Ok(_) => Ok(()),
        // Already there, e.g. a read-only file or a device node.
        Err(_) if p.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes `root` the process's root with pivot_root (old root detached). If
/// pivot_root is impossible (a root that is still the initramfs), falls
/// back to moving the mount over `/` and chroot, like `runc --no-pivot`.
pub fn enter_root(root: &Path) -> Result<(), MountError> {
    ctx(std::env::set_current_dir(root), "chdir", root)?;
    let dot = Path::new(".");
    match sys::pivot_root(dot, dot) {
        Ok(()) => {
            // The old root is stacked under the new one at "."; detach it.
            let flags = libc::MS_SLAVE | libc::MS_REC;
            ctx(
                sys::mount(None, dot, None, flags, None),
                "make old root a slave",
                root,
            )?;
            ctx(sys::umount2(dot, libc::MNT_DETACH), "detach old root", root)?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            ctx(
                sys::mount(Some(dot), Path::new("/"), None, libc::MS_MOVE, None),
                "move root",
                root,
            )?;
            ctx(sys::chroot(dot), "chroot", root)?;
        }
        Err(e) => return ctx(Err(e), "pivot_root", root),
    }
    ctx(std::env::set_current_dir("/"), "chdir", Path::new("/"))
}

/// After pivot_root: masked paths, read-only paths, root propagation and a
/// read-only root.
pub fn finish_root(plan: &ContainerPlan) -> Result<(), MountError> {
    for p in &plan.masked_paths {
        match fs::metadata(p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return ctx(Err(e), "stat", p),
            Ok(m) if m.is_dir() => {
                let flags = libc::MS_RDONLY;
                ctx(
                    sys::mount(Some(Path::new("tmpfs")), p, Some("tmpfs"), flags, None),
                    "mask",
                    p,
                )?;
            }
            Ok(_) => {
                ctx(
                    sys::mount(Some(Path::new("/dev/null")), p, None, libc::MS_BIND, None),
                    "mask",
                    p,
                )?;
            }
        }
    }
    for p in &plan.readonly_paths {
        if !p.exists() {
            continue;
        }
        let flags = libc::MS_BIND | libc::MS_REC;
        ctx(sys::mount(Some(p), p, None, flags, None), "bind-mount", p)?;
        remount_ro(p)?;
    }
    if let Some(flags) = plan.root_propagation {
        ctx(
            sys::mount(None, Path::new("/"), None, flags, None),
            "set propagation of",
            Path::new("/"),
        )?;
    }
    if plan.root_readonly {
        remount_ro(Path::new("/"))?;
    }
    Ok(())
}

/// Remounts a bind mount read-only, keeping the flags the kernel locks
/// (nosuid, nodev, noexec) so the remount is not refused.
fn remount_ro(p: &Path) -> Result<(), MountError> {
    let locked = mount_flags(p).unwrap_or(0);
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked;
    ctx(
        sys::mount(None, p, None, flags, None),
        "remount read-only",
        p,
    )
}

fn mount_flags(p: &Path) -> io::Result<u64> {
    let c = sys::cpath(p)?;
    // SAFETY: statvfs is plain data; the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}
