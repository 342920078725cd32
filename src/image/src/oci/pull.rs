//! `husk pull`: a reference's linux/amd64 image into the store, every blob
//! verified, then its read-only guest disk built. The store's exclusive
//! lock is held throughout, so concurrent pulls take turns (the second
//! finds the blobs in place); what an interrupted pull left in tmp/ is
//! removed first.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;

use super::registry::{RegistryOptions, RegistrySource};
use super::sources::{DockerArchiveSource, LayoutSource, Source};
use super::store::sha256_digest;
use super::{disk, ImageRecord, ImageRef, OciError, Store, MAX_METADATA_BYTES};

/// Layer media types husk applies (compression is detected from content).
const LAYER_TYPES: [&str; 9] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registry access (ignored for local sources).
    pub registry: RegistryOptions,
    /// No progress output.
    pub quiet: bool,
}

/// Just enough of a manifest or index to tell which it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kind {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

fn is_index(bytes: &[u8]) -> Result<bool, OciError> {
    let k: Kind =
        serde_json::from_slice(bytes).map_err(|e| OciError::Invalid("manifest", e.to_string()))?;
    if k.schema_version != Some(2) {
        return Err(OciError::MediaType(format!(
            "manifest schema version {:?} (only schema 2 is supported)",
            k.schema_version
        )));
    }
    match k.media_type.as_deref() {
        Some(t) if INDEX_TYPES.contains(&t) => Ok(true),
        Some(t) if MANIFEST_TYPES.contains(&t) => Ok(false),
        Some(t) => Err(OciError::MediaType(t.to_string())),
        None => Ok(k.manifests.is_some()),
    }
}

/// The linux/amd64 entry of an index.
fn select_platform(name: &str, index_bytes: &[u8]) -> Result<String, OciError> {
    let index: ImageIndex = serde_json::from_slice(index_bytes)
        .map_err(|e| OciError::Invalid("image index", e.to_string()))?;
    let entries = index.manifests();
    let hit = entries.iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    });
    // An index without platforms (an OCI layout's index.json) with a
    // single image: that one.
    let hit = hit.or_else(|| match entries.as_slice() {
        [only] if only.platform().is_none() => Some(only),
        _ => None,
    });
    match hit {
        Some(d) => Ok(d.digest().to_string()),
        None => {
            let found: Vec<String> = entries
                .iter()
                .map(|m| match m.platform() {
                    Some(p) => format!("{}/{}", p.os(), p.architecture()),
                    None => "an entry without platform".into(),
                })
                .collect();
            Err(OciError::NoPlatform(name.to_string(), found.join(", ")))
        }
    }
}

