//! `husk bench boot`: boots the same kernel and initrd with husk and with
//! QEMU's microvm machine, alternating, and prints the figures side by side;
//! with `--baseline-kernel`, also husk on an older kernel, so a guest
//! kernel change is judged before and after in one run.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use husk_vmm::config::{self, VmConfig};

use super::{median, write_busybox_initrd};

// `husk bench boot` arguments.
#[derive(Args)]
pub struct BootArgs {
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
    /// Also boot this kernel under husk, in the same rounds, and print
    /// the default kernel's figures against it (new/baseline).
    #[arg(long)]
    baseline_kernel: Option<PathBuf>,
    /// Words appended to every boot's guest command line (e.g. `quiet`).
    #[arg(long, default_value = "")]
    extra: String,
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

const BENCH_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo "HUSK-BENCH-MARKER uptime=$up"
/bin/busybox reboot -f
"#;

/// Runs the boot benchmark.
pub fn boot(a: BootArgs) -> Result<i32, String> {
    let kernel = super::kernel_or_error(&a.kernel)?;
    if let Some(k) = a.baseline_kernel.as_ref().filter(|k| !k.is_file()) {
        return Err(format!("--baseline-kernel {}: no such file", k.display()));
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
            write_busybox_initrd(tmp, BENCH_INIT, &a.busybox)?
        }
    };
    let baseline = a.baseline_kernel.as_deref();
    // Both VMMs get exactly the command line husk would use on this host.
    let husk_line = super::with_extra(config::DEFAULT_CMDLINE, &a.extra);
    let cfg = VmConfig {
        cmdline: Some(husk_line.clone()),
        ..VmConfig::default()
    };
    let qemu_line = config::guest_cmdline(&cfg, husk_vmm::vstate::kvm::is_pvm_host());
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(a.timeout);
    let husk_vm = |k: &Path| {
        let mut c = Command::new(&husk);
        c.args(["vm", "--boot-timing", "--console", "stdout"])
            .arg("--kernel")
            .arg(k)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(&husk_line)
            .args(["--mem", &a.mem.to_string(), "--vcpus", &a.vcpus.to_string()]);
        c
    };

