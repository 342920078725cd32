//! `husk vm` from the command line: exit codes, one-line errors, console
//! in both directions. Tiny hand-assembled guests, real KVM.

mod support;
#[path = "../../vmm/tests/common/tiny.rs"]
mod tiny;

use std::time::Duration;

use support::{assert_one_line_error, husk, run_with_timeout};

const T: Duration = Duration::from_secs(60);

#[test]
fn stdin_reaches_the_guest_uart_and_output_comes_back() {
    let dir = tiny::tempdir("cli-echo");
    // Echo COM1 input to COM1 output until a newline, then reset.
    let mut code = vec![
        0x66, 0xba, 0xfd, 0x03, // start: mov dx, 0x3fd (LSR)
        0xec, // wait: in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz wait
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, 0x0a, // cmp al, '\n'
        0x75, 0xed, // jne start
    ];
    code.extend(tiny::i8042_reset());
    let k = tiny::write_kernel(&dir, "echo", &code);
    // More than the 64-byte UART FIFO, to exercise back-pressure.
    let input: Vec<u8> = (0..300)
        .map(|i| b'a' + (i % 26) as u8)
        .chain(*b"\n")
        .collect();
    let mut c = husk();
    c.args(["vm", "--mem", "32", "--kernel"]).arg(&k);
    let out = run_with_timeout(c, Some(&input), T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, input);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn triple_fault_has_its_own_exit_code() {
    let dir = tiny::tempdir("cli-tf");
    let k = tiny::write_kernel(&dir, "tf", &[0x0f, 0x0b]);
    let mut c = husk();
    c.args(["vm", "--mem", "32", "--console", "none", "--kernel"])
        .arg(&k);
    let out = run_with_timeout(c, None, T);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("triple fault on vCPU 0"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn emulation_failure_reports_reason_suberror_and_rip_in_one_line() {
    let dir = tiny::tempdir("cli-ie");
    // Jump into the MMIO gap: there is no memory to fetch instructions
    // from, so KVM must emulate the fetch and cannot.
    let k = tiny::write_kernel(&dir, "ie", &[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0]);
    let mut c = husk();
    c.args(["vm", "--mem", "32", "--console", "none", "--kernel"])
        .arg(&k);
    let out = run_with_timeout(c, None, T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("KVM_EXIT_INTERNAL_ERROR"))
        .expect(&err);
    assert!(line.contains("suberror"), "{line}");
    assert!(line.contains("RIP 0xd0000000"), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn user_errors_are_one_line_and_exit_1() {
    let dir = tiny::tempdir("cli-err");
    let run = |args: &[&str]| {
        let mut c = husk();
        c.args(args);
        run_with_timeout(c, None, T)
    };
    let missing = dir.join("no-such-vmlinux");
    let out = run(&["vm", "--kernel", missing.to_str().unwrap()]);
    assert_one_line_error(&out, "cannot open kernel");

    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not an ELF file, just text").unwrap();
    let out = run(&["vm", "--kernel", junk.to_str().unwrap()]);
    assert_one_line_error(&out, "is not an x86_64 vmlinux ELF image");

    let k = tiny::write_kernel(&dir, "ok", &tiny::i8042_reset());
    let out = run(&["vm", "--mem", "8", "--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&out, "memory must be between 32");

    // A kernel whose image lies past the end of a 32 MiB guest.
    let big = dir.join("big");
    std::fs::write(
        &big,
        tiny::elf(48 << 20, &[(48 << 20, tiny::i8042_reset())]),
    )
    .unwrap();
    let out = run(&["vm", "--mem", "32", "--kernel", big.to_str().unwrap()]);
    assert_one_line_error(&out, "does not fit in 32 MiB");

    let out = run(&["vm", "--vcpus", "33", "--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&out, "vcpus must be between 1 and 32");

    let initrd = dir.join("no-initrd");
    let out = run(&[
        "vm",
        "--mem",
        "32",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "cannot read initrd");

    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/x", "memory": 64}"#).unwrap();
    let out = run(&["vm", "--config", cfg.to_str().unwrap()]);
    assert_one_line_error(&out, "unknown field `memory`");

    std::fs::write(&cfg, "{ not json").unwrap();
    let out = run(&["vm", "--config", cfg.to_str().unwrap()]);
    assert_one_line_error(&out, "invalid config");

    let out = run(&["vm", "--config", dir.join("none.json").to_str().unwrap()]);
    assert_one_line_error(&out, "cannot read config");

    let out = run(&["vm", "--console", "tty", "--kernel", k.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    // No default kernel installed under this root.
    let mut c = husk();
    c.env("HUSK_ROOT", &dir).args(["vm", "--mem", "32"]);
    let out = run_with_timeout(c, None, T);
    assert_one_line_error(&out, "tools/build-guest-kernel");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_file_boots_and_flags_override_it() {
    let dir = tiny::tempdir("cli-cfg");
    let mut code = tiny::serial_out(b"cfg ok\n");
    code.extend(tiny::i8042_reset());
    let k = tiny::write_kernel(&dir, "k", &code);
    let console = dir.join("console.log");
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "kernel": k, "mem_mib": 48, "vcpus": 2,
            "console": format!("file:{}", console.display()),
        })
        .to_string(),
    )
    .unwrap();
    let mut c = husk();
    c.args(["vm", "--config"]).arg(&cfg);
    let out = run_with_timeout(c, None, T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "cfg ok\n");
    assert!(out.stdout.is_empty());

    let mut c = husk();
    c.args(["vm", "--console", "stdout", "--config"]).arg(&cfg);
    let out = run_with_timeout(c, None, T);
    assert_eq!(out.stdout, b"cfg ok\n");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts `husk vm` on a tiny guest that prints "up" and then runs `then`;
/// returns once "up" came out, with the console's stdout to read.
fn boot_until_up(
    dir: &std::path::Path,
    then: &[u8],
) -> (std::process::Child, std::process::ChildStdout) {
    let mut code = tiny::serial_out(b"up\n");
    code.extend(then);
    let k = tiny::write_kernel(dir, "k", &code);
    let mut child = husk()
        .args(["vm", "--mem", "32", "--kernel"])
        .arg(&k)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"up\n");
    (child, out)
}

#[test]
fn sigterm_stops_the_vm_with_its_exit_code() {
    let dir = tiny::tempdir("cli-sig");
    let (mut child, _out) = boot_until_up(&dir, &tiny::halt_forever());
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(6));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn initramfs_tool_writes_a_newc_archive() {
    let dir = tiny::tempdir("cli-cpio");
    let f = dir.join("hello");
    std::fs::write(&f, b"hi").unwrap();
    let out_path = dir.join("out.cpio");
    let mut c = husk();
    c.args(["initramfs", "-o"])
        .arg(&out_path)
        .arg("--add")
        .arg(format!("/etc/hello={}", f.display()));
    let out = run_with_timeout(c, None, T);
    assert_eq!(out.status.code(), Some(0));
    let bytes = std::fs::read(&out_path).unwrap();
    assert!(bytes.starts_with(b"070701"));
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("etc/hello\0"));
    assert!(text.contains("dev/console\0"));

    let mut c = husk();
    c.args(["initramfs", "-o"])
        .arg(dir.join("bad.cpio"))
        .args(["--add", "relative=x"]);
    assert_one_line_error(&run_with_timeout(c, None, T), "invalid --add");
    assert!(!dir.join("bad.cpio").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_run_whose_vm_cannot_be_built_leaves_no_run_dir() {
    let dir = tiny::tempdir("run-no-vm");
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/true"), b"").unwrap();
    let agent = dir.join("agent");
    std::fs::write(&agent, b"not run: the VM is never built").unwrap();
    let root = dir.join("root");
    for name in [None, Some("named")] {
        let mut c = husk();
        c.env("HUSK_ROOT", &root)
            .args(["run", "--kernel"])
            .arg(dir.join("no-such-vmlinux"))
            .arg("--agent")
            .arg(&agent)
            .arg("--rootfs")
            .arg(&tree);
        if let Some(n) = name {
            c.args(["--name", n]);
        }
        c.args(["--", "true"]);
        let out = run_with_timeout(c, None, T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("cannot open kernel"), "{err}");
        // The run dirs' parent exists (husk got as far as making one)
        // and holds nothing but the name's lock.
        let left: Vec<String> = std::fs::read_dir(root.join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "{name:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_console_nobody_reads_does_not_stall_the_vm() {
    let dir = tiny::tempdir("cli-flood");
    // After "up", 'x' to the UART forever (dx is still 0x3f8).
    let (mut child, mut out) = boot_until_up(&dir, &[0xb0, b'x', 0xee, 0xeb, 0xfb]);
    // The guest floods; stop reading and wait until the pipe is full, so
    // the console's next write to it would block.
    let mut chunk = vec![0u8; 16 << 10];
    let mut seen = 0;
    while seen < 64 << 10 {
        seen += std::io::Read::read(&mut out, &mut chunk).unwrap();
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&out);
    let deadline = std::time::Instant::now() + T;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int to the pointer we pass.
        assert_eq!(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) }, 0);
        if queued >= 64 << 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pipe never filled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stalled = std::time::Instant::now();
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = stalled + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("husk vm hangs after SIGTERM with its console unread");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(6));
    drop(out);
    std::fs::remove_dir_all(dir).unwrap();
}