fn progress_target(quiet: bool) -> ProgressDrawTarget {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// Opens the source a reference names. Archives are unpacked into the
/// store's tmp/ first (the caller holds the exclusive lock).
fn open_source(
    store: &Store,
    r: &ImageRef,
    opts: &PullOptions,
) -> Result<(Box<dyn Source>, Option<std::path::PathBuf>), OciError> {
    Ok(match r {
        ImageRef::Registry(reference) => (
            Box::new(RegistrySource::new(
                reference.clone(),
                opts.registry.clone(),
            )?),
            None,
        ),
        ImageRef::OciLayout { dir, tag } => {
            (Box::new(LayoutSource::new(dir.clone(), tag.clone())), None)
        }
        ImageRef::OciArchive { file, tag } => {
            let dir = store.temp_path("oci-archive");
            super::sources::extract_archive(file, &dir)?;
            (
                Box::new(LayoutSource::new(dir.clone(), tag.clone())),
                Some(dir),
            )
        }
        ImageRef::DockerArchive { file } => {
            let dir = store.temp_path("docker-archive");
            super::sources::extract_archive(file, &dir)?;
            let src = DockerArchiveSource::new(dir.clone(), &r.to_string())?;
            (Box::new(src), Some(dir))
        }
    })
}

/// Pulls `r` into `store` and builds its disk; returns its record.
pub fn pull(store: &Store, r: &ImageRef, opts: &PullOptions) -> Result<ImageRecord, OciError> {
    let lock = store.lock(true)?;
    store.clean_tmp(&lock)?;
    let (mut src, scratch) = open_source(store, r, opts)?;
    let result = pull_from(store, r, src.as_mut(), opts).and_then(|rec| {
        disk::ensure(store, &rec, opts.quiet)?;
        store.record(&lock, rec.clone())?;
        Ok(rec)
    });
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    if result.is_err() {
        // Blobs of a failed pull belong to no image: leave the store as it was.
        if let Err(e) = store.gc(&lock) {
            tracing::warn!("cleaning up after a failed pull: {e}");
        }
    }
    result
}

/// Reads the image `r` names from `src` into `store`: the manifest (through
/// an index when there is one), the config and the layer blobs, every one
/// checked (digests, sizes, media types, platform) before the next is
/// asked for. The record is not written, and no disk is built (`pull` does
/// both); `disk::unpack` applies the layers.
pub fn pull_from(
    store: &Store,
    r: &ImageRef,
    src: &mut dyn Source,
    opts: &PullOptions,
) -> Result<ImageRecord, OciError> {
    let name = r.to_string();
    let top = src.top()?;
    if top.len() as u64 > MAX_METADATA_BYTES {
        return Err(OciError::TooLarge(
            format!("{name} manifest"),
            MAX_METADATA_BYTES,
        ));
    }
    // A reference by digest names exactly those bytes.
    if let ImageRef::Registry(reference) = r {
        if let Some(want) = reference.digest() {
            let got = sha256_digest(&top);
            if got != want {
                return Err(OciError::DigestMismatch(want.to_string(), got));
            }
        }
    }
    let (manifest_bytes, index_digest) = if is_index(&top)? {
        let digest = select_platform(&name, &top)?;
        let bytes = src.manifest(&digest)?;
        let got = sha256_digest(&bytes);
        if got != digest {
            return Err(OciError::DigestMismatch(digest, got));
        }
        if is_index(&bytes)? {
            return Err(OciError::Invalid(
                "image index",
                format!("{name}: the linux/amd64 entry is another index"),
            ));
        }
        // The layout's own index.json is not content the store keeps.
        let keep = !matches!(
            r,
            ImageRef::OciLayout { tag: None, .. } | ImageRef::OciArchive { tag: None, .. }
        );
        (bytes, keep.then(|| store.put_bytes(&top)).transpose()?)
    } else {
        (top, None)
    };
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| OciError::Invalid("image manifest", e.to_string()))?;
    let manifest_digest = store.put_bytes(&manifest_bytes)?;

    let cfg_desc = manifest.config();
    let cfg_type = cfg_desc.media_type().to_string();
    if !CONFIG_TYPES.contains(&cfg_type.as_str()) {
        return Err(OciError::MediaType(cfg_type));
    }
    for l in manifest.layers() {
        let t = l.media_type().to_string();
        if !LAYER_TYPES.contains(&t.as_str()) {
            return Err(OciError::MediaType(t));
        }
    }
    let cfg_digest = cfg_desc.digest().to_string();
    if cfg_desc.size() > MAX_METADATA_BYTES {
        return Err(OciError::TooLarge(cfg_digest, MAX_METADATA_BYTES));
    }
    fetch(
        store,
        src,
        &cfg_digest,
        cfg_desc.size(),
        &ProgressBar::hidden(),
    )?;
    let config_bytes = store.read_blob(&cfg_digest, MAX_METADATA_BYTES)?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| OciError::Invalid("image config", e.to_string()))?;
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(OciError::NoPlatform(
            name,
            format!("{}/{}", config.os(), config.architecture()),
        ));
    }
    if config.rootfs().diff_ids().len() != manifest.layers().len() {
        return Err(OciError::Invalid(
            "image config",
            format!(
                "{} diff_ids for {} layers",
                config.rootfs().diff_ids().len(),
                manifest.layers().len()
            ),
        ));
    }

    let multi = MultiProgress::with_draw_target(progress_target(opts.quiet));
    let style = ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut layers = Vec::new();
    let mut size = manifest_bytes.len() as u64 + cfg_desc.size();
    for l in manifest.layers() {
        let digest = l.digest().to_string();
        let bar = multi.add(ProgressBar::new(l.size()));
        bar.set_style(style.clone());
        bar.set_prefix(digest.chars().take(19).collect::<String>());
        fetch(store, src, &digest, l.size(), &bar)?;
        bar.finish();
        size += l.size();
        layers.push(digest);
    }
    Ok(ImageRecord {
        reference: name,
        manifest_digest,
        index_digest,
        config_digest: cfg_digest,
        layers,
        size,
        created: config.created().clone(),
    })
}

/// Fetches a blob unless an intact copy is stored.
fn fetch(
    store: &Store,
    src: &mut dyn Source,
    digest: &str,
    size: u64,
    bar: &ProgressBar,
) -> Result<(), OciError> {
    if store.has_valid_blob(digest)? {
        bar.set_position(size);
        return Ok(());
    }
    store.put_blob(digest, Some(size), |w| src.blob(digest, w, &|n| bar.inc(n)))
}

/// Finds `r` in the store, pulling it when `policy` says so.
pub fn resolve(
    store: &Store,
    r: &ImageRef,
    policy: PullPolicy,
    opts: &PullOptions,
) -> Result<ImageRecord, OciError> {
    let name = r.to_string();
    let stored = {
        let _lock = store.lock(false)?;
        store.find(&name)?
    };
    match (policy, stored) {
        (PullPolicy::Always, _) | (PullPolicy::Missing, None) => pull(store, r, opts),
        (PullPolicy::Never, None) => Err(OciError::NotInStore(name)),
        (_, Some(rec)) => {
            if !store.disk_path(&rec.config_digest)?.exists() {
                let _lock = store.lock(true)?;
                disk::ensure(store, &rec, opts.quiet)?;
            }
            Ok(rec)
        }
    }
}

/// When `husk run` pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only when the image is not stored (the default).
    Missing,
    /// Every time.
    Always,
    /// Never: a missing image is an error.
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "missing" => Ok(Self::Missing),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!(
                "invalid pull policy {s:?}: missing, always or never"
            )),
        }
    }
}

/// The image's config, from the store.
pub fn config(store: &Store, rec: &ImageRecord) -> Result<ImageConfiguration, OciError> {
    let bytes = store.read_blob(&rec.config_digest, MAX_METADATA_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Invalid("image config", e.to_string()))
}
