//! Where image bytes come from. A source hands out the manifest or index a
//! reference names, manifests by digest and blobs; it is not trusted: the
//! pull checks every digest and size itself. Local sources are an OCI
//! image layout directory, a tar of one (`oci-archive:`), and what
//! `docker save` writes (`docker-archive:`).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::store::{digest_hex, sha256_digest};
use super::{OciError, MAX_METADATA_BYTES};

/// Bytes of an image, whatever holds them.
pub trait Source {
    /// The manifest or index the reference names.
    fn top(&mut self) -> Result<Vec<u8>, OciError>;
    /// A manifest by digest (an entry of an index).
    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, OciError>;
    /// Copies a blob to `out`, calling `progress` with each chunk's length.
    fn blob(
        &mut self,
        digest: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError>;
}

/// Copies `from` to `out` in chunks, reporting progress.
pub fn copy_with_progress(
    from: &mut dyn Read,
    out: &mut dyn Write,
    progress: &dyn Fn(u64),
    what: &str,
) -> Result<(), OciError> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OciError::Source(what.to_string(), e)),
        };
        out.write_all(&buf[..n])
            .map_err(|e| OciError::Source(what.to_string(), e))?;
        progress(n as u64);
    }
}

/// Copies the file `p` to `out`, reporting progress.
fn copy_file(p: &Path, out: &mut dyn Write, progress: &dyn Fn(u64)) -> Result<(), OciError> {
    let shown = p.display().to_string();
    let mut f = File::open(p).map_err(|e| OciError::Source(shown.clone(), e))?;
    copy_with_progress(&mut f, out, progress, &shown)
}

fn read_limited(p: &Path) -> Result<Vec<u8>, OciError> {
    let shown = p.display().to_string();
    let f = File::open(p).map_err(|e| OciError::Source(shown.clone(), e))?;
    let mut buf = Vec::new();
    f.take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| OciError::Source(shown.clone(), e))?;
    if buf.len() as u64 > MAX_METADATA_BYTES {
        return Err(OciError::TooLarge(shown, MAX_METADATA_BYTES));
    }
    Ok(buf)
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<LayoutDescriptor>,
}

#[derive(Deserialize)]
struct LayoutDescriptor {
    digest: String,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

impl LayoutSource {
    /// The layout in `dir`; `tag` selects by `org.opencontainers.image.ref.name`.
    pub fn new(dir: PathBuf, tag: Option<String>) -> Self {
        Self { dir, tag }
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }
}

impl Source for LayoutSource {
    fn top(&mut self) -> Result<Vec<u8>, OciError> {
        let index = read_limited(&self.dir.join("index.json"))?;
        let Some(tag) = &self.tag else {
            // No tag: the layout's own index, from which the platform is
            // chosen like from any index.
            return Ok(index);
        };
        let parsed: LayoutIndex = serde_json::from_slice(&index)
            .map_err(|e| OciError::Invalid("OCI layout index.json", e.to_string()))?;
        let hit = parsed
            .manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME) == Some(tag))
            .ok_or_else(|| {
                let names: Vec<_> = parsed
                    .manifests
                    .iter()
                    .filter_map(|m| m.annotations.get(REF_NAME).cloned())
                    .collect();
                OciError::NotFound(
                    format!("oci:{}:{tag}", self.dir.display()),
                    format!("tags in the layout: {}", names.join(", ")),
                )
            })?;
        read_limited(&self.blob_path(&hit.digest)?)
    }

    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, OciError> {
        read_limited(&self.blob_path(digest)?)
    }

    fn blob(
        &mut self,
        digest: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        copy_file(&self.blob_path(digest)?, out, progress)
    }
}

/// Unpacks the regular files of an archive (an OCI layout or a
/// docker-archive) into `dest`, refusing names that leave it. Directories
/// are created as needed; links and devices are skipped (neither format
/// needs them).
pub fn extract_archive(file: &Path, dest: &Path) -> Result<(), OciError> {
    let shown = file.display().to_string();
    let err = |e: io::Error| OciError::Source(shown.clone(), e);
    let f = File::open(file).map_err(err)?;
    let mut ar = tar::Archive::new(super::layer::decompress(f).map_err(err)?);
    for entry in ar.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(err)?.into_owned();
        let mut rel = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => rel.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(OciError::Invalid(
                        "archive",
                        format!("{shown}: entry {} leaves the archive", path.display()),
                    ))
                }
            }
        }
        let out = dest.join(&rel);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(err)?;
        }
        let mut w = File::create(&out).map_err(err)?;
        io::copy(&mut entry, &mut w).map_err(err)?;
    }
    Ok(())
}

/// What `docker save` writes: `manifest.json` naming a config file and
/// layer tars. husk presents it as an OCI image manifest whose layers
/// are the (uncompressed) tars.
pub struct DockerArchiveSource {
    dir: PathBuf,
    manifest: Vec<u8>,
    /// Blob digest -> file in `dir`.
    files: std::collections::HashMap<String, PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    layers: Vec<String>,
}

fn file_digest(p: &Path) -> Result<(String, u64), OciError> {
    let shown = p.display().to_string();
    File::open(p)
        .and_then(|mut f| super::store::read_digest(&mut f))
        .map_err(|e| OciError::Source(shown, e))
}

impl DockerArchiveSource {
    /// Reads an extracted docker-archive in `dir`.
    pub fn new(dir: PathBuf, shown: &str) -> Result<Self, OciError> {
        let raw = read_limited(&dir.join("manifest.json"))?;
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&raw)
            .map_err(|e| OciError::Invalid("docker-archive manifest.json", e.to_string()))?;
        let entry = match entries.as_slice() {
            [one] => one,
            [] => return Err(OciError::NotFound(shown.into(), "no image in it".into())),
            _ => {
                return Err(OciError::Invalid(
                    "docker-archive",
                    format!("{shown} holds {} images; husk takes one", entries.len()),
                ))
            }
        };
        let inside = |name: &str| -> Result<PathBuf, OciError> {
            let p = Path::new(name);
            if p.components().all(|c| matches!(c, Component::Normal(_))) {
                Ok(dir.join(p))
            } else {
                Err(OciError::Invalid(
                    "docker-archive",
                    format!("{shown}: path {name:?} leaves the archive"),
                ))
            }
        };
        let mut files = std::collections::HashMap::new();
        let cfg_path = inside(&entry.config)?;
        let (cfg_digest, cfg_size) = file_digest(&cfg_path)?;
        files.insert(cfg_digest.clone(), cfg_path);
        let mut layers = Vec::new();
        for l in &entry.layers {
            let p = inside(l)?;
            let (d, size) = file_digest(&p)?;
            files.insert(d.clone(), p);
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d,
                "size": size,
            }));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": cfg_size,
            },
            "layers": layers,
        }))
        .map_err(|e| OciError::Invalid("docker-archive", e.to_string()))?;
        Ok(Self {
            dir,
            manifest,
            files,
        })
    }
}

impl Source for DockerArchiveSource {
    fn top(&mut self) -> Result<Vec<u8>, OciError> {
        Ok(self.manifest.clone())
    }

    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, OciError> {
        if sha256_digest(&self.manifest) == digest {
            Ok(self.manifest.clone())
        } else {
            Err(OciError::NotFound(
                self.dir.display().to_string(),
                digest.to_string(),
            ))
        }
    }

    fn blob(
        &mut self,
        digest: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        let p = self
            .files
            .get(digest)
            .ok_or_else(|| OciError::NotFound("docker-archive".into(), digest.to_string()))?;
        copy_file(p, out, progress)
    }
}
