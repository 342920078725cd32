//! `husk bench profile`: where a sandbox boot spends its time. Boots the
//! kernel and agent disk exactly as `husk run` does (same command
//! line, memory and vsock device), samples the guest's instruction pointer
//! (`husk vm --profile`), stamps every console line with host time, stops
//! when the agent says it is ready, and prints: process start to first
//! KVM_RUN, first KVM_RUN to agent ready, the kernel functions with the
//! most samples, and the busiest functions second by second.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

// `husk bench profile` arguments.
#[derive(Args)]
pub struct ProfileArgs {
    /// Guest kernel (default: the one tools/build-guest-kernel built); its
    /// System.map must sit next to it (after resolving symlinks).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Agent binary (default: the installed one, as `husk run` uses).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Guest memory in MiB (`husk run`'s default).
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Samples per second.
    #[arg(long, default_value_t = 1000)]
    pub(super) hz: u32,
    /// Functions to list.
    #[arg(long, default_value_t = 25)]
    pub(super) top: usize,
    /// Width of the timeline buckets in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub(super) bucket: f64,
    /// Print the kernel's boot log too (drops `quiet`, so each console line
    /// marks a phase; the printing itself then costs time).
    #[arg(long)]
    boot_log: bool,
    /// Extra guest command-line words (e.g. `initcall_debug ignore_loglevel`).
    #[arg(long, default_value = "")]
    extra: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub(super) timeout: u64,
    /// Also write the figures and every sample's symbol as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Profile a container's start instead of a boot: `husk run --timing`
    /// of --cmd in a busybox root, the samples split by its stages.
    #[arg(long, conflicts_with_all = ["boot_log", "extra", "json", "mem"])]
    container: bool,
    /// With --container: boot the guest (`husk run --no-template`).
    #[arg(long, requires = "container")]
    pub(super) no_template: bool,
    /// With --container: the container's command, split at spaces.
    #[arg(long, default_value = "true", requires = "container")]
    pub(super) cmd: String,
    /// With --container: a static busybox, the container's root.
    #[arg(long, default_value = "/bin/busybox", requires = "container")]
    pub(super) busybox: PathBuf,
}

const READY: &str = "husk-agent: ready";

/// Runs the profile.
pub fn profile(a: ProfileArgs) -> Result<i32, String> {
    let kernel = super::kernel_or_error(&a.kernel)?;
    let map_path = std::fs::canonicalize(&kernel)
        .map_err(|e| format!("{}: {e}", kernel.display()))?
        .with_file_name("System.map");
    let symbols = Symbols::read(&map_path)?;
    let agent = husk_runtime::paths::agent_binary(a.agent.as_deref()).map_err(|e| e.to_string())?;
    if a.container {
        return super::profile_container::profile(&a, &kernel, &agent, &symbols);
    }
    let disk = husk_runtime::paths::agent_disk(&agent).map_err(|e| e.to_string())?;
    let tmp = std::env::temp_dir().join(format!("husk-profile-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = profile_in(&a, &kernel, &disk, &symbols, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn profile_in(
    a: &ProfileArgs,
    kernel: &Path,
    disk: &Path,
    symbols: &Symbols,
    tmp: &Path,
) -> Result<i32, String> {
    let mut cmdline = husk_runtime::sandbox::sandbox_cmdline();
    if a.boot_log {
        cmdline = cmdline.replace(" quiet", "");
    }
    let cmdline = super::with_extra(&cmdline, &a.extra);
    let samples_file = tmp.join("samples");
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(husk);
    c.args(["vm", "--boot-timing", "--console", "stdout"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--disk")
        .arg(format!("path={},ro", disk.display()))
        .arg("--cmdline")
        .arg(&cmdline)
        .args(["--mem", &a.mem.to_string()])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", tmp.join("vsock").display()))
        .arg("--profile")
        .arg(&samples_file)
        .args(["--profile-hz", &a.hz.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let start_ns = husk_vmm::vstate::vcpu::monotonic_ns();
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot start husk vm: {e}"))?;
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let stdout = child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((start.elapsed(), line)).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = start + Duration::from_secs(a.timeout);
    let mut console = Vec::new();
    let mut ready = None;
    while ready.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok((t, line)) => {
                if line.contains(READY) {
                    ready = Some(t);
                }
                console.push((t, line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(format!("husk vm exited ({st}) before the agent was ready"));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the agent was not ready within {} s", a.timeout));
            }
        }
    }
    // SIGTERM: the VMM stops the VM and writes the samples.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_run_us = stderr
        .lines()
        .find_map(|l| l.split("start_to_first_run_us=").nth(1))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let text = std::fs::read_to_string(&samples_file)
        .map_err(|e| format!("no samples ({}): {e}", samples_file.display()))?;
    let samples = parse_samples(&text)?;
    let report = Report::new(&samples, symbols, a.bucket);
    let ready_s = ready.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    println!(
        "profile of a sandbox boot: kernel {}, {} MiB, 1 vCPU, agent disk {}, {} Hz",
        kernel.display(),
        a.mem,
        disk.display(),
        a.hz
    );
    println!("command line: {cmdline}");
    match first_run_us {
        Some(us) => println!(
            "process start -> first KVM_RUN   {:>9.3} ms",
            us as f64 / 1000.0
        ),
        None => println!("process start -> first KVM_RUN   (not reported)"),
    }
    println!("spawn -> agent ready             {ready_s:>9.3} s");
    report.print(a.top);
    if a.boot_log {
        println!("\nconsole (host seconds since spawn):");
        for (t, l) in &console {
            println!("{:>8.3} {l}", t.as_secs_f64());
        }
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "kernel": kernel.display().to_string(), "mem_mib": a.mem, "hz": a.hz,
            "cmdline": cmdline, "first_kvm_run_us": first_run_us, "agent_ready_s": ready_s,
            "samples": samples.len(),
            "top": report.top.iter().take(a.top).map(|(f, n)| serde_json::json!({"function": f, "samples": n})).collect::<Vec<_>>(),
            "console": console.iter().map(|(t, l)| serde_json::json!({"t": t.as_secs_f64(), "line": l})).collect::<Vec<_>>(),
            "trace": trace(&samples, symbols, start_ns),
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(0)
}

/// Every sample as `[seconds since spawn, function]` (the console lines'
/// time base), for lining samples up with boot-log lines.
fn trace(samples: &[(u64, u64)], symbols: &Symbols, start_ns: u64) -> serde_json::Value {
    samples
        .iter()
        .map(|&(ns, rip)| {
            let t = ns.saturating_sub(start_ns) as f64 / 1e9;
            serde_json::json!([t, symbols.name(rip)])
        })
        .collect()
}

/// (nanoseconds, rip) pairs from a `husk vm --profile` file.
pub(super) fn parse_samples(text: &str) -> Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = match f.as_slice() {
            [ns, _vcpu, rip] => ns.parse().ok().zip(u64::from_str_radix(rip, 16).ok()),
            _ => None,
        };
        out.push(parsed.ok_or_else(|| format!("bad profile line {line:?}"))?);
    }
    Ok(out)
}

/// Kernel text symbols from a System.map, sorted by address.
pub(super) struct Symbols(Vec<(u64, String)>);

impl Symbols {
    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "{}: {e} (the profile needs the kernel's System.map)",
                path.display()
            )
        })?;
        let mut v: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
                if !matches!(kind, "t" | "T" | "w" | "W") {
                    return None;
                }
                Some((u64::from_str_radix(addr, 16).ok()?, name.to_string()))
            })
            .collect();
        v.sort();
        Ok(Self(v))
    }

    /// The function containing `rip`; guest user space is one bucket.
    fn name(&self, rip: u64) -> &str {
        if rip < 0xffff_8000_0000_0000 {
            return "[guest user space]";
        }
        match self.0.partition_point(|(a, _)| *a <= rip) {
            0 => "[unknown]",
            i => &self.0[i - 1].1,
        }
    }
}

