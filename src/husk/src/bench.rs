//! `husk bench boot`: boots the same kernel and initrd with husk and with
//! QEMU's microvm machine, alternating, and prints the figures side by side.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use husk_vmm::config::{self, VmConfig};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Boot to an init marker: husk vs qemu-system-x86_64 -M microvm.
    Boot(BootArgs),
}

#[derive(Args)]
struct BootArgs {
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd whose init prints --marker then reboots; default: one built
    /// from --busybox that prints the marker and the guest uptime.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Static busybox for the default initrd.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Line prefix the guest's init prints when it runs.
    #[arg(long, default_value = "HUSK-BENCH-MARKER")]
    marker: String,
    /// Boots per VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One boot's measurements.
#[derive(Debug, Clone, Default)]
struct Sample {
    wall_to_marker: f64,
    cpu_s: f64,
    peak_rss_kib: u64,
    guest_rss_kib: u64,
    guest_uptime: Option<f64>,
    start_to_first_run_us: Option<u64>,
}

impl Sample {
    fn overhead_mib(&self) -> f64 {
        self.peak_rss_kib.saturating_sub(self.guest_rss_kib) as f64 / 1024.0
    }
}

pub fn run(args: BenchArgs) -> Result<i32, String> {
    match args.what {
        BenchWhat::Boot(b) => boot(b),
    }
}

const BENCH_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo "HUSK-BENCH-MARKER uptime=$up"
/bin/busybox reboot -f
"#;

fn boot(a: BootArgs) -> Result<i32, String> {
    let kernel = a
        .kernel
        .clone()
        .unwrap_or_else(husk_vmm::default_kernel_path);
    if !kernel.exists() {
        return Err(format!(
            "no guest kernel at {}: build it with tools/build-guest-kernel or pass --kernel",
            kernel.display()
        ));
    }
    let tmp = std::env::temp_dir().join(format!("husk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = boot_in(&a, &kernel, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn boot_in(a: &BootArgs, kernel: &Path, tmp: &Path) -> Result<i32, String> {
    let initrd = match &a.initrd {
        Some(i) => i.clone(),
        None => {
            if a.marker != "HUSK-BENCH-MARKER" {
                return Err(
                    "--marker needs --initrd (the default initrd prints HUSK-BENCH-MARKER)".into(),
                );
            }
            let init = tmp.join("init");
            std::fs::write(&init, BENCH_INIT).map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            let out = tmp.join("initrd.cpio");
            husk_image::initramfs::write_file(
                &out,
                &[
                    husk_image::initramfs::Entry {
                        guest: "/init".into(),
                        host: init,
                    },
                    husk_image::initramfs::Entry {
                        guest: "/bin/busybox".into(),
                        host: a.busybox.clone(),
                    },
                ],
            )
            .map_err(|e| e.to_string())?;
            out
        }
    };
    // Both VMMs get exactly the command line husk would use on this host.
    let cfg = VmConfig::default();
    let cmdline = config::guest_cmdline(&cfg, husk_vmm::vstate::kvm::is_pvm_host());
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(a.timeout);

    let mut husk_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    for i in 0..a.runs {
        eprintln!("run {}/{}: husk", i + 1, a.runs);
        let mut c = Command::new(&husk);
        c.args(["vm", "--boot-timing", "--console", "stdout"])
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(config::DEFAULT_CMDLINE)
            .args(["--mem", &a.mem.to_string(), "--vcpus", &a.vcpus.to_string()]);
        husk_samples.push(measure(c, &a.marker, a.mem, timeout)?);
        eprintln!("run {}/{}: qemu microvm", i + 1, a.runs);
        let mut q = Command::new(&a.qemu);
        q.args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-enable-kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-m", &a.mem.to_string(), "-smp", &a.vcpus.to_string()])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(&cmdline);
        qemu_samples.push(measure(q, &a.marker, a.mem, timeout)?);
    }
    print_table(a, kernel, &husk_samples, &qemu_samples);
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "kernel": kernel.display().to_string(),
            "mem_mib": a.mem, "vcpus": a.vcpus, "runs": a.runs,
            "husk": samples_json(&husk_samples),
            "qemu_microvm": samples_json(&qemu_samples),
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(0)
}

fn samples_json(s: &[Sample]) -> serde_json::Value {
    serde_json::Value::Array(
        s.iter()
            .map(|x| {
                serde_json::json!({
                    "wall_to_marker_s": x.wall_to_marker, "cpu_s": x.cpu_s,
                    "peak_rss_kib": x.peak_rss_kib, "guest_rss_kib": x.guest_rss_kib,
                    "overhead_mib": x.overhead_mib(), "guest_uptime_s": x.guest_uptime,
                    "start_to_first_kvm_run_us": x.start_to_first_run_us,
                })
            })
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn print_table(a: &BootArgs, kernel: &Path, h: &[Sample], q: &[Sample]) {
    println!(
        "boot to init marker: kernel {}, {} MiB, {} vCPU, {} runs each (alternating), medians",
        kernel.display(),
        a.mem,
        a.vcpus,
        a.runs
    );
    println!(
        "{:<34} {:>12} {:>14} {:>10}",
        "metric", "husk", "qemu microvm", "husk/qemu"
    );
    type Metric = fn(&Sample) -> f64;
    let rows: [(&str, Metric); 4] = [
        ("wall, start to marker (s)", |s| s.wall_to_marker),
        ("guest uptime at marker (s)", |s| {
            s.guest_uptime.unwrap_or(f64::NAN)
        }),
        ("VMM CPU time, whole run (s)", |s| s.cpu_s),
        ("peak RSS - guest RAM (MiB)", |s| s.overhead_mib()),
    ];
    for (name, f) in rows {
        let hm = median(h.iter().map(f).collect());
        let qm = median(q.iter().map(f).collect());
        println!("{name:<34} {hm:>12.3} {qm:>14.3} {:>10.3}", hm / qm);
    }
    let first: Vec<f64> = h
        .iter()
        .filter_map(|s| s.start_to_first_run_us.map(|u| u as f64 / 1000.0))
        .collect();
    println!(
        "{:<34} {:>12.3} {:>14} {:>10}",
        "husk start to first KVM_RUN (ms)",
        median(first),
        "-",
        "-"
    );
}

/// Runs one VMM to completion, timing the marker on its stdout.
fn measure(
    mut cmd: Command,
    marker: &str,
    mem_mib: u64,
    timeout: Duration,
) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take();
    let marker_owned = marker.to_string();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(out) = stdout {
            let mut sent = false;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent && line.contains(&marker_owned) {
                    let _ = tx.send((Instant::now(), line.clone()));
                    sent = true;
                }
                lines.push(line);
            }
        }
        lines
    });
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });

    let mut sample = Sample::default();
    let deadline = t0 + timeout;
    let mut seen = None;
    let mut guest_rss = 0;
    loop {
        if let Ok((t, line)) = rx.recv_timeout(Duration::from_millis(20)) {
            seen = Some((t, line));
        }
        if let Some(g) = guest_ram_rss_kib(pid, mem_mib) {
            guest_rss = guest_rss.max(g);
        }
        if seen.is_some() || Instant::now() > deadline {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
    }
    let Some((t_marker, line)) = seen else {
        let _ = child.kill();
        let _ = child.wait();
        let out = reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        return Err(format!(
            "{:?}: no marker {marker:?} within {}s; last output: {:?} / {}",
            cmd.get_program(),
            timeout.as_secs(),
            out.iter().rev().take(3).collect::<Vec<_>>(),
            err.lines().last().unwrap_or("")
        ));
    };
    sample.wall_to_marker = (t_marker - t0).as_secs_f64();
    sample.guest_uptime = line
        .split("uptime=")
        .nth(1)
        .and_then(|u| u.split_whitespace().next())
        .and_then(|u| u.parse().ok());
    // Let the guest finish its reboot; keep sampling guest RAM until then.
    let (status, rusage) = loop {
        if let Some(g) = guest_ram_rss_kib(pid, mem_mib) {
            guest_rss = guest_rss.max(g);
        }
        if let Some(r) = wait4_nohang(pid) {
            break r;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break wait4_blocking(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = status;
    let _ = reader.join();
    let err = err_reader.join().unwrap_or_default();
    sample.cpu_s = tv(rusage.ru_utime) + tv(rusage.ru_stime);
    sample.peak_rss_kib = rusage.ru_maxrss as u64;
    sample.guest_rss_kib = guest_rss;
    sample.start_to_first_run_us = err
        .split("start_to_first_run_us=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok());
    // `child` was reaped by wait4 above; forget it so Drop does nothing odd.
    std::mem::forget(child);
    Ok(sample)
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

fn wait4_nohang(pid: u32) -> Option<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our own child.
    let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
    (r == pid as i32).then_some((status, ru))
}

fn wait4_blocking(pid: u32) -> (i32, libc::rusage) {
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our own child.
    unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    (status, ru)
}

/// Resident KiB of the process's guest RAM: anonymous mappings about the
/// size of the guest memory (QEMU adds a little alignment).
fn guest_ram_rss_kib(pid: u32, mem_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let want = mem_mib * 1024;
    let mut total = 0;
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kib(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if size >= want && size <= want + 4096 {
                total += kib(v);
            }
        }
    }
    Some(total)
}

fn kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}
