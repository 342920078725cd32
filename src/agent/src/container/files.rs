//! Files the host hands a container (its bind mounts of host files, such
//! as Docker's /etc/hosts), written where the spec's mounts name them.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use husk_proto::{ErrorCode, GuestFile};

/// Writes the host's files for a container's bind mounts into `dir`.
pub fn write(dir: &Path, files: &[GuestFile]) -> Result<(), (ErrorCode, String)> {
    if files.is_empty() {
        return Ok(());
    }
    let io_err =
        |p: &Path, e: std::io::Error| (ErrorCode::SetupFailed, format!("{}: {e}", p.display()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    for f in files {
        let plain = !f.name.is_empty()
            && f.name != "."
            && f.name != ".."
            && !f.name.contains('/')
            && !f.name.contains('\0');
        if !plain {
            return Err((
                ErrorCode::InvalidRequest,
                format!("file name {:?} is not a plain name", f.name),
            ));
        }
        let p = dir.join(&f.name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(f.mode & 0o7777)
            .open(&p)
            .map_err(|e| io_err(&p, e))?;
        std::io::Write::write_all(&mut file, &f.content).map_err(|e| io_err(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_only_and_no_overwrites() {
        let dir = std::env::temp_dir().join(format!("husk-files-{}", std::process::id()));
        let f = |name: &str| GuestFile {
            name: name.into(),
            mode: 0o644,
            content: b"x".to_vec(),
        };
        write(&dir, &[f("f0")]).unwrap();
        assert_eq!(fs::read(dir.join("f0")).unwrap(), b"x");
        for bad in ["", ".", "..", "../etc/passwd", "a/b"] {
            assert_eq!(
                write(&dir, &[f(bad)]).unwrap_err().0,
                ErrorCode::InvalidRequest
            );
        }
        assert_eq!(
            write(&dir, &[f("f0")]).unwrap_err().0,
            ErrorCode::SetupFailed
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
