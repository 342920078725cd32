//! Real Linux guest on virtio devices: root on a read-only virtio-blk disk,
//! a read-write data disk, serials; a tap in a network namespace this test
//! creates (10.x addresses exist only inside it). One boot per scenario:
//! each boot costs tens of seconds when the guest kernel is emulated.
//!
//! Needs root, /dev/net/tun, busybox-static, e2fsprogs (mkfs.ext4 -d,
//! debugfs) and iproute2.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use support::{boot_timeout, husk, kernel, run_with_timeout};

/// The guest command line: root on vda; husk adds the kvm_pvm workarounds.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 root=/dev/vda ro rootfstype=ext4 init=/init";

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
        || Path::new(tool).exists();
    assert!(found, "{tool} missing: apt-get install {package}");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("husk-virtio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An ext4 root image holding busybox and `init`.
fn root_image(dir: &Path, init: &str) -> PathBuf {
    need("mkfs.ext4", "e2fsprogs");
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let tree = dir.join("tree");
    for d in ["bin", "proc", "sys", "dev", "tmp", "data"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    let init_path = tree.join("init");
    std::fs::write(&init_path, init).unwrap();
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("root.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M"));
    img
}

fn boot(args: &[&str]) -> (String, String, Option<i32>) {
    let mut c = husk();
    c.args(["vm", "--mem", "128", "--kernel"])
        .arg(kernel())
        .args(["--cmdline", CMDLINE])
        .args(args);
    let out = run_with_timeout(c, None, boot_timeout());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

fn marker<'a>(console: &'a str, stderr: &str, name: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} line.\nconsole:\n{console}\nstderr:\n{stderr}"))
}

const DISK_INIT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
echo "SERIALS: vda=$($bb cat /sys/block/vda/serial) vdb=$($bb cat /sys/block/vdb/serial) ro=$($bb cat /sys/block/vda/ro)$($bb cat /sys/block/vdb/ro)"
if $bb dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then w=written; else w=refused; fi
if $bb mount -o remount,rw / 2>/dev/null; then r=rw; else r=refused; fi
echo "ROOT: dd=$w remount=$r"
$bb mount -t ext4 /dev/vdb /data
echo "hello from the guest $($bb cat /proc/sys/kernel/random/boot_id)" > /data/hello.txt
$bb sync
$bb umount /data
echo "DATA: written"
$bb reboot -f
"#;

#[test]
fn root_on_a_read_only_disk_and_a_data_disk_that_keeps_writes() {
    need("debugfs", "e2fsprogs");
    let dir = Scratch::new("disks");
    let root = root_image(&dir.0, DISK_INIT);
    let data = dir.0.join("data.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&data)
        .arg("64M"));
    let root_before = std::fs::read(&root).unwrap();

    let root_spec = format!("path={},ro,id=husk-root", root.display());
    let data_spec = format!("path={},id=husk-data-0123456789", data.display());
    let (console, stderr, code) = boot(&["--disk", &root_spec, "--disk", &data_spec]);

    let serials = marker(&console, &stderr, "SERIALS: ");
    assert_eq!(
        serials, "vda=husk-root vdb=husk-data-0123456789 ro=10",
        "serials and read-only flags"
    );
    assert_eq!(
        marker(&console, &stderr, "ROOT: "),
        "dd=refused remount=refused"
    );
    marker(&console, &stderr, "DATA: ");
    assert_eq!(code, Some(0), "guest reboot must exit 0; stderr: {stderr}");

    // The guest's file is in the image on the host.
    let text = run(Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&data));
    assert!(text.starts_with("hello from the guest "), "{text:?}");
    // The read-only root is byte for byte what it was.
    assert!(
        std::fs::read(&root).unwrap() == root_before,
        "ro disk changed"
    );
    // The data image is still sparse.
    let meta = std::fs::metadata(&data).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "data image lost its holes: {} of {} bytes allocated",
        meta.blocks() * 512,
        meta.len()
    );
}

