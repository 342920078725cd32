//! Applying OCI image layers (tar, tar+gzip, tar+zstd) to a directory:
//! whiteouts, opaque directories, hard and symbolic links, device nodes,
//! fifos, ownership, modes, mtimes and xattrs.
//!
//! Layers are hostile input. An entry may only create or remove things
//! inside the root: absolute paths, `..` components and any path whose
//! parent is a symlink (planted by an earlier layer or entry and then
//! written through) are rejected, naming the layer and the path. Symlinks
//! are never followed on the host: only their text is stored.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Prefix of a whiteout file.
const WHITEOUT: &str = ".wh.";
/// Name of the opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An entry would land outside the root or write through a symlink.
    #[error("layer {layer}: refused entry {path:?}: {why}")]
    Unsafe {
        /// Layer digest.
        layer: String,
        /// Path as written in the tar.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The tar stream is malformed or uses an unsupported feature.
    #[error("layer {layer}: {what}")]
    Format {
        /// Layer digest.
        layer: String,
        /// What is wrong.
        what: String,
    },
    /// Reading the layer or writing the tree failed.
    #[error("layer {layer}: {path}: {source}")]
    Io {
        /// Layer digest.
        layer: String,
        /// The file concerned.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The uncompressed layer does not match the config's diff_id.
    #[error(
        "layer {layer}: uncompressed digest {actual} does not match the image config's {expected}"
    )]
    DiffId {
        /// Layer digest.
        layer: String,
        /// From the image config.
        expected: String,
        /// What was read.
        actual: String,
    },
}

