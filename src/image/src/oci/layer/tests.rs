use super::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// Builds tars entry by entry; raw names allow hostile paths that
/// tar::Builder itself refuses to write.
pub(crate) struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub(crate) fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    pub(crate) fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(name, tar::EntryType::Regular, 0o644, data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn file_owned(mut self, name: &str, data: &[u8], mode: u32, uid: u64) -> Self {
        let mut h = Self::header(name, tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(name, tar::EntryType::Directory, 0o755, 0);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub(crate) fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(name, kind, 0o777, 0);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub(crate) fn fifo(mut self, name: &str) -> Self {
        let mut h = Self::header(name, tar::EntryType::Fifo, 0o600, 0);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub(crate) fn build(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-layer-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.join("root")).unwrap();
    d
}

fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<(), LayerError> {
    let mut a = Applier::new();
    for (i, l) in layers.iter().enumerate() {
        a.apply(root, &format!("sha256:layer{i}"), &l[..], None)?;
    }
    a.finish().unwrap();
    Ok(())
}

#[test]
fn whiteouts_opaque_dirs_and_links() {
    let d = scratch("sem");
    let root = d.join("root");
    let base = TarBuilder::new()
        .dir("etc/")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/gone", b"x")
        .dir("var/")
        .dir("var/cache/")
        .file("var/cache/a", b"a")
        .file("var/cache/b", b"b")
        .file_owned("bin/tool", b"#!/bin/sh\n", 0o4755, 1000)
        .link(tar::EntryType::Link, "bin/tool-link", "bin/tool")
        .link(tar::EntryType::Symlink, "sh", "/bin/tool")
        .fifo("run.fifo")
        .build();
    let top = TarBuilder::new()
        .file("etc/.wh.gone", b"")
        .dir("var/cache/")
        .file("var/cache/new", b"new")
        .file("var/cache/.wh..wh..opq", b"")
        .file("etc/passwd", b"changed\n")
        .build();
    apply(&root, &[base, top]).unwrap();
    assert!(!root.join("etc/gone").exists(), "whiteout deletes");
    let cache: Vec<_> = fs::read_dir(root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        cache,
        vec!["new"],
        "opaque dir replaces, keeps its own layer"
    );
    assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"changed\n");
    let a = fs::metadata(root.join("bin/tool")).unwrap();
    let b = fs::metadata(root.join("bin/tool-link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.mode() & 0o7777, 0o4755, "set-uid kept after chown");
    assert_eq!((a.uid(), a.gid()), (1000, 1000));
    assert_eq!(a.mtime(), 1_700_000_000);
    assert_eq!(
        fs::read_link(root.join("sh")).unwrap(),
        Path::new("/bin/tool")
    );
    assert!(fs::symlink_metadata(root.join("run.fifo"))
        .unwrap()
        .file_type()
        .is_fifo_like());
    assert_eq!(
        fs::metadata(root.join("var")).unwrap().mtime(),
        1_700_000_000,
        "directory mtimes set last"
    );
    fs::remove_dir_all(d).unwrap();
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn hostile_entries_are_refused_and_nothing_escapes() {
    let d = scratch("evil");
    let root = d.join("root");
    let outside = d.join("outside");
    fs::create_dir_all(&outside).unwrap();
    for (tar, needle) in [
        (TarBuilder::new().file("../x", b"x").build(), "'..'"),
        (TarBuilder::new().file("/etc/x", b"x").build(), "absolute"),
        (
            TarBuilder::new()
                .link(tar::EntryType::Link, "h", "../../etc/passwd")
                .build(),
            "outside",
        ),
    ] {
        let e = apply(&root, &[tar]).unwrap_err().to_string();
        assert!(e.contains("sha256:layer0") && e.contains(needle), "{e}");
    }
    // A symlink planted by one layer and written through by the next.
    let plant = TarBuilder::new()
        .link(tar::EntryType::Symlink, "evil", outside.to_str().unwrap())
        .build();
    let write = TarBuilder::new().file("evil/passwd", b"owned").build();
    let e = apply(&root, &[plant.clone(), write])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sha256:layer1") && e.contains("evil/passwd") && e.contains("symlink"),
        "{e}"
    );
    // The same within one layer, and through a relative link.
    let both = TarBuilder::new()
        .link(tar::EntryType::Symlink, "up", "../outside")
        .file("up/f", b"owned")
        .build();
    assert!(apply(&root, &[both]).is_err());
    // Whiteouts cannot delete through a symlink either.
    fs::write(outside.join("keep"), b"k").unwrap();
    let wh = TarBuilder::new().file("evil/.wh.keep", b"").build();
    assert!(apply(&root, &[plant, wh]).is_err());
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing written or removed outside the root"
    );
    assert!(outside.join("keep").exists());
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn compressed_layers_and_diff_ids() {
    let d = scratch("z");
    let root = d.join("root");
    let tar = TarBuilder::new().file("a", b"hello").build();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for blob in [&tar, &gz, &zst] {
        let mut a = Applier::new();
        a.apply(&root, "l", decompress(&blob[..]).unwrap(), Some(&diff_id))
            .unwrap();
        assert_eq!(fs::read(root.join("a")).unwrap(), b"hello");
    }
    let e = Applier::new()
        .apply(&root, "l", decompress(&gz[..]).unwrap(), Some("sha256:00"))
        .unwrap_err();
    assert!(matches!(e, LayerError::DiffId { .. }), "{e}");
    let e = Applier::new()
        .apply(&root, "l", &b"not a tar at all, just some bytes"[..], None)
        .unwrap_err();
    assert!(e.to_string().starts_with("layer l:"), "{e}");
    fs::remove_dir_all(d).unwrap();
}