/// A network namespace with a tap, deleted on drop (with the tap).
struct Netns {
    name: String,
}
impl Netns {
    fn new(name: &str, tap: &str, host_cidr: &str) -> Self {
        need("ip", "iproute2");
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns {
            name: name.to_string(),
        };
        let ip = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", name, "ip"])
                .args(args))
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["addr", "add", host_cidr, "dev", tap]);
        ip(&["link", "set", tap, "up"]);
        ns
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Echoes exactly `len` bytes on one TCP connection, from inside `netns`.
/// Sends back the number of bytes echoed.
fn echo_server(netns: &str, addr: &str, len: usize) -> mpsc::Receiver<std::io::Result<usize>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns_path = format!("/run/netns/{netns}");
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = std::fs::File::open(&ns_path)?;
            // SAFETY: setns moves only this thread into the namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let listener = TcpListener::bind(&addr)?;
            let _ = ready_tx.send(());
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(600)))?;
            let mut buf = vec![0u8; 65536];
            let mut n = 0;
            while n < len {
                let got = conn.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                conn.write_all(&buf[..got])?;
                n += got;
            }
            Ok(n)
        })();
        let _ = tx.send(result);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("echo server did not start");
    rx
}

const NET_INIT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t tmpfs tmp /tmp
$bb ip link set lo up
$bb ip addr add 10.213.7.2/24 dev eth0
$bb ip link set eth0 up
echo "MAC: $($bb cat /sys/class/net/eth0/address)"
if $bb ping -c 3 -W 10 10.213.7.1 >/dev/null; then echo "PING: ok"; else echo "PING: failed"; fi
$bb dd if=/dev/urandom of=/tmp/blob bs=1024 count=1024 2>/dev/null
$bb nc 10.213.7.1 7007 < /tmp/blob > /tmp/echo
nc_rc=$?
sent=$($bb md5sum < /tmp/blob 2>&1)
sent_rc=$?
got=$($bb md5sum < /tmp/echo 2>&1)
got_rc=$?
echo "ECHO: sent=${sent%% *} got=${got%% *} bytes=$($bb wc -c < /tmp/echo) status=$nc_rc,$sent_rc,$got_rc"
echo "MD5: sent=[$sent] got=[$got]"
$bb reboot -f
"#;

#[test]
fn guest_pings_and_echoes_a_mebibyte_over_a_tap() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun missing (modprobe tun)"
    );
    let dir = Scratch::new("net");
    let root = root_image(&dir.0, NET_INIT);
    let id = std::process::id();
    let ns_name = format!("husk-vt-{id}");
    let tap = format!("hvt{}", id % 100_000);
    let _ns = Netns::new(&ns_name, &tap, "10.213.7.1/24");
    let echoed = echo_server(&ns_name, "10.213.7.1:7007", 1 << 20);

    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns_name])
        .arg(env!("CARGO_BIN_EXE_husk"))
        .args(["vm", "--mem", "128", "--kernel"])
        .arg(kernel())
        .args(["--cmdline", CMDLINE])
        .arg("--disk")
        .arg(format!("path={},ro", root.display()))
        .arg("--net")
        .arg(format!("tap={tap},mac=02:68:75:73:6b:01"));
    let out = run_with_timeout(c, None, boot_timeout());
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(marker(&console, &stderr, "MAC: "), "02:68:75:73:6b:01");
    assert_eq!(marker(&console, &stderr, "PING: "), "ok");
    let echo = marker(&console, &stderr, "ECHO: ");
    let field = |k: &str| {
        echo.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    // On a mismatch, everything: each md5sum's own output and status
    // (nc, md5sum of what was sent, of what came back), and the console.
    let all = format!("{echo}\nconsole:\n{console}\nstderr:\n{stderr}");
    assert_eq!(field("status="), "0,0,0", "{all}");
    assert_eq!(field("bytes="), "1048576", "{all}");
    assert_eq!(field("sent="), field("got="), "{all}");
    assert_eq!(field("sent=").len(), 32, "{all}");
    assert_eq!(
        echoed
            .recv_timeout(Duration::from_secs(10))
            .expect("echo server finished")
            .expect("echo server ok"),
        1 << 20
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
}
