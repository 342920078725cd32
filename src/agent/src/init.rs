//! PID 1 duties before serving: leave the boot root, mount the basic
//! filesystems and cgroups, bring up `lo`; and the kernel command-line
//! options the agent reads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys;

/// A failed init step.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct InitError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn ctx(r: io::Result<()>, what: &'static str, path: &Path) -> Result<(), InitError> {
    r.map_err(|source| InitError {
        what,
        path: path.to_owned(),
        source,
    })
}

/// (source, target, fstype, flags, data) of the agent's own mounts.
const BASE_MOUNTS: &[(&str, &str, &str, u64, &str)] = &[
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    (
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    ),
    (
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    ),
];

const NOSUID_NODEV_NOEXEC: u64 = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Everything PID 1 sets up before it listens.
pub fn init_system() -> Result<(), InitError> {
    leave_boot_root()?;
    for &(source, target, fstype, flags, data) in BASE_MOUNTS {
        let target = Path::new(target);
        ctx(fs::create_dir_all(target), "create", target)?;
        let r = sys::mount(
            Some(Path::new(source)),
            target,
            Some(fstype),
            flags,
            Some(data),
        );
        match r {
            // The kernel mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            r => ctx(r, "mount", target)?,
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let cgroups = fs::read_to_string("/proc/cgroups").unwrap_or_default();
    mount_cgroups(&filesystems, &cgroups)?;
    ctx(crate::net::interface_up("lo"), "bring up", Path::new("lo"))?;
    Ok(())
}

/// Leaves the boot root (the agent's read-only disk, or an initramfs under
/// `husk vm --initrd`, which pivot_root cannot leave): like switch_root,
/// move a fresh tmpfs over `/` and chroot into it, so containers get a
/// writable root to make their mount points in. The agent binary keeps
/// running from the old root's pages.
fn leave_boot_root() -> Result<(), InitError> {
    let new_root = Path::new("/.root");
    ctx(fs::create_dir_all(new_root), "create", new_root)?;
    ctx(
        sys::mount(
            Some(Path::new("tmpfs")),
            new_root,
            Some("tmpfs"),
            0,
            Some("mode=0755"),
        ),
        "mount",
        new_root,
    )?;
    ctx(std::env::set_current_dir(new_root), "chdir", new_root)?;
    let dot = Path::new(".");
    ctx(
        sys::mount(Some(dot), Path::new("/"), None, libc::MS_MOVE, None),
        "move",
        new_root,
    )?;
    ctx(sys::chroot(dot), "chroot", new_root)?;
    ctx(std::env::set_current_dir("/"), "chdir", Path::new("/"))
}

/// What to mount at /sys/fs/cgroup.
#[derive(Debug, PartialEq, Eq)]
pub enum CgroupMount {
    /// cgroup2.
    V2,
    /// One v1 hierarchy per entry (comma-joined controllers).
    V1(Vec<String>),
    /// The kernel has no cgroups.
    None,
}

/// Where the guest mounts its v1 `devices` hierarchy.
pub const DEVICES_CGROUP: &str = "/run/cgroup-devices";

/// The controllers `/proc/cgroups` lists as enabled.
fn enabled_controllers(proc_cgroups: &str) -> impl Iterator<Item = &str> {
    proc_cgroups
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[3] == "1").then_some(f[0])
        })
}

/// Whether `/proc/cgroups` lists `name` as enabled.
pub fn has_enabled_controller(proc_cgroups: &str, name: &str) -> bool {
    enabled_controllers(proc_cgroups).any(|c| c == name)
}

/// Chooses the cgroup layout from `/proc/filesystems` and `/proc/cgroups`:
/// v2 when the kernel has it, else v1 with `cpu,cpuacct` together.
pub fn choose_cgroups(filesystems: &str, proc_cgroups: &str) -> CgroupMount {
    let has = |name: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(name))
    };
    if has("cgroup2") {
        return CgroupMount::V2;
    }
    if !has("cgroup") {
        return CgroupMount::None;
    }
    let mut controllers: Vec<String> = enabled_controllers(proc_cgroups)
        .map(str::to_owned)
        .collect();
    if controllers.iter().any(|c| c == "cpu") && controllers.iter().any(|c| c == "cpuacct") {
        controllers.retain(|c| c != "cpu" && c != "cpuacct");
        controllers.push("cpu,cpuacct".to_owned());
    }
    CgroupMount::V1(controllers)
}

fn mount_cgroups(filesystems: &str, proc_cgroups: &str) -> Result<(), InitError> {
    let root = Path::new("/sys/fs/cgroup");
    match choose_cgroups(filesystems, proc_cgroups) {
        CgroupMount::None => Ok(()),
        CgroupMount::V2 => {
            ctx(sys::mount_cgroup2(root, NOSUID_NODEV_NOEXEC), "mount", root)?;
            // The device controller has no v2 files (v2 filters devices
            // with BPF programs): it gets a v1 hierarchy of its own, which
            // the agent finds in mountinfo. Containers do not see it.
            if has_enabled_controller(proc_cgroups, "devices") {
                mount_v1_hierarchy(Path::new(DEVICES_CGROUP), "devices")?;
            }
            Ok(())
        }
        CgroupMount::V1(hierarchies) => {
            ctx(
                sys::mount(
                    Some(Path::new("tmpfs")),
                    root,
                    Some("tmpfs"),
                    NOSUID_NODEV_NOEXEC,
                    Some("mode=0755"),
                ),
                "mount",
                root,
            )?;
            for h in hierarchies {
                mount_v1_hierarchy(&root.join(&h), &h)?;
            }
            Ok(())
        }
    }
}

