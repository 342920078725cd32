//! An image layer (a tar stream, gzip or zstd when it starts with their
//! magic) applied to an empty root, as `husk pull` and `husk run IMAGE` do
//! with every layer a registry serves. The input is split at the first
//! "\n--layer--\n" into two layers applied one on top of the other (links
//! planted by the first, written through by the second). Any input must be
//! applied or refused with an error, never panic, and nothing may appear
//! outside the root: the root's siblings are checked after every input.
#![no_main]

use std::path::{Path, PathBuf};

use husk_image::oci::layer::{decompress, Applier};
use libfuzzer_sys::fuzz_target;

const SPLIT: &[u8] = b"\n--layer--\n";

/// A scratch dir per process: `root` (the image) and `outside` (a sibling
/// that must stay empty).
fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-fuzz-layer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("outside")).unwrap();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static DIR: PathBuf = scratch());
    let dir = DIR.with(|d| d.clone());
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let (first, second) = match data.windows(SPLIT.len()).position(|w| w == SPLIT) {
        Some(at) => (&data[..at], Some(&data[at + SPLIT.len()..])),
        None => (data, None),
    };
    let mut applier = Applier::new();
    let mut ok = true;
    for (n, layer) in std::iter::once(first).chain(second).enumerate() {
        let Ok(tar) = decompress(layer) else {
            ok = false;
            break;
        };
        if applier
            .apply(&root, &format!("layer{n}"), tar, None)
            .is_err()
        {
            ok = false;
            break;
        }
    }
    if ok {
        let _ = applier.finish();
    }
    assert_eq!(
        names(&dir),
        ["outside", "root"],
        "an entry escaped the root"
    );
    assert!(
        names(&dir.join("outside")).is_empty(),
        "an entry escaped the root"
    );
    // As root: modes the layer left do not stop the removal.
    std::fs::remove_dir_all(&root).unwrap();
});
