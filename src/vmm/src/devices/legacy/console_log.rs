//! The guest console as a file that a chatty or hostile guest cannot grow
//! without bound: past `cap` bytes the file's contents move to `PATH.1`
//! (replacing the previous ones) and the file starts again, so at most two
//! caps are on disk and the newest output, what a post-mortem needs, is
//! always kept. Rotation works on the two fds opened up front: the vCPU
//! threads that write the console may not open or rename files. A path
//! that is not a regular file (/dev/null, a FIFO, a terminal) holds
//! nothing to bound: it is written as it is, with no `PATH.1` next to it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes per console file before it rotates.
pub const CONSOLE_LOG_CAP: u64 = 4 << 20;

/// A console sink writing to a rotating file.
#[derive(Debug)]
pub struct ConsoleLog {
    file: File,
    // None: not a regular file, never rotated.
    prev: Option<File>,
    written: u64,
    cap: u64,
}

impl ConsoleLog {
    /// Creates (truncates) `path` and, if it is a regular file, `PATH.1`.
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
        };
        let file = open(path)?;
        let prev = match file.metadata()?.is_file() {
            true => Some(open(&previous(path))?),
            false => None,
        };
        Ok(Self {
            file,
            prev,
            written: 0,
            cap: cap.max(1),
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let Some(prev) = &mut self.prev else {
            self.written = 0;
            return Ok(());
        };
        prev.set_len(0)?;
        prev.seek(SeekFrom::Start(0))?;
        self.file.seek(SeekFrom::Start(0))?;
        // Not io::copy: it would use copy_file_range, which the vCPU
        // threads' seccomp filter does not allow.
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = self.file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            prev.write_all(&buf[..n])?;
        }
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.cap {
            self.rotate()?;
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Where a console log's previous part goes.
pub fn previous(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The last non-blank line of the console log at `path` (looking into its
/// previous part when the current one has none), read from at most the
/// last 64 KiB of each. The guest wrote it: control characters become `?`
/// and it is cut to [`LAST_LINE_MAX`] characters, so it can go into a
/// one-line error message.
pub fn last_line(path: &Path) -> Option<String> {
    const TAIL: u64 = 64 << 10;
    [path.to_path_buf(), previous(path)].iter().find_map(|p| {
        let mut f = File::open(p).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
        let mut bytes = Vec::new();
        f.take(TAIL).read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        Some(
            line.trim()
                .chars()
                .take(LAST_LINE_MAX)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    })
}

/// The most of a console line [`last_line`] returns, in characters.
pub const LAST_LINE_MAX: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-console-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_flood_keeps_at_most_two_caps_and_the_newest_output() {
        let d = dir("flood");
        let path = d.join("console.log");
        std::fs::write(previous(&path), b"stale").unwrap();
        let mut log = ConsoleLog::create(&path, 1000).unwrap();
        assert_eq!(
            std::fs::read(previous(&path)).unwrap(),
            b"",
            "a stale part is emptied"
        );
        // 1 MiB, a byte at a time as the UART writes, then a last line.
        for i in 0..(1u32 << 20) {
            log.write_all(&[b'a' + (i % 26) as u8]).unwrap();
        }
        log.write_all(b"\nthe last words\n").unwrap();
        let cur = std::fs::metadata(&path).unwrap().len();
        let prev = std::fs::metadata(previous(&path)).unwrap().len();
        assert!(cur <= 1000 && prev == 1000, "{cur} {prev}");
        assert_eq!(last_line(&path).as_deref(), Some("the last words"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_device_is_written_through_with_no_previous_part() {
        let d = dir("device");
        // A FIFO stands for /dev/null here: not a regular file, and the
        // test must not create /dev/null.1.
        let fifo = d.join("console.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut log = ConsoleLog::create(&fifo, 10).unwrap();
        let mut reader = File::open(&fifo).unwrap();
        // Past the cap: a regular file would rotate here.
        log.write_all(b"0123456789abcdef").unwrap();
        let mut got = [0u8; 16];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"0123456789abcdef");
        assert!(!previous(&fifo).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_large_write_is_split_at_the_cap() {
        let d = dir("split");
        let path = d.join("console.log");
        let mut log = ConsoleLog::create(&path, 10).unwrap();
        log.write_all(b"0123456789abcdefghij-tail").unwrap();
        assert_eq!(std::fs::read(previous(&path)).unwrap(), b"abcdefghij");
        assert_eq!(std::fs::read(&path).unwrap(), b"-tail");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_last_line_comes_from_the_previous_part_after_a_rotation() {
        let d = dir("tail");
        let path = d.join("console.log");
        let mut log = ConsoleLog::create(&path, 8).unwrap();
        log.write_all(b"panic!\n\n").unwrap();
        log.write_all(b"   ").unwrap();
        assert_eq!(last_line(&path).as_deref(), Some("panic!"));
        assert_eq!(last_line(&d.join("none.log")), None);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_last_line_is_one_printable_bounded_line() {
        let d = dir("hostile");
        let path = d.join("console.log");
        let mut line = b"\x1b[2Jowned\rby\x07 the guest ".to_vec();
        line.extend(std::iter::repeat_n(b'x', 10_000));
        line.extend(b"\r\n");
        std::fs::write(&path, &line).unwrap();
        let got = last_line(&path).unwrap();
        assert!(got.starts_with("?[2Jowned?by? the guest xxx"), "{got}");
        assert_eq!(got.chars().count(), LAST_LINE_MAX);
        assert!(!got.chars().any(char::is_control), "{got}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
