//! `husk vm --api-sock`, `husk ctl`, `husk snapshot create` and
//! `husk vm --restore` on a tiny hand-assembled guest: the guest goes on
//! from where it was snapshotted, in a new process, with its register,
//! its memory and a byte still waiting in its UART; broken snapshots are
//! refused in one line with nothing left behind.

mod support;
#[path = "../../vmm/tests/common/tiny.rs"]
mod tiny;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{assert_one_line_error, husk, run_with_timeout};

const T: Duration = Duration::from_secs(60);

/// Counts in rbx and at 0x700 (the same value), echoes every byte the
/// UART receives, and prints '.' every 1024 counts.
fn counter() -> Vec<u8> {
    vec![
        0x31, 0xdb, // xor ebx, ebx
        0x48, 0xff, 0xc3, // loop: inc rbx
        0x48, 0x89, 0x1c, 0x25, 0x00, 0x07, 0x00, 0x00, // mov [0x700], rbx
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0x06, // jz skip
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al (echo)
        0xf7, 0xc3, 0xff, 0x03, 0x00, 0x00, // skip: test ebx, 0x3ff
        0x75, 0xde, // jnz loop
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, 0x2e, // mov al, '.'
        0xee, // out dx, al
        0xeb, 0xd5, // jmp loop
    ]
}

/// A `husk vm` whose console output is collected as it comes.
struct Vm {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    api: PathBuf,
}

impl Vm {
    fn spawn(args: &[&str], api: PathBuf) -> Vm {
        let mut child = husk()
            .arg("vm")
            .args(args)
            .arg("--api-sock")
            .arg(&api)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Vm { child, out, api }
    }

    /// Waits until the console output satisfies `f`.
    fn wait_output(&mut self, what: &str, f: impl Fn(&[u8]) -> bool) {
        let deadline = Instant::now() + T;
        while !f(&self.out.lock().unwrap()) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("husk vm exited ({st}) before {what}");
            }
            assert!(Instant::now() < deadline, "no {what} within {T:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, action: &str) -> String {
        let mut c = husk();
        c.args(["ctl", "--api-sock"]).arg(&self.api).arg(action);
        support::ok_output(run_with_timeout(c, None, T))
    }

    fn snapshot(&self, out: &Path) {
        let mut c = husk();
        c.args(["snapshot", "create", "--api-sock"])
            .arg(&self.api)
            .arg("--out")
            .arg(out);
        support::ok_output(run_with_timeout(c, None, T));
    }

    /// Stops the VM through its socket; returns its exit code.
    fn stop(mut self) -> Option<i32> {
        self.ctl("stop");
        let deadline = Instant::now() + T;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "the VM did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A failed check must not leave the VM running.
impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
}

/// The kvm-clock (ns) in a snapshot.
fn kvm_clock(dir: &Path) -> u64 {
    let clock: Vec<u8> = serde_json::from_value(state(dir)["vm"]["clock"].clone()).unwrap();
    u64::from_le_bytes(clock[..8].try_into().unwrap())
}

/// The counter at 0x700 in the memory file, and rbx in the vCPU state.
fn counts(dir: &Path) -> (u64, u64) {
    let mem = std::fs::read(dir.join("memory")).unwrap();
    let in_memory = u64::from_le_bytes(mem[0x700..0x708].try_into().unwrap());
    let regs: Vec<u8> = serde_json::from_value(state(dir)["vcpus"][0]["regs"].clone()).unwrap();
    let rbx = u64::from_le_bytes(regs[8..16].try_into().unwrap());
    (in_memory, rbx)
}

#[test]
fn a_restored_guest_goes_on_counting_and_reads_its_pending_input() {
    let dir = tiny::tempdir("snap-count");
    let k = tiny::write_kernel(&dir, "k", &counter());
    let mut vm = Vm::spawn(
        &["--mem", "32", "--kernel", k.to_str().unwrap()],
        dir.join("api1"),
    );
    vm.wait_output("the first dot", |o| o.contains(&b'.'));
    assert_eq!(vm.ctl("status"), "running\n");
    vm.ctl("pause");
    assert_eq!(vm.ctl("status"), "paused\n");
    // Input sent while paused waits in the UART's FIFO: snapshot until
    // the event loop has moved it there.
    vm.child.stdin.take().unwrap().write_all(b"xyz").unwrap();
    let snap = dir.join("snap");
    let deadline = Instant::now() + T;
    loop {
        vm.snapshot(&snap);
        if state(&snap)["serial"]["in_buffer"] == serde_json::json!(b"xyz") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the input never reached the UART"
        );
        std::fs::remove_dir_all(&snap).unwrap();
    }
    let saved = Instant::now();
    // A paused VM stays paused through `snapshot create`.
    assert_eq!(vm.ctl("status"), "paused\n");
    let (n, rbx) = counts(&snap);
    assert!(n > 0 && rbx >= n && rbx <= n + 1, "memory {n}, rbx {rbx}");
    assert_eq!(vm.stop(), Some(0));
    assert!(!dir.join("api1").exists(), "the socket goes with the VM");

