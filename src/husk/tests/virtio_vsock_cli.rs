//! `husk vm --vsock cid=N,uds=PATH` mistakes: a usage error (exit 2) for a
//! malformed flag, one line and exit 1 for a socket path that cannot be
//! used, and no socket file left behind when the VM fails to start.

mod support;

use std::time::Duration;

use support::{assert_one_line_error, husk, run_with_timeout};

const T: Duration = Duration::from_secs(60);

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("husk-vsock-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn malformed_vsock_flags_are_usage_errors() {
    for spec in [
        "cid=2,uds=/tmp/v.sock",
        "cid=0,uds=/tmp/v.sock",
        "cid=4294967295,uds=/tmp/v.sock",
        "cid=3",
        "uds=/tmp/v.sock",
        "cid=x,uds=/tmp/v.sock",
        "cid=3,uds=/tmp/v.sock,port=1",
    ] {
        let mut c = husk();
        c.args(["vm", "--vsock", spec]);
        let out = run_with_timeout(c, None, T);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("vsock"), "{spec}: {err}");
    }
}

#[test]
fn unusable_socket_paths_are_one_line_errors() {
    let dir = tempdir("paths");
    let mut c = husk();
    c.args(["vm", "--kernel", "/nonexistent/vmlinux", "--vsock"])
        .arg(format!("cid=3,uds={}/no/such/dir/v.sock", dir.display()));
    assert_one_line_error(&run_with_timeout(c, None, T), "no/such/dir/v.sock");

    let taken = dir.join("taken");
    std::fs::write(&taken, b"keep me").unwrap();
    let mut c = husk();
    c.args(["vm", "--kernel", "/nonexistent/vmlinux", "--vsock"])
        .arg(format!("cid=3,uds={}", taken.display()));
    assert_one_line_error(&run_with_timeout(c, None, T), "already exists");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failed_start_leaves_no_socket_file() {
    let dir = tempdir("failed");
    let k = dir.join("vmlinux");
    std::fs::write(&k, b"not an ELF").unwrap();
    let uds = dir.join("v.sock");
    let mut c = husk();
    c.args(["vm", "--kernel"])
        .arg(&k)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    let out = run_with_timeout(c, None, T);
    assert_one_line_error(&out, "");
    assert!(!uds.exists(), "socket file left behind");
    std::fs::remove_dir_all(dir).unwrap();
}