    let peers = if baseline.is_some() { 3 } else { 2 };
    let mut samples: [Vec<Sample>; 3] = Default::default();
    for i in 0..a.runs {
        for peer in super::stats::round_order(i, peers) {
            let cmd = match peer {
                0 => {
                    eprintln!("run {}/{}: husk", i + 1, a.runs);
                    husk_vm(kernel)
                }
                1 => {
                    eprintln!("run {}/{}: qemu microvm", i + 1, a.runs);
                    let mut q = Command::new(&a.qemu);
                    q.args(super::QEMU_MICROVM)
                        .args(["-m", &a.mem.to_string(), "-smp", &a.vcpus.to_string()])
                        .arg("-kernel")
                        .arg(kernel)
                        .arg("-initrd")
                        .arg(&initrd)
                        .arg("-append")
                        .arg(&qemu_line);
                    q
                }
                _ => {
                    eprintln!("run {}/{}: husk, baseline kernel", i + 1, a.runs);
                    husk_vm(baseline.unwrap_or(kernel))
                }
            };
            samples[peer].push(measure(cmd, &a.marker, a.mem, timeout)?);
        }
    }
    let [h, q, b] = &samples;
    print_table(a, kernel, &husk_line, h, q, baseline.map(|k| (k, &b[..])));
    if let Some(path) = &a.json {
        let mut json = serde_json::json!({
            "kernel": kernel.display().to_string(),
            "cmdline": husk_line,
            "mem_mib": a.mem, "vcpus": a.vcpus, "runs": a.runs,
            "husk": samples_json(h),
            "qemu_microvm": samples_json(q),
        });
        if let Some(k) = baseline {
            json["baseline_kernel"] = k.display().to_string().into();
            json["husk_baseline"] = samples_json(b);
        }
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

fn print_table(
    a: &BootArgs,
    kernel: &Path,
    cmdline: &str,
    h: &[Sample],
    q: &[Sample],
    baseline: Option<(&Path, &[Sample])>,
) {
    println!(
        "boot to init marker: kernel {}, {} MiB, {} vCPU, {} runs each (alternating), medians",
        kernel.display(),
        a.mem,
        a.vcpus,
        a.runs
    );
    if let Some((k, _)) = baseline {
        println!("baseline kernel (husk): {}", k.display());
    }
    println!("guest command line: {cmdline}");
    let mut header = vec!["metric", "husk", "qemu microvm", "husk/qemu"];
    if baseline.is_some() {
        header.extend(["husk, baseline kernel", "new/baseline"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    type Metric = fn(&Sample) -> f64;
    let metrics: [(&str, Metric); 4] = [
        ("wall, start to marker (s)", |s| s.wall_to_marker),
        ("guest uptime at marker (s)", |s| {
            s.guest_uptime.unwrap_or(f64::NAN)
        }),
        ("VMM CPU time to marker (s)", |s| s.cpu_s),
        ("peak RSS - guest RAM at marker (MiB)", |s| s.overhead_mib()),
    ];
    for (name, f) in metrics {
        let hm = median(h.iter().map(f).collect());
        let qm = median(q.iter().map(f).collect());
        let mut row = vec![
            name.to_string(),
            format!("{hm:.3}"),
            format!("{qm:.3}"),
            format!("{:.3}", hm / qm),
        ];
        if let Some((_, b)) = baseline {
            let bm = median(b.iter().map(f).collect());
            row.extend([format!("{bm:.3}"), format!("{:.3}", hm / bm)]);
        }
        rows.push(row);
    }
    let first_run = |s: &[Sample]| {
        median(
            s.iter()
                .filter_map(|s| s.start_to_first_run_us.map(|u| u as f64 / 1000.0))
                .collect(),
        )
    };
    let hf = first_run(h);
    let mut row = vec![
        "husk start to first KVM_RUN (ms)".to_string(),
        format!("{hf:.3}"),
        "-".into(),
        "-".into(),
    ];
    if let Some((_, b)) = baseline {
        let bf = first_run(b);
        row.extend([format!("{bf:.3}"), format!("{:.3}", hf / bf)]);
    }
    rows.push(row);
    super::stats::print_table(&rows);
}

/// Runs one VMM until its guest prints the marker. Every figure is taken
/// at that moment, the same way for both VMMs: QEMU's microvm machine has
/// no i8042, so on kvm_pvm hosts its guest cannot reset and QEMU would
/// never exit by itself. Afterwards the VMM gets a grace period to exit
/// and is then killed.
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
        let mut tail = Vec::new();
        if let Some(out) = stdout {
            let mut sent = false;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent && line.contains(&marker_owned) {
                    let _ = tx.send((Instant::now(), line.clone()));
                    sent = true;
                }
                tail.push(line);
                if tail.len() > 5 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });

    let deadline = t0 + timeout;
    let mut guest_rss = 0;
    let seen = loop {
        if let Ok(hit) = rx.recv_timeout(Duration::from_millis(20)) {
            break Some(hit);
        }
        if let Some(g) = super::peers::guest_ram(pid, mem_mib) {
            guest_rss = guest_rss.max(g.rss_kib);
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            break None;
        }
    };
    let at_marker = seen.as_ref().map(|_| ProcStats::read(pid, mem_mib));
    // Grace period for a clean exit, then stop it.
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let tail = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let (Some((t_marker, line)), Some(Some(stats))) = (seen, at_marker) else {
        return Err(format!(
            "{:?}: no marker {marker:?} within {}s; last console lines: {tail:?}; stderr: {}",
            cmd.get_program(),
            timeout.as_secs(),
            err.lines().last().unwrap_or("")
        ));
    };
    Ok(Sample {
        wall_to_marker: (t_marker - t0).as_secs_f64(),
        cpu_s: stats.cpu_s,
        peak_rss_kib: stats.peak_rss_kib,
        guest_rss_kib: stats.guest_rss_kib.max(guest_rss),
        guest_uptime: line
            .split("uptime=")
            .nth(1)
            .and_then(|u| u.split_whitespace().next())
            .and_then(|u| u.parse().ok()),
        start_to_first_run_us: err
            .split("start_to_first_run_us=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok()),
    })
}

/// A process's CPU time, peak RSS and guest RAM RSS, from /proc.
struct ProcStats {
    cpu_s: f64,
    peak_rss_kib: u64,
    guest_rss_kib: u64,
}

impl ProcStats {
    fn read(pid: u32, mem_mib: u64) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no side effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let peak = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .map(super::peers::kib)?;
        Some(Self {
            cpu_s: (utime + stime) / hz,
            peak_rss_kib: peak,
            guest_rss_kib: super::peers::guest_ram(pid, mem_mib).map_or(0, |g| g.rss_kib),
        })
    }
}