/// (function, samples), most samples first.
type Counts = Vec<(String, usize)>;

/// Sample counts overall and per time bucket (start s, samples, counts).
pub(super) struct Report {
    total: usize,
    top: Counts,
    buckets: Vec<(f64, usize, Counts)>,
}

impl Report {
    pub(super) fn new(samples: &[(u64, u64)], symbols: &Symbols, bucket: f64) -> Self {
        let t0 = samples.first().map(|s| s.0).unwrap_or(0);
        let bucket = if bucket > 0.0 { bucket } else { 1.0 };
        let mut all: HashMap<&str, usize> = HashMap::new();
        let mut per: Vec<HashMap<&str, usize>> = Vec::new();
        for &(ns, rip) in samples {
            let name = symbols.name(rip);
            *all.entry(name).or_default() += 1;
            let i = ((ns.saturating_sub(t0)) as f64 / 1e9 / bucket) as usize;
            if per.len() <= i {
                per.resize_with(i + 1, HashMap::new);
            }
            *per[i].entry(name).or_default() += 1;
        }
        let sorted = |m: HashMap<&str, usize>| {
            let mut v: Vec<(String, usize)> =
                m.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        let buckets = per
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let n = m.values().sum();
                (i as f64 * bucket, n, sorted(m))
            })
            .collect();
        Self {
            total: samples.len(),
            top: sorted(all),
            buckets,
        }
    }

    /// The functions with the most samples.
    pub(super) fn print_top(&self, top: usize) {
        let total = self.total.max(1) as f64;
        println!("{:>7} {:>6}  function", "samples", "share");
        for (f, n) in self.top.iter().take(top) {
            println!("{n:>7} {:>5.1}%  {f}", 100.0 * *n as f64 / total);
        }
    }

    fn print(&self, top: usize) {
        println!("\n{} samples; functions with the most:", self.total);
        self.print_top(top);
        println!("\ntimeline (seconds after the first sample: the busiest functions)");
        for (t, n, fs) in &self.buckets {
            let n = (*n).max(1) as f64;
            let line: Vec<String> = fs
                .iter()
                .take(3)
                .map(|(f, c)| format!("{f} {:.0}%", 100.0 * *c as f64 / n))
                .collect();
            println!("{t:>7.1}  {}", line.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_resolve_to_functions_and_buckets() {
        let map = Symbols(vec![
            (0xffff_ffff_8100_0000, "a".into()),
            (0xffff_ffff_8100_0100, "b".into()),
        ]);
        let text = "# husk-profile v1 hz=1000 dropped=0\n\
                    0 0 ffffffff81000010\n\
                    500000000 0 ffffffff81000200\n\
                    1500000000 0 ffffffff81000201\n\
                    1600000000 0 401000\n";
        let s = parse_samples(text).unwrap();
        assert_eq!(map.name(0xffff_ffff_8000_0000), "[unknown]");
        let r = Report::new(&s, &map, 1.0);
        assert_eq!(r.total, 4);
        assert_eq!(r.top[0], ("b".to_string(), 2));
        assert_eq!(r.buckets.len(), 2);
        assert_eq!(r.buckets[1].2[0].0, "[guest user space]");
        assert!(parse_samples("1 2\n").is_err());
    }
}
