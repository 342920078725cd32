//! Writer for the "newc" cpio format (the one the Linux kernel unpacks as
//! an initramfs). Uncompressed on purpose: decompression in an emulated
//! guest kernel costs seconds.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing to the output failed.
    #[error("writing cpio archive: {0}")]
    Io(#[from] io::Error),
    /// A path is empty, absolute-only, or has a NUL byte or `..`.
    #[error("invalid path in cpio archive: {0:?}")]
    BadPath(String),
    /// A file is larger than the format's 32-bit size field.
    #[error("file too large for cpio: {0} ({1} bytes)")]
    TooLarge(String, u64),
}

/// Streams newc entries; `finish` writes the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, 0, &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(path.into(), data.len() as u64));
        }
        self.entry(path, S_IFREG | (perm & 0o7777), 1, 0, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.entry(path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(
            path,
            S_IFCHR | (perm & 0o7777),
            1,
            (major << 16) | minor,
            &[],
        )
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 0, 0, 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let name = normalize(path)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(&name, ino, mode, nlink, data.len() as u32, rdev)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: u32,
    ) -> Result<(), CpioError> {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, for reproducible archives
            size,
            0, // devmajor
            0, // devminor
            rdev >> 16,
            rdev & 0xffff,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut h = String::with_capacity(110);
        h.push_str(MAGIC);
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.write(h.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

/// Archive names are relative ("init", "dev/console").
fn normalize(path: &str) -> Result<String, CpioError> {
    let name = path.trim_start_matches('/');
    if name.is_empty()
        || name.contains('\0')
        || name.split('/').any(|c| c == ".." || c.is_empty())
        || name == TRAILER
    {
        return Err(CpioError::BadPath(path.into()));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader, enough to check what the writer produced.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let rdev = (field(9) << 16) | field(10);
            let namesize = field(11) as usize;
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let mut pos = 110 + namesize;
            pos += (4 - (off + pos) % 4) % 4;
            let data = b[pos..pos + size].to_vec();
            pos += size;
            pos += (4 - (off + pos) % 4) % 4;
            off += pos;
            b = &b[pos..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, rdev));
        }
    }

    #[test]
    fn round_trip_through_a_reader() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.file("/empty", 0o644, b"").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse(&bytes);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].0, "dev");
        assert_eq!(e[0].1, 0o040755);
        assert_eq!((e[1].1, e[1].3), (0o020600, (5 << 16) | 1));
        assert_eq!(e[2].0, "init");
        assert_eq!(e[2].2, b"#!/bin/sh\necho hi\n");
        assert_eq!(e[3].1 & 0o170000, S_IFLNK);
        assert_eq!(e[3].2, b"busybox");
        assert!(e[4].2.is_empty());
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for p in ["", "/", "../x", "a/../b", "a//b", "a\0b", "TRAILER!!!"] {
            assert!(w.file(p, 0o644, b"").is_err(), "{p:?}");
        }
    }
}
