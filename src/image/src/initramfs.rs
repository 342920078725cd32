//! Builds a guest initramfs: the skeleton every husk guest needs (/dev
//! with a console node, mount points) plus caller-chosen host files.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cpio::{CpioError, CpioWriter};

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A host file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
    /// The archive could not be written.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// The output file could not be written.
    #[error("cannot write {0}: {1}")]
    Write(String, #[source] std::io::Error),
}

/// A file to put in the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the guest ("/init").
    pub guest: String,
    /// Host file whose content and permission bits are copied.
    pub host: PathBuf,
}

/// Writes an initramfs with the skeleton and `entries` to `out`.
pub fn build<W: Write>(out: W, entries: &[Entry]) -> Result<W, InitramfsError> {
    let mut w = CpioWriter::new(out);
    let mut dirs: BTreeSet<String> = ["/dev", "/proc", "/sys", "/tmp", "/run"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for e in entries {
        let mut p = Path::new(&e.guest).parent();
        while let Some(d) = p {
            let s = d.to_string_lossy().to_string();
            if s != "/" && !s.is_empty() {
                dirs.insert(s);
            }
            p = d.parent();
        }
    }
    // BTreeSet order puts parents before children.
    for d in &dirs {
        w.dir(d, if d == "/tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    w.char_dev("/dev/console", 0o600, 5, 1)?;
    for e in entries {
        let shown = e.host.display().to_string();
        let data = fs::read(&e.host).map_err(|err| InitramfsError::Read(shown.clone(), err))?;
        let perm = fs::metadata(&e.host)
            .map_err(|err| InitramfsError::Read(shown, err))?
            .permissions()
            .mode();
        w.file(&e.guest, perm & 0o7777, &data)?;
    }
    Ok(w.finish()?)
}

/// Writes an initramfs to `path` atomically (temp file + rename), so a
/// failure leaves no partial archive behind.
pub fn write_file(path: &Path, entries: &[Entry]) -> Result<(), InitramfsError> {
    let shown = path.display().to_string();
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let f = fs::File::create(&tmp).map_err(|e| InitramfsError::Write(shown.clone(), e))?;
        let f = build(std::io::BufWriter::new(f), entries)?;
        f.into_inner()
            .map_err(|e| InitramfsError::Write(shown.clone(), e.into_error()))?
            .sync_all()
            .map_err(|e| InitramfsError::Write(shown.clone(), e))?;
        fs::rename(&tmp, path).map_err(|e| InitramfsError::Write(shown.clone(), e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_and_entries() {
        let dir = std::env::temp_dir().join(format!("husk-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let host = dir.join("init.sh");
        fs::write(&host, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(0o750)).unwrap();
        let out = build(
            Vec::new(),
            &[Entry {
                guest: "/sbin/deep/init".into(),
                host: host.clone(),
            }],
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        for name in [
            "dev\0",
            "dev/console\0",
            "sbin\0",
            "sbin/deep\0",
            "sbin/deep/init\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "missing {name:?}");
        }
        assert!(text.find("sbin\0").unwrap() < text.find("sbin/deep\0").unwrap());
        // 0o100750 = regular file, rwxr-x---
        assert!(text.contains(&format!("{:08x}", 0o100750)));

        let missing = write_file(
            &dir.join("out.cpio"),
            &[Entry {
                guest: "/x".into(),
                host: dir.join("nope"),
            }],
        );
        assert!(missing.is_err());
        assert!(
            fs::read_dir(&dir).unwrap().count() == 1,
            "no partial output left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