    // A new process resumes the guest: the pending bytes are echoed and
    // it counts on from n.
    let mut vm = Vm::spawn(&["--restore", snap.to_str().unwrap()], dir.join("api2"));
    vm.wait_output("the pending input echoed, then a dot", |o| {
        o.windows(3)
            .position(|w| w == b"xyz")
            .is_some_and(|i| o[i..].contains(&b'.'))
    });
    // A running VM is paused for the snapshot and then runs on.
    let snap2 = dir.join("snap2");
    let between = saved.elapsed();
    vm.snapshot(&snap2);
    // By default the guest's clock stepped over the time in between.
    let c2 = kvm_clock(&snap2);
    assert!(
        c2 - kvm_clock(&snap) >= between.as_nanos() as u64,
        "the clock did not step"
    );
    assert_eq!(vm.ctl("status"), "running\n");
    let (n2, rbx2) = counts(&snap2);
    // The dot after the echo is printed at the next multiple of 1024 (a few
    // counts after n, or almost 1024): past it at least, however fast the
    // guest ran until the snapshot.
    let next_dot = (n / 1024 + 1) * 1024;
    assert!(n2 >= next_dot, "counted from {n} to only {n2}");
    assert!(rbx2 >= n2 && rbx2 <= n2 + 1, "memory {n2}, rbx {rbx2}");
    assert_eq!(vm.stop(), Some(0));

    // `--clock continue`: the clock goes on from the snapshot's, as after a
    // pause. The snapshot first spends a second on disk, which the guest
    // must then not see.
    std::thread::sleep(Duration::from_secs(1));
    let spawned = Instant::now();
    let snap = snap2.to_str().unwrap();
    let mut vm = Vm::spawn(
        &["--restore", snap, "--clock", "continue"],
        dir.join("api3"),
    );
    vm.wait_output("a dot", |o| o.contains(&b'.'));
    let snap3 = dir.join("snap3");
    vm.snapshot(&snap3);
    let ran = spawned.elapsed().as_nanos() as u64;
    let c3 = kvm_clock(&snap3);
    assert!(c3 >= c2 && c3 - c2 <= ran, "{c2} -> {c3} in {ran} ns");
    assert!(counts(&snap3).0 >= n2);
    assert_eq!(vm.stop(), Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_snapshots_are_refused_in_one_line_and_leave_nothing() {
    let dir = tiny::tempdir("snap-bad");
    let k = tiny::write_kernel(&dir, "k", &counter());
    let mut vm = Vm::spawn(
        &["--mem", "32", "--kernel", k.to_str().unwrap()],
        dir.join("api"),
    );
    vm.wait_output("the first dot", |o| o.contains(&b'.'));
    let good = dir.join("good");
    vm.snapshot(&good);
    // An existing directory is refused and left as it was.
    let mut c = husk();
    c.args(["snapshot", "create", "--api-sock"])
        .arg(&vm.api)
        .arg("--out")
        .arg(&good);
    assert_one_line_error(&run_with_timeout(c, None, T), "good");
    assert!(good.join("state.json").exists());
    assert_eq!(vm.stop(), Some(0));

    let restore_with = |snap: &Path, extra: &[&str], needle: &str| {
        let api = dir.join("api-restore");
        let mut c = husk();
        c.args(["vm", "--console", "none", "--restore"])
            .arg(snap)
            .args(extra)
            .arg("--api-sock")
            .arg(&api);
        let out = run_with_timeout(c, None, T);
        assert_one_line_error(&out, needle);
        assert!(!api.exists(), "no socket left behind");
    };
    let restore = |snap: &Path, needle: &str| restore_with(snap, &[], needle);
    // Devices to put elsewhere that the snapshot does not have.
    restore_with(&good, &["--net", "tap=husk-snap0"], "no NIC 0 to attach");
    restore_with(
        &good,
        &["--fs", &format!("tag=t,dir={}", dir.display())],
        "no share 0 to replace",
    );
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["state.json", "memory"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    // A truncated state file.
    let d = copy("truncated");
    let s = std::fs::read(d.join("state.json")).unwrap();
    std::fs::write(d.join("state.json"), &s[..s.len() / 2]).unwrap();
    restore(&d, "is not a husk snapshot state file");
    // A memory file of the wrong size.
    let d = copy("short");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory"))
        .unwrap();
    f.set_len(16 << 20).unwrap();
    restore(&d, "holds 16777216 bytes");
    // Another format version.
    let d = copy("version");
    let mut st = state(&d);
    st["version"] = serde_json::json!(7);
    std::fs::write(d.join("state.json"), st.to_string()).unwrap();
    restore(&d, "format version 7");
    // No snapshot at all.
    restore(&dir.join("missing"), "missing");
    std::fs::remove_dir_all(dir).unwrap();
}