/// Creates `dir` and mounts the v1 hierarchy of `controllers` (comma-joined)
/// there.
fn mount_v1_hierarchy(dir: &Path, controllers: &str) -> Result<(), InitError> {
    ctx(fs::create_dir_all(dir), "create", dir)?;
    ctx(
        sys::mount(
            Some(Path::new("cgroup")),
            dir,
            Some("cgroup"),
            NOSUID_NODEV_NOEXEC,
            Some(controllers),
        ),
        "mount",
        dir,
    )
}

/// Options read from the kernel command line (`husk.NAME=VALUE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdlineOptions {
    /// `husk.drain_timeout_ms`: how long output may take to drain after
    /// the process exited.
    pub drain_timeout: Duration,
    /// `husk.template`: this VM becomes a warm template (husk snapshots it
    /// once the agent is ready and restores it for each container), so
    /// the agent does ahead what every restore would otherwise do first.
    pub template: bool,
}

impl Default for CmdlineOptions {
    fn default() -> Self {
        CmdlineOptions {
            drain_timeout: Duration::from_secs(5),
            template: false,
        }
    }
}

/// Reads and maps every page of this program's own file-backed read-only
/// mappings (its code and constants), found in /proc/self/maps by the
/// executable's device and inode; returns how many bytes that was.
pub fn map_own_binary() -> io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let exe = fs::metadata("/proc/self/exe")?;
    let (major, minor) = (libc::major(exe.dev()), libc::minor(exe.dev()));
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut bytes = 0;
    for (start, end) in own_read_only_ranges(&maps, major, minor, exe.ino()) {
        sys::populate_read(start, end - start)?;
        bytes += end - start;
    }
    Ok(bytes)
}

/// The address ranges of /proc/self/maps lines that map file
/// `major:minor` `ino` without write permission.
fn own_read_only_ranges(maps: &str, major: u32, minor: u32, ino: u64) -> Vec<(usize, usize)> {
    let dev = format!("{major:02x}:{minor:02x}");
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, _offset, d, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            if perms.contains('w') || d != dev || inode.parse::<u64>().ok()? != ino {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            (a < b).then_some((a, b))
        })
        .collect()
}

/// Parses `/proc/cmdline`; unknown or malformed `husk.` options are
/// ignored (the VMM builds the command line).
pub fn parse_cmdline(cmdline: &str) -> CmdlineOptions {
    let mut opts = CmdlineOptions::default();
    for word in cmdline.split_whitespace() {
        if word == husk_proto::TEMPLATE_CMDLINE_WORD {
            opts.template = true;
        }
        if let Some(v) = word.strip_prefix("husk.drain_timeout_ms=") {
            if let Ok(ms) = v.parse() {
                opts.drain_timeout = Duration::from_millis(ms);
            }
        }
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_choice() {
        let fs_v2 = "nodev\tsysfs\nnodev\tcgroup\nnodev\tcgroup2\n\text4\n";
        assert_eq!(choose_cgroups(fs_v2, ""), CgroupMount::V2);
        let fs_v1 = "nodev\tsysfs\nnodev\tcgroup\n";
        let proc_cgroups = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
            cpu\t0\t1\t1\ncpuacct\t0\t1\t1\nmemory\t0\t1\t1\npids\t0\t1\t0\n";
        assert_eq!(
            choose_cgroups(fs_v1, proc_cgroups),
            CgroupMount::V1(vec!["memory".into(), "cpu,cpuacct".into()])
        );
        assert_eq!(choose_cgroups("nodev\tsysfs\n", ""), CgroupMount::None);
        let cgroups =
            "#subsys_name\thierarchy\tnum_cgroups\tenabled\ndevices\t0\t1\t1\npids\t0\t1\t0\n";
        assert!(has_enabled_controller(cgroups, "devices"));
        assert!(!has_enabled_controller(cgroups, "pids"));
        assert!(!has_enabled_controller(cgroups, "memory"));
    }

    #[test]
    fn own_mappings_are_found_by_device_and_inode() {
        let maps = "\
00400000-00401000 r--p 00000000 fd:00 1234 /husk-agent
00401000-00700000 r-xp 00001000 fd:00 1234 /husk-agent
00700000-00800000 r--p 00300000 fd:00 1234 /husk-agent
00800000-00810000 rw-p 00400000 fd:00 1234 /husk-agent
00900000-00910000 r--p 00000000 fd:01 1234 /other-disk-same-inode
00a00000-00a10000 r--p 00000000 fd:00 99 /other-file
00b00000-00c00000 rw-p 00000000 00:00 0 [heap]
7ffd0000-7ffe0000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            own_read_only_ranges(maps, 0xfd, 0, 1234),
            vec![
                (0x400000, 0x401000),
                (0x401000, 0x700000),
                (0x700000, 0x800000)
            ]
        );
        assert!(own_read_only_ranges("garbage\n1-2\n", 0xfd, 0, 1234).is_empty());
    }

    #[test]
    fn map_own_binary_maps_the_test_binary() {
        let bytes = map_own_binary().unwrap();
        let size = fs::metadata("/proc/self/exe").unwrap().len() as usize;
        // Its code and constants: some of the file, not more than all.
        assert!(
            bytes > 0 && bytes <= size.next_multiple_of(4096),
            "{bytes} of {size}"
        );
    }

    #[test]
    fn cmdline_options() {
        let o = parse_cmdline("console=ttyS0 husk.template husk.drain_timeout_ms=250 reboot=k\n");
        assert_eq!(o.drain_timeout, Duration::from_millis(250));
        assert!(o.template);
        assert!(!parse_cmdline("husk.templated").template);
        let o = parse_cmdline("husk.drain_timeout_ms=bogus");
        assert_eq!(o, CmdlineOptions::default());
    }
}
