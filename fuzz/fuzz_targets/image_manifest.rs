//! What an image source serves, as `husk pull` reads it: the top document
//! (an index or a manifest), the manifest an index names, the config and
//! the layers, each checked before the next is asked for; an image that
//! passes is then unpacked (its layers applied, their diff_ids checked).
//!
//! The input is split at each "\n--blob--\n" into the top document (part
//! 0) and blobs 1, 2, ...; in part i, "@Dj@" and "@Sj@" (j > i) become
//! blob j's sha256 digest and size, so the fuzzer gets past the digest
//! checks to the parsing and the checks behind them. Any input must give an
//! image or one error, never a panic.
#![no_main]

use std::io::Write;
use std::path::PathBuf;

use husk_image::oci::pull::{pull_from, PullOptions};
use husk_image::oci::registry::{RegistryAuth, RegistryOptions};
use husk_image::oci::sources::{copy_with_progress, Source};
use husk_image::oci::store::sha256_digest;
use husk_image::oci::{ImageRef, OciError, Store};
use libfuzzer_sys::fuzz_target;

const SPLIT: &[u8] = b"\n--blob--\n";

/// Part 0 and the blobs, placeholders resolved.
fn parts(data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SPLIT.len()).position(|w| w == SPLIT) {
        parts.push(rest[..at].to_vec());
        rest = &rest[at + SPLIT.len()..];
    }
    parts.push(rest.to_vec());
    for i in (0..parts.len()).rev() {
        for j in i + 1..parts.len() {
            let digest = sha256_digest(&parts[j]);
            let size = parts[j].len().to_string();
            let p = replace(&parts[i], format!("@D{j}@").as_bytes(), digest.as_bytes());
            parts[i] = replace(&p, format!("@S{j}@").as_bytes(), size.as_bytes());
        }
    }
    parts
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

struct FuzzSource(Vec<Vec<u8>>);

impl FuzzSource {
    fn find(&self, digest: &str) -> Result<&[u8], OciError> {
        self.0[1..]
            .iter()
            .find(|b| sha256_digest(b) == digest)
            .map(|b| b.as_slice())
            .ok_or_else(|| OciError::Invalid("blob", format!("{digest} not served")))
    }
}

impl Source for FuzzSource {
    fn top(&mut self) -> Result<Vec<u8>, OciError> {
        Ok(self.0[0].clone())
    }
    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, OciError> {
        Ok(self.find(digest)?.to_vec())
    }
    fn blob(
        &mut self,
        digest: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        let mut b = self.find(digest)?;
        copy_with_progress(&mut b, out, progress, digest)
    }
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("husk-fuzz-image-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static DIR: PathBuf = scratch());
    let dir = DIR.with(|d| d.clone());
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    let mut src = FuzzSource(parts(data));
    let r = ImageRef::OciLayout {
        dir: PathBuf::from("/fuzz"),
        tag: Some("t".into()),
    };
    let opts = PullOptions {
        registry: RegistryOptions {
            tls_verify: true,
            auth: RegistryAuth::Anonymous,
        },
        quiet: true,
    };
    if let Ok(rec) = pull_from(&store, &r, &mut src, &opts) {
        let _ = husk_image::oci::disk::unpack(&store, &rec, &dir.join("rootfs"));
    }
    let _ = std::fs::remove_dir_all(&dir);
});
