//! A directory tree as a read-only ext4 image, built by `mkfs.ext4 -d`
//! (e2fsprogs, no mounting needed) and cached by a fingerprint of the tree,
//! so N VMs of one rootfs share one image on disk.
//!
//! The tree is the caller's, so it is hostile input: mkfs reads it with
//! the tree owner's uid (a root-owned tree: as root), through a descriptor
//! of the directory that was fingerprinted, so a directory swapped for a
//! symlink (to /root, say) cannot make root copy what the owner could not
//! read. The cache is private (0700, images 0600); a hit marks the image
//! used, and after each build the least recently used images beyond
//! [`KEEP_IMAGES`] that nothing used for an hour are removed.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The source tree could not be read.
    #[error("cannot read rootfs {0}: {1}")]
    Read(String, #[source] std::io::Error),
    /// The source is not a directory.
    #[error("rootfs {0} is not a directory")]
    NotADirectory(String),
    /// The cache directory could not be written.
    #[error("cannot write image cache {0}: {1}")]
    Cache(String, #[source] std::io::Error),
    /// mkfs.ext4 is missing.
    #[error("mkfs.ext4 not found (install e2fsprogs)")]
    NoMkfs,
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 failed for {0}: {1}")]
    Mkfs(String, String),
}

/// What a tree contains, for sizing the image.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeSize {
    /// Bytes of file data, each file rounded up to 4 KiB blocks.
    pub data_bytes: u64,
    /// Files, directories, links and nodes.
    pub inodes: u64,
}

/// Cached images kept beyond those used within the last hour.
pub const KEEP_IMAGES: usize = 32;

/// How long an image must have gone unused before it may be evicted.
const EVICT_AFTER: Duration = Duration::from_secs(3600);

/// Walks `root` (without following symlinks), hashing every entry's path,
/// type, mode, owner, size, mtime, ctime, inode and link target. Content
/// is not read (that would cost a full read of the tree per run); a write
/// moves ctime, which no one but the kernel sets, so an edit whose size and
/// mtime were put back is still seen (git's index does the same).
pub fn fingerprint(root: &Path) -> Result<(String, TreeSize), Ext4Error> {
    let shown = root.display().to_string();
    let meta = fs::symlink_metadata(root).map_err(|e| Ext4Error::Read(shown.clone(), e))?;
    if !meta.is_dir() {
        return Err(Ext4Error::NotADirectory(shown));
    }
    walk(root, root)
}

/// [`fingerprint`] of the directory `root` (e.g. a `/proc/self/fd` path),
/// naming paths under `shown` in errors.
fn walk(root: &Path, shown: &Path) -> Result<(String, TreeSize), Ext4Error> {
    let read_err = |rel: &Path, e| Ext4Error::Read(shown.join(rel).display().to_string(), e);
    let mut hasher = Sha256::new();
    let mut size = TreeSize::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| read_err(&rel, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| read_err(&rel, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = rel.join(entry.file_name());
            let m = fs::symlink_metadata(entry.path()).map_err(|e| read_err(&path, e))?;
            size.inodes += 1;
            hasher.update(path.as_os_str().as_encoded_bytes());
            hasher.update([0]);
            for v in [
                m.mode() as u64,
                m.uid() as u64,
                m.gid() as u64,
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.ctime() as u64,
                m.ctime_nsec() as u64,
                m.ino(),
                m.rdev(),
            ] {
                hasher.update(v.to_le_bytes());
            }
            if m.file_type().is_symlink() {
                let target = fs::read_link(entry.path()).map_err(|e| read_err(&path, e))?;
                hasher.update(target.as_os_str().as_encoded_bytes());
                hasher.update([0]);
            } else if m.is_dir() {
                size.data_bytes += 4096;
                stack.push(path);
            } else {
                size.data_bytes += m.size().div_ceil(4096) * 4096;
            }
        }
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, size))
}

/// Image size for a tree: data plus inode tables and metadata, with room
/// to spare, rounded to 1 MiB.
pub fn image_size(t: TreeSize) -> u64 {
    let raw = t.data_bytes + t.inodes * 512 + t.data_bytes / 8 + (16 << 20);
    raw.div_ceil(1 << 20) << 20
}

