//! A directory tree as a read-only ext4 image, built by `mkfs.ext4 -d`
//! (e2fsprogs, no mounting needed) and cached by a fingerprint of the tree,
//! so N VMs of one rootfs share one image on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Walks `root` (without following symlinks), hashing every entry's path,
/// type, mode, owner, size, mtime and link target. Content is not read:
/// a change that keeps size and mtime is not seen, as with `make`.
pub fn fingerprint(root: &Path) -> Result<(String, TreeSize), Ext4Error> {
    let shown = root.display().to_string();
    let meta = fs::symlink_metadata(root).map_err(|e| Ext4Error::Read(shown.clone(), e))?;
    if !meta.is_dir() {
        return Err(Ext4Error::NotADirectory(shown));
    }
    let mut hasher = Sha256::new();
    let mut size = TreeSize::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| Ext4Error::Read(dir.display().to_string(), e))?
            .collect::<Result<_, _>>()
            .map_err(|e| Ext4Error::Read(dir.display().to_string(), e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = rel.join(entry.file_name());
            let m = fs::symlink_metadata(entry.path())
                .map_err(|e| Ext4Error::Read(entry.path().display().to_string(), e))?;
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
                m.rdev(),
            ] {
                hasher.update(v.to_le_bytes());
            }
            if m.file_type().is_symlink() {
                let target = fs::read_link(entry.path())
                    .map_err(|e| Ext4Error::Read(entry.path().display().to_string(), e))?;
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
    let (key, size) = fingerprint(tree)?;
    let out = cache_dir.join(format!("rootfs-{}.ext4", &key[..32]));
    if out.exists() {
        return Ok(out);
    }
    let shown = cache_dir.display().to_string();
    fs::create_dir_all(cache_dir).map_err(|e| Ext4Error::Cache(shown.clone(), e))?;
    let tmp = cache_dir.join(format!(".rootfs-{}.{}.tmp", &key[..32], std::process::id()));
    let result = build(tree, &tmp, size)
        .and_then(|()| fs::rename(&tmp, &out).map_err(|e| Ext4Error::Cache(shown.clone(), e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| out)
}

/// Runs `mkfs.ext4 -d` for `tree` into `out`.
pub fn build(tree: &Path, out: &Path, size: TreeSize) -> Result<(), Ext4Error> {
    let shown = out.display().to_string();
    {
        let f = fs::File::create(out).map_err(|e| Ext4Error::Cache(shown.clone(), e))?;
        // Sparse: only what mkfs writes takes disk space.
        f.set_len(image_size(size))
            .map_err(|e| Ext4Error::Cache(shown.clone(), e))?;
        let mut f = f;
        f.flush().map_err(|e| Ext4Error::Cache(shown.clone(), e))?;
    }
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-I", "256"])
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
        .arg(tree)
        .arg(out)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Ext4Error::NoMkfs),
        Err(e) => Err(Ext4Error::Mkfs(shown, e.to_string())),
        Ok(o) if !o.status.success() => Err(Ext4Error::Mkfs(
            shown,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        )),
        Ok(_) => Ok(()),
    }
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
        assert_ne!(fingerprint(&d).unwrap().0, a);
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
        let mtime = fs::metadata(&img).unwrap().modified().unwrap();
        assert_eq!(image_for_dir(&d, &cache).unwrap(), img);
        assert_eq!(
            fs::metadata(&img).unwrap().modified().unwrap(),
            mtime,
            "reused, not rebuilt"
        );
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
}
