//! Real Linux guest: the project's guest kernel with a busybox initramfs.
//! One boot serves all checks (each boot costs tens of seconds on kvm_pvm
//! hosts). On kvm_pvm the guest has the VMM's fill device fill its memmap,
//! copy the initramfs's files (the busybox it runs must be the host's, byte
//! for byte) and carry its console text.

mod support;

use std::path::PathBuf;

use support::{boot_timeout, husk, kernel, run_with_timeout};

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)
# Many system calls and a few forks: the guest's syscall path must hold.
files=$(/bin/busybox ls /proc | /bin/busybox wc -l)
sum=$(/bin/busybox md5sum /bin/busybox)
echo "HUSK-TEST-MARKER uptime=$up cpus=$cpus md5=${sum%% *} procfiles=$files"
/bin/busybox reboot -f
"#;

#[test]
fn linux_boots_to_init_sees_two_cpus_and_reboots_cleanly() {
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let dir = std::env::temp_dir().join(format!("husk-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init");
    std::fs::write(&init, INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = dir.join("initrd.cpio");
    husk_image::initramfs::write_file(
        &initrd,
        &[
            husk_image::initramfs::Entry {
                guest: "/init".into(),
                host: init,
            },
            husk_image::initramfs::Entry {
                guest: "/bin/busybox".into(),
                host: busybox,
            },
        ],
    )
    .unwrap();

    let mut c = husk();
    c.env("HUSK_LOG", "debug");
    c.args(["vm", "--vcpus", "2", "--mem", "128", "--kernel"])
        .arg(kernel())
        .arg("--initrd")
        .arg(&initrd);
    let out = run_with_timeout(c, None, boot_timeout());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let marker = stdout
        .lines()
        .find(|l| l.starts_with("HUSK-TEST-MARKER"))
        .unwrap_or_else(|| panic!("no init marker.\nconsole:\n{stdout}\nstderr:\n{stderr}"));
    eprintln!("{marker}");
    assert!(marker.contains(" cpus=2 "), "{marker}");
    let md5 = std::process::Command::new("md5sum")
        .arg("/bin/busybox")
        .output()
        .unwrap();
    let host_md5 = String::from_utf8_lossy(&md5.stdout);
    let host_md5 = host_md5.split_whitespace().next().unwrap();
    assert!(
        marker.contains(&format!(" md5={host_md5} ")),
        "the guest's /bin/busybox differs from the host's: {marker}"
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        for op in ["op 1 done", "op 2 done", "op 3 done"] {
            assert!(
                stderr.contains(&format!("fill device: {op}")),
                "kvm_pvm host, but the guest did not use the fill device ({op}); stderr:\n{stderr}"
            );
        }
    }
    // The boot log, through the fill device on kvm_pvm (op 3) or the UART:
    // each message once, lines ended as a UART console ends them.
    assert_eq!(
        stdout.matches("Linux version ").count(),
        1,
        "console:\n{stdout}"
    );
    assert!(
        stdout.contains("Kernel command line: ") && stdout.contains("\r\n"),
        "console:\n{stdout}"
    );
    let procfiles: u32 = marker
        .split("procfiles=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(procfiles > 10, "{marker}");
    let uptime: f64 = marker
        .split("uptime=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(uptime > 0.0);
    assert_eq!(
        out.status.code(),
        Some(0),
        "guest reboot must exit 0; stderr: {stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
