//! husk's content-addressed image store, under `<root>/oci`:
//!
//! ```text
//! lock                   flock: shared to read, exclusive to change
//! blobs/sha256/<hex>     manifests, configs, layers: verified before rename
//! disks/<hex>.ext4       one read-only guest disk per image config digest
//! disks/<hex>.passwd     the image's /etc/passwd and /etc/group, to resolve
//! disks/<hex>.group      user names on the host
//! images.json            reference -> manifest, config, layers
//! tmp/                   downloads and builds in progress
//! ```
//!
//! Everything lands by rename once complete, so an interrupted pull leaves
//! only files in tmp/, which the next writer removes under the lock.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::OciError;

/// One image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// The normalized reference it was pulled as.
    pub reference: String,
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the index it was selected from, if any.
    #[serde(default)]
    pub index_digest: Option<String>,
    /// Digest of the image config.
    pub config_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Bytes of the manifest, config and layer blobs.
    pub size: u64,
    /// The config's `created`, if any.
    #[serde(default)]
    pub created: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    images: Vec<ImageRecord>,
}

/// A held store lock; released on drop.
#[derive(Debug)]
pub struct StoreLock(#[allow(dead_code)] File);

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Checks a digest is `sha256:` and 64 lowercase hex digits; returns the hex.
/// Digests come from manifests and indexes, so they are hostile input that
/// ends up in file names.
pub fn digest_hex(digest: &str) -> Result<&str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(OciError::BadDigest(digest.chars().take(80).collect())),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |e| OciError::Store(p.display().to_string(), e)
}

