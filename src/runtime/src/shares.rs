//! Host directories in the VM: each distinct directory (and access mode)
//! becomes one virtio-fs share served by its own virtiofsd; the agent
//! mounts it at `SHARES_DIR/<tag>` and the container's bind mount names
//! it there.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use husk_proto::{Share, SHARES_DIR};
use husk_vmm::config::FsConfig;
use oci_spec::runtime::{Mount, MountBuilder};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// One share as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostShare {
    /// The virtio-fs tag.
    pub tag: String,
    /// The host directory (canonical).
    pub dir: PathBuf,
    /// The guest cannot change it.
    pub read_only: bool,
}

/// The shares of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareSet(pub Vec<HostShare>);

impl ShareSet {
    /// Shares `dir` (once per directory and mode); returns where the guest
    /// sees it. `what` names the mount in errors.
    pub fn add(
        &mut self,
        dir: &Path,
        read_only: bool,
        what: &str,
    ) -> Result<PathBuf, RuntimeError> {
        let canon = dir
            .canonicalize()
            .map_err(|e| RuntimeError::Io(format!("{what}: {}", dir.display()), e))?;
        if !canon.is_dir() {
            return Err(RuntimeError::Invalid(format!(
                "{what}: {} is not a directory",
                dir.display()
            )));
        }
        let tag = match self
            .0
            .iter()
            .find(|s| s.dir == canon && s.read_only == read_only)
        {
            Some(s) => s.tag.clone(),
            None => {
                let tag = format!("husk{}", self.0.len());
                self.0.push(HostShare {
                    tag: tag.clone(),
                    dir: canon,
                    read_only,
                });
                tag
            }
        };
        Ok(Path::new(SHARES_DIR).join(tag))
    }

    /// The VM's virtio-fs devices.
    pub fn vm_config(&self) -> Vec<FsConfig> {
        self.0
            .iter()
            .map(|s| FsConfig {
                tag: s.tag.clone(),
                dir: s.dir.clone(),
                read_only: s.read_only,
            })
            .collect()
    }

    /// What the agent mounts.
    pub fn guest(&self) -> Vec<Share> {
        self.0
            .iter()
            .map(|s| Share {
                tag: s.tag.clone(),
                read_only: s.read_only,
            })
            .collect()
    }

    /// Whether nothing is shared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `husk run -v HOST_DIR:CONTAINER_PATH[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Host directory.
    pub host: PathBuf,
    /// Absolute path in the container.
    pub container: String,
    /// Read-only in the container (and for the VM).
    pub read_only: bool,
}

impl FromStr for Volume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid volume {s:?}: expected HOST_DIR:CONTAINER_PATH[:ro|:rw]");
        let parts: Vec<&str> = s.split(':').collect();
        let (host, container, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(bad()),
        };
        if !host.starts_with('/') || !container.starts_with('/') {
            return Err(format!("invalid volume {s:?}: both paths must be absolute"));
        }
        Ok(Volume {
            host: host.into(),
            container: container.into(),
            read_only,
        })
    }
}

/// A recursive bind mount of `source` (a guest path) on `destination`.
pub fn bind_mount(
    destination: &str,
    source: &Path,
    read_only: bool,
) -> Result<Mount, RuntimeError> {
    let mode = if read_only { "ro" } else { "rw" };
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".to_string(), mode.to_string()])
        .build()
        .map_err(|e| RuntimeError::Invalid(format!("volume {destination}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse_and_refuse_relative_paths() {
        let v: Volume = "/a:/b:ro".parse().unwrap();
        assert_eq!(
            (v.host.as_path(), v.container.as_str(), v.read_only),
            (Path::new("/a"), "/b", true)
        );
        assert!(!"/a:/b".parse::<Volume>().unwrap().read_only);
        assert!(!"/a:/b:rw".parse::<Volume>().unwrap().read_only);
        for bad in ["a:/b", "/a:b", "/a", "/a:/b:rx", "/a:/b:ro:x"] {
            assert!(bad.parse::<Volume>().is_err(), "{bad}");
        }
    }

    #[test]
    fn one_share_per_directory_and_mode() {
        let tmp = std::env::temp_dir();
        let mut s = ShareSet::default();
        let a = s.add(&tmp, false, "v").unwrap();
        let b = s.add(&tmp, false, "v").unwrap();
        let c = s.add(&tmp, true, "v").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(s.0.len(), 2);
        assert_eq!(s.guest()[1].tag, "husk1");
        assert!(s.guest()[1].read_only);
        let e = s
            .add(Path::new("/nonexistent-husk"), false, "volume /x")
            .unwrap_err();
        assert!(e.to_string().contains("volume /x"), "{e}");
        let f = s.add(Path::new("/etc/hostname"), false, "volume /y");
        assert!(f.unwrap_err().to_string().contains("not a directory"));
    }
}
