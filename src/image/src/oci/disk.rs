//! An image's read-only guest disk: its layers applied in order to a
//! staging tree in the store's tmp/, then `mkfs.ext4 -d` of that tree,
//! renamed into `disks/<config hex>.ext4`. ext4 because the guest kernel
//! and `husk run --rootfs` already use it and e2fsprogs is the reference
//! tool; one file per image config serves any number of VMs at once
//! (each attaches it read-only; writes go to the container's own upper
//! layer in the guest).
//!
//! The image's /etc/passwd and /etc/group are kept next to the disk so
//! that `-u NAME` resolves on the host without reading the disk.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use super::layer::{decompress, Applier};
use super::{pull, ImageRecord, OciError, Store};

/// Largest passwd/group file kept.
const MAX_ACCOUNTS_FILE: u64 = 1 << 20;

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |e| OciError::Store(p.display().to_string(), e)
}

/// The image's disk, built now if it is not in the store. Exclusive lock
/// held by the caller.
pub fn ensure(store: &Store, rec: &ImageRecord, quiet: bool) -> Result<PathBuf, OciError> {
    let out = store.disk_path(&rec.config_digest)?;
    if out.exists() {
        return Ok(out);
    }
    let spinner = if quiet || !io::IsTerminal::is_terminal(&io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message("building disk: unpacking layers");
    let staging = store.temp_path("rootfs");
    let result = build(store, rec, &staging, &out, &spinner);
    let _ = fs::remove_dir_all(&staging);
    spinner.finish_and_clear();
    result.map(|()| out)
}

/// Applies the image's layers in order to `dest`, a directory that must
/// not exist yet (the image's flattened tree, as the disk holds it).
pub fn unpack(store: &Store, rec: &ImageRecord, dest: &Path) -> Result<(), OciError> {
    let config = pull::config(store, rec)?;
    let diff_ids = config.rootfs().diff_ids();
    fs::create_dir(dest).map_err(io_err(dest))?;
    let mut applier = Applier::new();
    for (digest, diff_id) in rec.layers.iter().zip(diff_ids) {
        let p = store.blob_path(digest)?;
        let f = fs::File::open(&p).map_err(io_err(&p))?;
        let stream = decompress(f).map_err(io_err(&p))?;
        applier.apply(dest, digest, stream, Some(diff_id))?;
    }
    applier.finish().map_err(io_err(dest))
}

fn build(
    store: &Store,
    rec: &ImageRecord,
    staging: &Path,
    out: &Path,
    spinner: &ProgressBar,
) -> Result<(), OciError> {
    unpack(store, rec, staging)?;
    for name in ["passwd", "group"] {
        keep_accounts_file(store, &rec.config_digest, staging, name)?;
    }
    spinner.set_message("building disk: mkfs.ext4");
    let (_, size) = crate::ext4::fingerprint(staging)?;
    let tmp = store.temp_path("disk");
    let r = crate::ext4::build(staging, &tmp, size)
        .map_err(OciError::from)
        .and_then(|()| fs::rename(&tmp, out).map_err(io_err(out)));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Copies the tree's /etc/NAME (a regular file, not a link) next to the
/// disk; an empty file when the image has none.
fn keep_accounts_file(
    store: &Store,
    config_digest: &str,
    tree: &Path,
    name: &str,
) -> Result<(), OciError> {
    let src = tree.join("etc").join(name);
    let mut text = Vec::new();
    let etc_is_dir = fs::symlink_metadata(tree.join("etc")).is_ok_and(|m| m.is_dir());
    if etc_is_dir && fs::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
        fs::File::open(&src)
            .and_then(|f| f.take(MAX_ACCOUNTS_FILE).read_to_end(&mut text))
            .map_err(io_err(&src))?;
    }
    let dest = accounts_path(store, config_digest, name)?;
    let tmp = store.temp_path(name);
    fs::write(&tmp, &text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &dest).map_err(io_err(&dest))
}

fn accounts_path(store: &Store, config_digest: &str, name: &str) -> Result<PathBuf, OciError> {
    Ok(store.disk_path(config_digest)?.with_extension(name))
}

/// A user resolved against the image's accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership).
    pub additional_gids: Vec<u32>,
    /// Home directory, if the user is in /etc/passwd.
    pub home: Option<String>,
}

/// Resolves `USER[:GROUP]` (names or numbers) the way docker does: a
/// name must exist in the image's /etc/passwd (or /etc/group); a number
/// need not. Without a group, the user's primary group from passwd (or
/// the uid's number when the user is unknown... as docker, gid 0).
pub fn resolve_user(passwd: &str, group: &str, spec: &str) -> Result<ResolvedUser, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(format!("invalid user {spec:?}"));
    }
    let pw = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then(|| {
            (
                f[0],
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5],
            )
        })
    });
    let entry = if let Ok(uid) = user.parse::<u32>() {
        pw.clone()
            .find(|e| e.1 == Some(uid))
            .map(|e| (e.0, uid, e.2, Some(e.3)))
            .or(Some(("", uid, None, None)))
    } else {
        pw.clone()
            .find(|e| e.0 == user)
            .and_then(|e| Some((e.0, e.1?, e.2, Some(e.3))))
    };
    let (uname, uid, primary, home) = entry
        .ok_or_else(|| format!("unable to find user {user}: no matching entries in passwd file"))?;
    let groups: Vec<(&str, Option<u32>, Vec<&str>)> = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| {
                let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
                (f[0], f[2].parse::<u32>().ok(), members)
            })
        })
        .collect();
    let gid = match grp {
        None => primary.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|e| e.0 == g)
                .and_then(|e| e.1)
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
    };
    let mut additional_gids: Vec<u32> = if grp.is_none() && !uname.is_empty() {
        groups
            .iter()
            .filter(|e| e.2.contains(&uname))
            .filter_map(|e| e.1)
            .filter(|g| *g != gid)
            .collect()
    } else {
        Vec::new()
    };
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: home.map(str::to_string),
    })
}

/// Resolves a user spec against an image in the store.
pub fn resolve_image_user(
    store: &Store,
    rec: &ImageRecord,
    spec: &str,
) -> Result<ResolvedUser, OciError> {
    let read = |name| -> Result<String, OciError> {
        let p = accounts_path(store, &rec.config_digest, name)?;
        match fs::read(&p) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(OciError::Store(p.display().to_string(), e)),
        }
    };
    resolve_user(&read("passwd")?, &read("group")?, spec).map_err(|e| OciError::Invalid("user", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\nstaff:x:50:app\napp:x:1000:\n";

    #[test]
    fn users_resolve_like_docker() {
        let r = |s| resolve_user(PASSWD, GROUP, s);
        let app = r("app").unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.additional_gids, vec![10, 50]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert!(r("app:staff").unwrap().additional_gids.is_empty());
        assert_eq!(r("1000").unwrap().gid, 1000, "a known uid gets its group");
        let unknown = r("4242:7").unwrap();
        assert_eq!((unknown.uid, unknown.gid, unknown.home), (4242, 7, None));
        assert_eq!(r("4242").unwrap().gid, 0);
        assert!(r("nobody")
            .unwrap_err()
            .contains("unable to find user nobody"));
        assert!(r("app:nogroup")
            .unwrap_err()
            .contains("unable to find group"));
        assert!(r(":1").is_err());
    }
}
