//! `husk vm --disk/--net` mistakes: one line on stderr, exit 1 (or 2 for
//! malformed flags), and nothing left behind.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{assert_one_line_error, husk, run_with_timeout};

const T: Duration = Duration::from_secs(60);

#[test]
fn a_missing_disk_is_one_line_and_exit_1() {
    let mut c = husk();
    c.args([
        "vm",
        "--kernel",
        "/nonexistent/vmlinux",
        "--disk",
        "path=/nonexistent/disk.img,ro",
    ]);
    let out = run_with_timeout(c, None, T);
    assert_one_line_error(&out, "/nonexistent/disk.img");
}

#[test]
fn malformed_disk_and_net_flags_are_usage_errors() {
    for args in [
        ["--disk", "path=/x.img,rw"],
        ["--disk", "ro"],
        ["--net", "tap=t0,mac=01:00:00:00:00:01"],
        ["--net", "mac=02:00:00:00:00:01"],
    ] {
        let mut c = husk();
        c.arg("vm").args(args);
        let out = run_with_timeout(c, None, T);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn bad_disk_ids_and_tap_names_are_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("husk-virtio-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("d.img");
    std::fs::write(&img, [0u8; 512]).unwrap();
    let mut c = husk();
    c.args(["vm", "--disk"]).arg(format!(
        "path={},id=way-too-long-for-a-virtio-serial",
        img.display()
    ));
    assert_one_line_error(&run_with_timeout(c, None, T), "invalid disk id");
    let mut c = husk();
    c.args(["vm", "--net", "tap=no/slash"]);
    assert_one_line_error(&run_with_timeout(c, None, T), "invalid tap name");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_tap_husk_created_is_gone_after_a_failed_start() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun missing (modprobe tun)");
    }
    let ns = format!("husk-vc-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let st = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip (iproute2)");
    assert!(st.success());
    // The kernel is garbage: the build fails after the tap was created.
    let dir = std::env::temp_dir().join(format!("husk-virtio-cli-tap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = dir.join("vmlinux");
    std::fs::write(&k, b"not an ELF").unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns])
        .arg(env!("CARGO_BIN_EXE_husk"))
        .args(["vm", "--kernel"])
        .arg(&k)
        .args(["--net", "tap=hkfail0"]);
    let out = run_with_timeout(c, None, T);
    let shown = Command::new("ip")
        .args(["netns", "exec", &ns, "ip", "link", "show", "hkfail0"])
        .output()
        .unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    std::fs::remove_dir_all(dir).unwrap();
    assert_one_line_error(&out, "");
    assert!(!shown.status.success(), "tap left behind");
}
