//! Image references: a registry name (`alpine`, `localhost:5000/app:1`,
//! `name@sha256:…`, normalized the way docker does), or a transport prefix
//! for local files: `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE`.

use std::fmt;
use std::path::{Path, PathBuf};

use oci_client::Reference;

use super::OciError;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A registry (OCI distribution spec).
    Registry(Reference),
    /// An OCI image layout directory.
    OciLayout {
        /// Absolute directory.
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` to select; None: the only image.
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        /// Absolute file.
        file: PathBuf,
        /// As for the layout.
        tag: Option<String>,
    },
    /// What `docker save` writes.
    DockerArchive {
        /// Absolute file.
        file: PathBuf,
    },
}

/// Splits `PATH[:TAG]`: a tag is what follows the last ':' when it holds
/// no '/'.
fn path_and_tag(s: &str) -> (&str, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
        _ => (s, None),
    }
}

fn absolute(whole: &str, p: &str) -> Result<PathBuf, OciError> {
    if p.is_empty() {
        return Err(OciError::BadReference(whole.into(), "empty path".into()));
    }
    std::fs::canonicalize(Path::new(p)).map_err(|e| OciError::Source(p.to_string(), e))
}

impl ImageRef {
    /// Parses a reference as a user typed it.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (p, tag) = path_and_tag(rest);
            return Ok(Self::OciLayout {
                dir: absolute(s, p)?,
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (p, tag) = path_and_tag(rest);
            return Ok(Self::OciArchive {
                file: absolute(s, p)?,
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            return Ok(Self::DockerArchive {
                file: absolute(s, rest)?,
            });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return Self::parse(rest);
        }
        let r = s
            .parse::<Reference>()
            .map_err(|e| OciError::BadReference(s.into(), e.to_string()))?;
        if let Some(d) = r.digest() {
            super::store::digest_hex(d)?;
        }
        Ok(Self::Registry(r))
    }

    /// The registry host husk talks to, for registry references.
    pub fn registry(&self) -> Option<&str> {
        match self {
            Self::Registry(r) => Some(r.resolve_registry()),
            _ => None,
        }
    }
}

/// The normalized name the store keeps the image under.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tagged = |f: &mut fmt::Formatter<'_>, kind: &str, p: &Path, tag: &Option<String>| {
            write!(f, "{kind}:{}", p.display())?;
            match tag {
                Some(t) => write!(f, ":{t}"),
                None => Ok(()),
            }
        };
        match self {
            Self::Registry(r) => write!(f, "{}", r.whole()),
            Self::OciLayout { dir, tag } => tagged(f, "oci", dir, tag),
            Self::OciArchive { file, tag } => tagged(f, "oci-archive", file, tag),
            Self::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_normalize_like_docker() {
        let n = |s: &str| ImageRef::parse(s).unwrap().to_string();
        assert_eq!(n("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(n("alpine:3.19"), "docker.io/library/alpine:3.19");
        assert_eq!(n("docker://user/app"), "docker.io/user/app:latest");
        assert_eq!(n("localhost:5000/app:1"), "localhost:5000/app:1");
        assert_eq!(n("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            n(&format!("localhost:5000/app@{d}")),
            format!("localhost:5000/app@{d}")
        );
        assert_eq!(
            ImageRef::parse("alpine").unwrap().registry(),
            Some("index.docker.io")
        );
        for bad in ["", "app/Upper", "a@sha256:123", "a@md5:00", "a b"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn local_transports() {
        let dir = std::env::temp_dir();
        let shown = std::fs::canonicalize(&dir).unwrap();
        let r = ImageRef::parse(&format!("oci:{}:v1", dir.display())).unwrap();
        assert_eq!(
            r,
            ImageRef::OciLayout {
                dir: shown.clone(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(r.to_string(), format!("oci:{}:v1", shown.display()));
        let r = ImageRef::parse(&format!("oci:{}", dir.display())).unwrap();
        assert!(matches!(r, ImageRef::OciLayout { tag: None, .. }));
        assert!(ImageRef::parse("oci-archive:/no/such/file.tar").is_err());
        assert!(ImageRef::parse("docker-archive:").is_err());
    }
}
