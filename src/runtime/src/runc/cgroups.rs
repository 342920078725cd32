//! `linux.cgroupsPath` on the host: the VMM process joins that cgroup in
//! every hierarchy (cgroup v1 controllers, the v2 tree), so the host
//! accounts the VM's memory and CPU there — `docker stats` and
//! `ctr task metrics` read them from the cgroup of the pid the shim knows.
//! The limits themselves apply to the container inside the guest: a VM
//! needs room above its container's limit, so none are set here. Paths in
//! the systemd form (`slice:prefix:name`) are left alone: husk does not
//! talk to systemd.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::RuntimeError;

/// A cgroup hierarchy: where it is mounted and the calling process's
/// cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    own: PathBuf,
    cpuset: bool,
}

/// The hierarchies of `/proc/self/mountinfo` and the process's cgroups in
/// them (`/proc/self/cgroup`).
fn hierarchies(mountinfo: &str, proc_cgroup: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or_default();
        let _source = post.next();
        let opts = post.next().unwrap_or_default();
        let Some(mount) = pre.split(' ').nth(4) else {
            continue;
        };
        let opts: Vec<&str> = opts.split(',').collect();
        // `/proc/self/cgroup`: "ID:controllers:path"; controllers are
        // empty for v2, and a v1 mount's options name all of its own.
        let own = proc_cgroup.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            let matches = match fstype {
                "cgroup2" => ctrls.is_empty(),
                "cgroup" => !ctrls.is_empty() && ctrls.split(',').all(|c| opts.contains(&c)),
                _ => false,
            };
            matches.then(|| PathBuf::from(path))
        });
        let Some(own) = own else { continue };
        out.push(Hierarchy {
            mount: PathBuf::from(mount),
            own,
            cpuset: fstype == "cgroup" && opts.contains(&"cpuset"),
        });
    }
    out
}

/// Checks `path` and says where it is: absolute paths from each
/// hierarchy's root, relative ones below the caller's own cgroup.
/// `None`: the systemd form, not handled.
fn relative(path: &str) -> Result<Option<(bool, PathBuf)>, RuntimeError> {
    if path.contains(':') {
        return Ok(None);
    }
    let p = Path::new(path);
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(RuntimeError::Invalid(format!(
            "linux.cgroupsPath {path:?}: \"..\" is not allowed"
        )));
    }
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if rel.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some((p.is_absolute(), rel)))
}

/// A new cpuset cgroup starts with no CPUs and no memory nodes, and
/// nothing can join it: give it its parent's, as runc does.
fn inherit_cpuset(dir: &Path) -> io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let f = dir.join(file);
        if fs::read_to_string(&f)?.trim().is_empty() {
            if let Some(parent) = dir.parent() {
                let v = fs::read_to_string(parent.join(file))?;
                fs::write(&f, v.trim())?;
            }
        }
    }
    Ok(())
}

/// Moves process `pid` into `cgroups_path` in every hierarchy, creating
/// the directories; adds those it created (deepest last) to `created`,
/// for [`remove`], failing or not.
pub fn place(cgroups_path: &str, pid: u32, created: &mut Vec<PathBuf>) -> Result<(), RuntimeError> {
    let Some((absolute, rel)) = relative(cgroups_path)? else {
        if cgroups_path.contains(':') {
            tracing::info!("cgroupsPath {cgroups_path:?} is systemd's form: not joined");
        }
        return Ok(());
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| RuntimeError::Io("/proc/self/mountinfo".into(), e))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| RuntimeError::Io("/proc/self/cgroup".into(), e))?;
    for h in hierarchies(&mountinfo, &own) {
        let base = if absolute {
            h.mount.clone()
        } else {
            h.mount.join(h.own.strip_prefix("/").unwrap_or(&h.own))
        };
        let mut dir = base;
        for c in rel.components() {
            dir.push(c);
            // Another container may be making the same parent right now.
            let made = match fs::create_dir(&dir) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => {
                    return Err(RuntimeError::Io(
                        format!("create cgroup {}", dir.display()),
                        e,
                    ))
                }
            };
            if made {
                created.push(dir.clone());
            }
            // Also when another container made it: it may not have given
            // it its CPUs yet (writing the parent's values twice is fine).
            if h.cpuset {
                inherit_cpuset(&dir).map_err(|e| {
                    RuntimeError::Io(format!("cpuset of cgroup {}", dir.display()), e)
                })?;
            }
        }
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .map_err(|e| RuntimeError::Io(format!("join cgroup {}", dir.display()), e))?;
    }
    Ok(())
}

/// Removes cgroups [`place`] created (once their processes are gone); a
/// parent another container still uses stays.
pub fn remove(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        if let Err(e) = fs::remove_dir(d) {
            if e.kind() != io::ErrorKind::NotFound && e.raw_os_error() != Some(libc::EBUSY) {
                tracing::warn!("remove cgroup {}: {e}", d.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
";
    const CGROUP: &str = "\
9:name=systemd:/
4:memory:/process_api/abc
3:cpuset:/
2:cpu,cpuacct:/
0::/
";

    #[test]
    fn every_hierarchy_and_our_place_in_it() {
        let h = hierarchies(MOUNTINFO, CGROUP);
        let mounts: Vec<_> = h.iter().map(|h| h.mount.display().to_string()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/systemd"
            ]
        );
        assert_eq!(h[3].own, Path::new("/process_api/abc"));
        assert!(h[2].cpuset && !h[3].cpuset);
    }

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            relative("/docker/abc").unwrap(),
            Some((true, PathBuf::from("docker/abc")))
        );
        assert_eq!(
            relative("ctr/x").unwrap(),
            Some((false, PathBuf::from("ctr/x")))
        );
        assert_eq!(relative("system.slice:docker:abc").unwrap(), None);
        assert_eq!(relative("/").unwrap(), None);
        assert!(relative("/docker/../../etc").is_err());
    }
}