/// The read-only ext4 image of `tree`, from `cache_dir` if one was built
/// already, otherwise built now. Returns its path.
pub fn image_for_dir(tree: &Path, cache_dir: &Path) -> Result<PathBuf, Ext4Error> {
    let shown_tree = tree.display().to_string();
    // The directory fingerprinted is the one mkfs reads (by descriptor).
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(tree)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) | Some(libc::ELOOP) => Ext4Error::NotADirectory(shown_tree.clone()),
            _ => Ext4Error::Read(shown_tree.clone(), e),
        })?;
    let owner = dir
        .metadata()
        .map_err(|e| Ext4Error::Read(shown_tree.clone(), e))?;
    let (key, size) = walk(&fd_path(&dir), tree)?;
    let out = cache_dir.join(format!("rootfs-{}.ext4", &key[..32]));
    if out.exists() {
        mark_used(&out);
        return Ok(out);
    }
    let shown = cache_dir.display().to_string();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)
        .map_err(|e| Ext4Error::Cache(shown.clone(), e))?;
    let _ = fs::set_permissions(cache_dir, fs::Permissions::from_mode(0o700));
    let tmp = cache_dir.join(format!(".rootfs-{}.{}.tmp", &key[..32], std::process::id()));
    let result = build_as(&dir, (owner.uid(), owner.gid()), &tmp, size)
        .and_then(|()| fs::rename(&tmp, &out).map_err(|e| Ext4Error::Cache(shown.clone(), e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    evict(cache_dir, KEEP_IMAGES, EVICT_AFTER);
    Ok(out)
}

/// `/proc/self/fd/N`: the open file itself, whatever its path now names.
fn fd_path(f: &fs::File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Records a use (the mtime of a finished image is otherwise never set).
fn mark_used(image: &Path) {
    if let Ok(f) = fs::File::open(image) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Removes the least recently used images beyond `keep`, of those unused
/// for `min_idle` (another run may be about to open a recent one), and
/// what builds whose process died left behind.
pub fn evict(cache_dir: &Path, keep: usize, min_idle: Duration) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut images = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(m) = e.metadata() else { continue };
        let idle = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        if name.starts_with("rootfs-") && name.ends_with(".ext4") {
            images.push((idle, e.path()));
        } else if name.starts_with(".rootfs-") {
            // `.rootfs-KEY.PID.tmp`: gone with its builder (as template
            // builds are swept in husk-runtime).
            let pid = name
                .strip_suffix(".tmp")
                .and_then(|n| n.rsplit('.').next())
                .and_then(|p| p.parse::<u32>().ok())
                .filter(|&p| p > 0);
            if pid.is_some_and(|p| !Path::new("/proc").join(p.to_string()).exists()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    images.sort();
    for (idle, path) in images.iter().skip(keep) {
        if *idle >= min_idle {
            let _ = fs::remove_file(path);
        }
    }
}

/// Runs `mkfs.ext4 -d` for `tree` into `out`.
pub fn build(tree: &Path, out: &Path, size: TreeSize) -> Result<(), Ext4Error> {
    let dir = fs::File::open(tree).map_err(|e| Ext4Error::Read(tree.display().to_string(), e))?;
    build_as(&dir, (0, 0), out, size)
}

/// Runs `mkfs.ext4 -d` over the open directory `tree` into a new `out`,
/// as `owner` (uid, gid) unless that is root; `out` is 0600, root's once
/// built.
fn build_as(
    tree: &fs::File,
    owner: (u32, u32),
    out: &Path,
    size: TreeSize,
) -> Result<(), Ext4Error> {
    let shown = out.display().to_string();
    let cache = |e| Ext4Error::Cache(shown.clone(), e);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .map_err(cache)?;
    // Sparse: only what mkfs writes takes disk space.
    f.set_len(image_size(size)).map_err(cache)?;
    (&f).flush().map_err(cache)?;
    let drop_to = (owner.0 != 0).then_some(owner);
    if let Some((uid, gid)) = drop_to {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(cache)?;
    }
    // mkfs gets both as /proc/self/fd paths: the tree it reads is the
    // directory that was fingerprinted, and the image needs no path the
    // owner could reach (the cache is root's, 0700).
    let (tree_fd, out_fd) = (tree.as_raw_fd(), f.as_raw_fd());
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-b", "4096", "-m", "0", "-I", "256"])
        .args(["-N", &(size.inodes + 64).to_string()])
        // No journal: the image is only ever mounted read-only.
        .args([
            "-O",
            "^has_journal,^resize_inode",
            "-E",
            "root_owner=0:0",
            "-L",
            "husk-rootfs",
        ])
        .arg("-d")
        .arg(format!("/proc/self/fd/{tree_fd}"))
        .arg(format!("/proc/self/fd/{out_fd}"));
    if let Some((uid, gid)) = drop_to {
        // std drops the supplementary groups too when root sets a uid.
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: only fcntl, which is async-signal-safe, runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [tree_fd, out_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let result = match cmd.output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Ext4Error::NoMkfs),
        Err(e) => Err(Ext4Error::Mkfs(shown.clone(), e.to_string())),
        Ok(o) if !o.status.success() => Err(Ext4Error::Mkfs(
            shown.clone(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        )),
        Ok(_) => Ok(()),
    };
    if drop_to.is_some() {
        std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(cache)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-ext4-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::write(d.join("etc/hostname"), b"husk\n").unwrap();
        fs::write(d.join("big"), vec![7u8; 100_000]).unwrap();
        symlink("etc/hostname", d.join("link")).unwrap();
        d
    }

    fn debugfs(img: &Path, cmd: &str) -> String {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(cmd)
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    #[test]
    fn fingerprint_follows_metadata_changes() {
        let d = tree("fp");
        let (a, size) = fingerprint(&d).unwrap();
        assert_eq!(size.inodes, 4);
        assert_eq!(
            size.data_bytes,
            4096 + 4096 + 100_000u64.div_ceil(4096) * 4096
        );
        assert_eq!(fingerprint(&d).unwrap().0, a);
        fs::write(d.join("etc/hostname"), b"other-name\n").unwrap();
        let b = fingerprint(&d).unwrap().0;
        assert_ne!(b, a);
        // Same size, mtime put back: ctime still moved.
        let f = fs::File::options()
            .write(true)
            .open(d.join("etc/hostname"))
            .unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::io::Write::write_all(&mut &f, b"OTHER-NAME\n").unwrap();
        f.set_modified(mtime).unwrap();
        assert_ne!(fingerprint(&d).unwrap().0, b);
        assert!(matches!(
            fingerprint(&d.join("big")),
            Err(Ext4Error::NotADirectory(_))
        ));
        assert!(fingerprint(&d.join("missing")).is_err());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn image_holds_the_tree_and_is_cached() {
        let d = tree("img");
        let cache = d.with_extension("cache");
        let img = image_for_dir(&d, &cache).unwrap();
        assert_eq!(debugfs(&img, "cat /etc/hostname"), "husk\n");
        assert!(debugfs(&img, "stat /link").contains("Fast link dest: \"etc/hostname\""));
        let ino = fs::metadata(&img).unwrap().ino();
        assert_eq!(image_for_dir(&d, &cache).unwrap(), img);
        assert_eq!(
            fs::metadata(&img).unwrap().ino(),
            ino,
            "reused, not rebuilt"
        );
        // Private: the image holds the caller's files.
        assert_eq!(fs::metadata(&img).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
        // Sparse: the 16+ MiB image uses far less disk.
        let m = fs::metadata(&img).unwrap();
        assert!(m.blocks() * 512 < m.len() / 2);
        assert_eq!(
            fs::read_dir(&cache).unwrap().count(),
            1,
            "no temp files left"
        );
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn mkfs_reads_a_users_tree_as_that_user() {
        // A tree owned by uid 4242 with a file only root may read: the
        // owner could not read it, so the image must not hold it.
        let d = tree("owner");
        let cache = d.with_extension("cache");
        fs::write(d.join("etc/secret"), b"root only\n").unwrap();
        fs::set_permissions(d.join("etc/secret"), fs::Permissions::from_mode(0o600)).unwrap();
        for p in ["", "etc", "etc/hostname", "big", "link"] {
            std::os::unix::fs::lchown(d.join(p), Some(4242), Some(4242)).unwrap();
        }
        // The user's tree is world-traversable, as a home directory may be.
        let e = image_for_dir(&d, &cache).unwrap_err().to_string();
        assert!(e.contains("mkfs.ext4 failed"), "{e}");
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0, "nothing left");
        // Once the owner may read it, it builds, and the image is root's.
        std::os::unix::fs::lchown(d.join("etc/secret"), Some(4242), Some(4242)).unwrap();
        let img = image_for_dir(&d, &cache).unwrap();
        assert_eq!(debugfs(&img, "cat /etc/secret"), "root only\n");
        assert_eq!(fs::metadata(&img).unwrap().uid(), 0);
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn the_tree_must_be_a_directory_not_a_link_to_one() {
        let d = tree("link-root");
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        symlink(&d, &link).unwrap();
        let cache = d.with_extension("cache");
        assert!(matches!(
            image_for_dir(&link, &cache),
            Err(Ext4Error::NotADirectory(_))
        ));
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn eviction_keeps_the_recent_and_the_newest() {
        let cache = std::env::temp_dir().join(format!("husk-ext4-evict-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(&cache).unwrap();
        let now = SystemTime::now();
        let hours = |h: u64| now - Duration::from_secs(h * 3600);
        for (name, used) in [
            ("a", hours(5)),
            ("b", hours(4)),
            ("c", hours(3)),
            ("d", now),
        ] {
            let p = cache.join(format!("rootfs-{name}.ext4"));
            fs::write(&p, b"x").unwrap();
            fs::File::open(&p).unwrap().set_modified(used).unwrap();
        }
        // A dead build's leftover goes; a live one's stays.
        fs::write(cache.join(".rootfs-x.999999999.tmp"), b"").unwrap();
        let live = format!(".rootfs-y.{}.tmp", std::process::id());
        fs::write(cache.join(&live), b"").unwrap();
        // Keep 1: only images idle for an hour go, oldest first.
        evict(&cache, 1, Duration::from_secs(3600));
        let mut left: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [live.as_str(), "rootfs-d.ext4"]);
        fs::write(cache.join("rootfs-e.ext4"), b"x").unwrap();
        evict(&cache, 1, Duration::from_secs(3600));
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 3, "recent ones stay");
        fs::remove_dir_all(&cache).unwrap();
    }
}