/// Directory mtimes are set after every layer is applied (adding children
/// changes them).
#[derive(Debug, Default)]
pub struct Applier {
    dir_times: Vec<(PathBuf, u64)>,
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The decompressed stream of a layer blob, chosen by its magic bytes
/// (gzip, zstd, or a plain tar).
pub fn decompress<'a, R: Read + 'a>(blob: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(256 * 1024, blob);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// The parts of a tar path below the root; `Err` for absolute paths and
/// `..`.
fn relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
            Component::ParentDir => return Err("path contains '..'"),
        }
    }
    Ok(out)
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes whatever is at `p` (a file, a symlink, or a whole directory),
/// never following a symlink.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One tar entry's metadata, with pax overrides applied.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Applier {
    /// A fresh applier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one layer (a decompressed tar stream) on top of `root`.
    /// With `diff_id`, the uncompressed stream must hash to it.
    pub fn apply<R: Read>(
        &mut self,
        root: &Path,
        layer: &str,
        tar: R,
        diff_id: Option<&str>,
    ) -> Result<(), LayerError> {
        let io_err = |path: &Path, source| LayerError::Io {
            layer: layer.to_string(),
            path: path.display().to_string(),
            source,
        };
        let format = |what: String| LayerError::Format {
            layer: layer.to_string(),
            what,
        };
        let hashing = HashingReader {
            inner: tar,
            hasher: Sha256::new(),
        };
        let mut archive = tar::Archive::new(hashing);
        let mut created: HashSet<PathBuf> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|e| format(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format(format!("bad tar entry: {e}")))?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() {
                continue;
            }
            let raw = entry
                .path()
                .map_err(|e| format(format!("bad entry path: {e}")))?
                .into_owned();
            let shown = raw.display().to_string();
            let unsafe_entry = |why| LayerError::Unsafe {
                layer: layer.to_string(),
                path: shown.clone(),
                why,
            };
            let rel = relative(&raw).map_err(unsafe_entry)?;
            let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
                continue; // "./": the root itself keeps root's metadata
            };
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let parent = self
                .prepare_parent(root, &parent_rel)
                .map_err(|e| match e {
                    ParentError::Symlink => unsafe_entry("a parent directory is a symlink"),
                    ParentError::Io(p, e) => io_err(&p, e),
                })?;
            let name_str = name.to_string_lossy();
            if name_str == OPAQUE {
                let entries = fs::read_dir(&parent).map_err(|e| io_err(&parent, e))?;
                for child in entries {
                    let child = child.map_err(|e| io_err(&parent, e))?;
                    if !created.contains(&parent_rel.join(child.file_name())) {
                        remove_any(&child.path()).map_err(|e| io_err(&child.path(), e))?;
                    }
                }
                continue;
            }
            if let Some(hidden) = name_str.strip_prefix(WHITEOUT) {
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(unsafe_entry("malformed whiteout"));
                }
                let victim = parent.join(hidden);
                remove_any(&victim).map_err(|e| io_err(&victim, e))?;
                continue;
            }
            let target = parent.join(&name);
            let meta = Self::meta(&mut entry).map_err(|e| io_err(&target, e))?;
            let existing = fs::symlink_metadata(&target).ok();
            let keep_dir = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
            if !keep_dir && existing.is_some() {
                remove_any(&target).map_err(|e| io_err(&target, e))?;
            }
            match kind {
                k if k.is_dir() => {
                    if !keep_dir {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&target)
                            .map_err(|e| io_err(&target, e))?;
                    }
                    self.dir_times.push((target.clone(), meta.mtime));
                }
                k if k.is_file() || k == tar::EntryType::Continuous => {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&target)
                        .map_err(|e| io_err(&target, e))?;
                    io::copy(&mut entry, &mut f).map_err(|e| io_err(&target, e))?;
                }
                k if k.is_symlink() => {
                    let to = entry
                        .link_name()
                        .map_err(|e| format(format!("{shown}: bad link name: {e}")))?
                        .ok_or_else(|| format(format!("{shown}: symlink without a target")))?;
                    std::os::unix::fs::symlink(&to, &target).map_err(|e| io_err(&target, e))?;
                }
                k if k.is_hard_link() => {
                    let to = entry
                        .link_name()
                        .map_err(|e| format(format!("{shown}: bad link name: {e}")))?
                        .ok_or_else(|| format(format!("{shown}: hard link without a target")))?
                        .into_owned();
                    let to_rel = relative(&to)
                        .map_err(|_| unsafe_entry("hard link target is outside the image root"))?;
                    let src = self
                        .existing_inside(root, &to_rel)
                        .map_err(|_| unsafe_entry("hard link target passes through a symlink"))?;
                    match fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => {
                            return Err(format(format!(
                                "{shown}: hard link target {} is missing or a directory",
                                to.display()
                            )))
                        }
                    }
                    fs::hard_link(&src, &target).map_err(|e| io_err(&target, e))?;
                    created.insert(rel);
                    // A hard link shares the target's inode and metadata.
                    continue;
                }
                k if k.is_character_special() || k.is_block_special() || k.is_fifo() => {
                    let ftype = if k.is_fifo() {
                        libc::S_IFIFO
                    } else if k.is_block_special() {
                        libc::S_IFBLK
                    } else {
                        libc::S_IFCHR
                    };
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    let c = cstr(&target).map_err(|e| io_err(&target, e))?;
                    // SAFETY: c is a valid C string; mknod only reads it.
                    check(unsafe {
                        libc::mknod(c.as_ptr(), ftype | 0o600, libc::makedev(major, minor))
                    })
                    .map_err(|e| io_err(&target, e))?;
                }
                other => {
                    return Err(format(format!(
                        "{shown}: unsupported tar entry type {:?}",
                        other
                    )))
                }
            }
            Self::set_meta(&target, &meta, kind.is_symlink()).map_err(|e| io_err(&target, e))?;
            created.insert(rel);
        }
        // Hash what follows the last entry too (end blocks, padding).
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| io_err(Path::new("<tar>"), e))?;
        if let Some(expected) = diff_id {
            let actual = format!("sha256:{:x}", rest.hasher.finalize());
            if actual != expected {
                return Err(LayerError::DiffId {
                    layer: layer.to_string(),
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Sets every directory's mtime, once all layers are in.
    pub fn finish(self) -> io::Result<()> {
        for (dir, mtime) in self.dir_times.iter().rev() {
            if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
                set_mtime(dir, *mtime)?;
            }
        }
        Ok(())
    }

    /// `root/rel` after checking that no component is a symlink; the last
    /// component must exist.
    fn existing_inside(&self, root: &Path, rel: &Path) -> Result<PathBuf, ParentError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let mut cur = root.to_path_buf();
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(ParentError::Symlink),
                Err(e) => return Err(ParentError::Io(cur, e)),
            }
        }
        Ok(root.join(rel))
    }

    /// Makes sure `root/rel` is a real directory: missing components are
    /// created, a file in the way is replaced, a symlink is refused.
    fn prepare_parent(&mut self, root: &Path, rel: &Path) -> Result<PathBuf, ParentError> {
        let mut cur = root.to_path_buf();
        for c in rel.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_symlink() => return Err(ParentError::Symlink),
                Ok(m) if m.is_dir() => continue,
                Ok(_) => fs::remove_file(&cur).map_err(|e| ParentError::Io(cur.clone(), e))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ParentError::Io(cur, e)),
            }
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&cur)
                .map_err(|e| ParentError::Io(cur.clone(), e))?;
        }
        Ok(cur)
    }

    fn meta<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Meta> {
        let h = entry.header();
        let mut m = Meta {
            mode: h.mode()? & 0o7777,
            uid: h.uid()?,
            gid: h.gid()?,
            mtime: h.mtime().unwrap_or(0),
            xattrs: Vec::new(),
        };
        if let Some(pax) = entry.pax_extensions()? {
            for ext in pax {
                let ext = ext?;
                let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                    continue;
                };
                let num = || std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                match key {
                    "uid" => m.uid = num().unwrap_or(m.uid),
                    "gid" => m.gid = num().unwrap_or(m.gid),
                    "mtime" => {
                        let whole = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.split('.').next()?.parse().ok());
                        m.mtime = whole.unwrap_or(m.mtime);
                    }
                    k if k.starts_with("SCHILY.xattr.") => m.xattrs.push((
                        k.as_bytes()["SCHILY.xattr.".len()..].to_vec(),
                        value.to_vec(),
                    )),
                    _ => {}
                }
            }
        }
        Ok(m)
    }

    fn set_meta(p: &Path, m: &Meta, is_symlink: bool) -> io::Result<()> {
        let c = cstr(p)?;
        let uid = u32::try_from(m.uid).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let gid = u32::try_from(m.gid).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        // SAFETY: c is a valid C string; lchown does not follow symlinks.
        check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
        for (name, value) in &m.xattrs {
            let Ok(n) = CString::new(name.clone()) else {
                continue;
            };
            // SAFETY: valid C strings and a buffer of the given length.
            let rc = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                // Some xattrs (e.g. trusted.* off root, or unknown
                // namespaces) cannot be set here; the image stays usable.
                tracing::debug!(
                    "xattr {} on {}: {}",
                    String::from_utf8_lossy(name),
                    p.display(),
                    io::Error::last_os_error()
                );
            }
        }
        if !is_symlink {
            // After chown, which clears set-id bits.
            fs::set_permissions(p, fs::Permissions::from_mode(m.mode))?;
        }
        set_mtime(p, m.mtime)
    }
}

enum ParentError {
    Symlink,
    Io(PathBuf, io::Error),
}

fn set_mtime(p: &Path, mtime: u64) -> io::Result<()> {
    let c = cstr(p)?;
    let t = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: c is a valid C string and times points at two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

#[cfg(test)]
mod tests;