impl Store {
    /// Opens (creating) the store under `root` (husk's root directory).
    pub fn open(root: &Path) -> Result<Self, OciError> {
        let dir = root.join("oci");
        for sub in ["blobs/sha256", "disks", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store lock: shared to read, exclusive to change.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, OciError> {
        let p = self.dir.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on an fd we own; it blocks until granted.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(OciError::Store(
                p.display().to_string(),
                io::Error::last_os_error(),
            ));
        }
        Ok(StoreLock(f))
    }

    /// Removes whatever an interrupted writer left in tmp/. Call with the
    /// exclusive lock held.
    pub fn clean_tmp(&self, _lock: &StoreLock) -> Result<(), OciError> {
        let tmp = self.dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let p = e.map_err(io_err(&tmp))?.path();
            let r = if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// A fresh path in tmp/.
    pub fn temp_path(&self, tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        self.dir.join("tmp").join(format!(
            "{tag}.{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Whether the blob is present and intact (its content is hashed again:
    /// a corrupted blob is removed so it can be fetched anew).
    pub fn has_valid_blob(&self, digest: &str) -> Result<bool, OciError> {
        let p = self.blob_path(digest)?;
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(OciError::Store(p.display().to_string(), e)),
        };
        let (actual, _) = read_digest(&mut f).map_err(io_err(&p))?;
        if actual == digest {
            return Ok(true);
        }
        tracing::warn!("blob {digest} in the store is corrupted; fetching it again");
        fs::remove_file(&p).map_err(io_err(&p))?;
        Ok(false)
    }

    /// Reads a stored blob (at most `limit` bytes: manifests and configs).
    pub fn read_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>, OciError> {
        let p = self.blob_path(digest)?;
        let f = File::open(&p).map_err(io_err(&p))?;
        let mut buf = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(io_err(&p))?;
        if buf.len() as u64 > limit {
            return Err(OciError::TooLarge(digest.to_string(), limit));
        }
        Ok(buf)
    }

    /// Writes a blob through `fill` into tmp/, checks its digest (and size,
    /// when known), then renames it into place.
    pub fn put_blob(
        &self,
        digest: &str,
        size: Option<u64>,
        fill: impl FnOnce(&mut dyn Write) -> Result<(), OciError>,
    ) -> Result<(), OciError> {
        let dest = self.blob_path(digest)?;
        let tmp = self.temp_path("blob");
        let result = (|| {
            let f = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = VerifyingWriter {
                out: io::BufWriter::with_capacity(256 * 1024, f),
                hasher: Sha256::new(),
                written: 0,
                limit: size,
            };
            fill(&mut w)?;
            let (hash, written) = (format!("sha256:{:x}", w.hasher.finalize()), w.written);
            let f = w
                .out
                .into_inner()
                .map_err(|e| io_err(&tmp)(e.into_error()))?;
            if let Some(s) = size {
                if written != s {
                    return Err(OciError::SizeMismatch(digest.to_string(), s, written));
                }
            }
            if hash != digest {
                return Err(OciError::DigestMismatch(digest.to_string(), hash));
            }
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &dest).map_err(io_err(&dest))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores bytes already in memory as a blob; returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String, OciError> {
        let digest = sha256_digest(bytes);
        if !self.blob_path(&digest)?.exists() {
            self.put_blob(&digest, Some(bytes.len() as u64), |w| {
                w.write_all(bytes)
                    .map_err(|e| OciError::Store("blob".into(), e))
            })?;
        }
        Ok(digest)
    }

    /// The read-only disk of an image config digest.
    pub fn disk_path(&self, config_digest: &str) -> Result<PathBuf, OciError> {
        Ok(self
            .dir
            .join("disks")
            .join(format!("{}.ext4", digest_hex(config_digest)?)))
    }

    /// Every image, in pull order.
    pub fn images(&self) -> Result<Vec<ImageRecord>, OciError> {
        let p = self.dir.join("images.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice::<Index>(&b)
                .map(|i| i.images)
                .map_err(|e| OciError::Corrupt(p.display().to_string(), e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(OciError::Store(p.display().to_string(), e)),
        }
    }

    /// The image stored under `reference` (or whose manifest digest, or a
    /// unique prefix of it of at least 12 hex digits, is `reference`).
    pub fn find(&self, reference: &str) -> Result<Option<ImageRecord>, OciError> {
        let all = self.images()?;
        if let Some(r) = all.iter().find(|r| r.reference == reference) {
            return Ok(Some(r.clone()));
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = all
                .iter()
                .filter(|r| r.manifest_digest[7..].starts_with(hex))
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
        }
        Ok(None)
    }

    fn save(&self, images: Vec<ImageRecord>) -> Result<(), OciError> {
        let p = self.dir.join("images.json");
        let tmp = self.temp_path("images.json");
        let bytes = serde_json::to_vec_pretty(&Index { images })
            .map_err(|e| OciError::Corrupt(p.display().to_string(), e.to_string()))?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    /// Adds or replaces the record of `rec.reference`. Exclusive lock held.
    pub fn record(&self, _lock: &StoreLock, rec: ImageRecord) -> Result<(), OciError> {
        let mut all = self.images()?;
        all.retain(|r| r.reference != rec.reference);
        all.push(rec);
        self.save(all)
    }

    /// Whether a running VM has the disk open (the VMM holds a shared
    /// flock on read-only disks).
    pub fn disk_in_use(&self, config_digest: &str) -> Result<bool, OciError> {
        let p = self.disk_path(config_digest)?;
        let Ok(f) = File::open(&p) else {
            return Ok(false);
        };
        // SAFETY: flock on an fd we own; non-blocking.
        let busy = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        Ok(busy)
    }

    /// Removes the record of `reference`; refuses when its disk is in use
    /// by a running container unless `force`. Then collects garbage.
    /// Returns the removed record.
    pub fn remove(
        &self,
        lock: &StoreLock,
        reference: &str,
        force: bool,
    ) -> Result<ImageRecord, OciError> {
        let rec = self
            .find(reference)?
            .ok_or_else(|| OciError::NotInStore(reference.to_string()))?;
        let mut all = self.images()?;
        all.retain(|r| r.reference != rec.reference);
        let shared = all.iter().any(|r| r.config_digest == rec.config_digest);
        if !force && !shared && self.disk_in_use(&rec.config_digest)? {
            return Err(OciError::InUse(rec.reference));
        }
        self.save(all)?;
        self.gc(lock)?;
        Ok(rec)
    }

    /// Deletes blobs and disks no record references, and tmp/ leftovers.
    /// Returns the bytes freed.
    pub fn gc(&self, lock: &StoreLock) -> Result<u64, OciError> {
        self.clean_tmp(lock)?;
        let all = self.images()?;
        let mut keep_blobs = std::collections::HashSet::new();
        let mut keep_disks = std::collections::HashSet::new();
        for r in &all {
            for d in [&r.manifest_digest, &r.config_digest]
                .into_iter()
                .chain(r.index_digest.iter())
                .chain(r.layers.iter())
            {
                keep_blobs.insert(digest_hex(d)?.to_string());
            }
            keep_disks.insert(digest_hex(&r.config_digest)?.to_string());
        }
        let mut freed = 0;
        for (sub, keep) in [("blobs/sha256", &keep_blobs), ("disks", &keep_disks)] {
            let dir = self.dir.join(sub);
            for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let e = e.map_err(io_err(&dir))?;
                let name = e.file_name().to_string_lossy().to_string();
                let stem = name.split('.').next().unwrap_or_default();
                if !keep.contains(stem) {
                    freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                }
            }
        }
        Ok(freed)
    }
}

/// The `sha256:` digest and the length of everything `r` yields.
pub fn read_digest(r: &mut dyn Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let n = io::copy(r, &mut HashWriter(&mut h))?;
    Ok((format!("sha256:{:x}", h.finalize()), n))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hashes and counts what it writes; refuses to write past the expected
/// size (a registry that sends more than the descriptor says).
struct VerifyingWriter<W> {
    out: W,
    hasher: Sha256,
    written: u64,
    limit: Option<u64>,
}

impl<W: Write> Write for VerifyingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(l) = self.limit {
            if self.written + buf.len() as u64 > l {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob is larger than its descriptor's {l} bytes"),
                ));
            }
        }
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tag: &str) -> (PathBuf, Store) {
        let d = std::env::temp_dir().join(format!("husk-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let s = Store::open(&d).unwrap();
        (d, s)
    }

    #[test]
    fn blobs_are_verified_and_land_whole() {
        let (d, s) = store("blob");
        let digest = sha256_digest(b"hello");
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(s.blob_path("md5:abc").is_err());
        // Wrong content: refused, nothing left behind.
        let e = s
            .put_blob(&digest, Some(5), |w| {
                w.write_all(b"hellO").unwrap();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, OciError::DigestMismatch(..)), "{e}");
        let e = s
            .put_blob(&digest, Some(4), |w| {
                w.write_all(b"hello")
                    .map_err(|e| OciError::Store("x".into(), e))
            })
            .unwrap_err();
        assert!(e.to_string().contains("larger"), "{e}");
        assert_eq!(fs::read_dir(d.join("oci/tmp")).unwrap().count(), 0);
        assert!(!s.has_valid_blob(&digest).unwrap());
        s.put_blob(&digest, Some(5), |w| {
            w.write_all(b"hello").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(s.has_valid_blob(&digest).unwrap());
        // A flipped byte is detected and the blob dropped.
        fs::write(s.blob_path(&digest).unwrap(), b"jello").unwrap();
        assert!(!s.has_valid_blob(&digest).unwrap());
        assert!(!s.blob_path(&digest).unwrap().exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn records_and_garbage_collection() {
        let (d, s) = store("gc");
        let lock = s.lock(true).unwrap();
        let shared = s.put_bytes(b"layer").unwrap();
        let own = s.put_bytes(b"own layer").unwrap();
        let cfg_a = s.put_bytes(b"config a").unwrap();
        let cfg_b = s.put_bytes(b"config b").unwrap();
        let rec = |name: &str, cfg: &str, layers: Vec<String>| ImageRecord {
            reference: name.into(),
            manifest_digest: s.put_bytes(name.as_bytes()).unwrap(),
            index_digest: None,
            config_digest: cfg.into(),
            layers,
            size: 1,
            created: None,
        };
        s.record(&lock, rec("a:1", &cfg_a, vec![shared.clone(), own.clone()]))
            .unwrap();
        s.record(&lock, rec("b:1", &cfg_b, vec![shared.clone()]))
            .unwrap();
        fs::write(s.disk_path(&cfg_a).unwrap(), b"disk").unwrap();
        fs::write(s.temp_path("stale"), b"x").unwrap();
        let a = s.find("a:1").unwrap().unwrap();
        assert_eq!(s.find(&a.manifest_digest[..19]).unwrap(), Some(a.clone()));
        assert!(s.find("nope").unwrap().is_none());
        s.remove(&lock, "a:1", false).unwrap();
        assert!(s.has_valid_blob(&shared).unwrap(), "still used by b");
        assert!(!s.blob_path(&own).unwrap().exists());
        assert!(!s.disk_path(&cfg_a).unwrap().exists());
        assert_eq!(fs::read_dir(d.join("oci/tmp")).unwrap().count(), 0);
        assert!(matches!(
            s.remove(&lock, "a:1", false),
            Err(OciError::NotInStore(_))
        ));
        // A disk held by a running VM (shared flock) is in use.
        fs::write(s.disk_path(&cfg_b).unwrap(), b"disk").unwrap();
        let held = File::open(s.disk_path(&cfg_b).unwrap()).unwrap();
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH) }, 0);
        assert!(matches!(
            s.remove(&lock, "b:1", false),
            Err(OciError::InUse(_))
        ));
        s.remove(&lock, "b:1", true).unwrap();
        assert_eq!(fs::read_dir(d.join("oci/blobs/sha256")).unwrap().count(), 0);
        fs::remove_dir_all(d).unwrap();
    }
}
