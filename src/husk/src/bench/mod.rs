//! `husk bench`: husk side by side with its peers (runc, crun, QEMU's
//! microvm machine on the same guest kernel), interleaved, summarized as
//! medians with p10/p90 and ratios. Benchmarks are programs, not tests.

mod boot;
mod chart;
mod density;
mod fs;
mod image;
mod io;
mod native;
mod peers;
mod profile;
mod profile_container;
mod startup;
mod stats;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

// `husk bench` arguments.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
#[command(defer = true)]
enum BenchWhat {
    /// `true` in a container, stage by stage: husk vs runc, crun, QEMU microvm, the agent natively.
    Startup(StartupArgs),
    /// N idle containers per runtime: host memory per container, start time, disk.
    Density(DensityArgs),
    /// startup, then density, into one --out directory.
    All(AllArgs),
    /// Boot to an init marker: husk vs qemu-system-x86_64 -M microvm.
    Boot(boot::BootArgs),
    /// virtio-blk read and virtio-net TCP throughput: husk vs QEMU microvm.
    Io(io::IoArgs),
    /// Guest file I/O: virtio-fs share vs virtio-blk disk vs QEMU microvm's virtio-fs.
    Fs(fs::FsArgs),
    /// An OCI image: cold pull, warm husk run vs runc run, disk per container.
    Image(image::ImageBenchArgs),
    /// Where a sandbox boot spends its time: guest RIP samples by kernel function.
    Profile(profile::ProfileArgs),
}

/// Runs a benchmark.
pub fn run(args: BenchArgs) -> Result<i32, String> {
    match args.what {
        BenchWhat::Startup(a) => compare(&a.common, Some(a.runs), None),
        BenchWhat::Density(a) => compare(&a.common, None, Some(a.count)),
        BenchWhat::All(a) => compare(&a.common, Some(a.runs), Some(a.count)),
        BenchWhat::Boot(b) => boot::boot(b),
        BenchWhat::Io(i) => io::io(i),
        BenchWhat::Fs(f) => fs::fs(f),
        BenchWhat::Image(i) => image::image_bench(i),
        BenchWhat::Profile(p) => profile::profile(p),
    }
}

/// The guest's marker that the benchmark's work is done.
const DONE_MARKER: &str = "HUSK-BENCH-DONE";

/// Forwards the child's console lines that start with `prefix`, then the
/// done marker's line, and stops reading there.
fn console_lines(child: &mut Child, prefix: &'static str) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let done = line.contains(DONE_MARKER);
                if line.starts_with(prefix) || done {
                    let _ = tx.send(line);
                }
                if done {
                    break;
                }
            }
        }
    });
    rx
}

/// Gives a VM whose guest rebooted a moment to exit, then kills it.
fn stop_vm(child: &mut Child) {
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes `dir/initrd.cpio`: `init_script` as /init and a static busybox.
fn write_busybox_initrd(dir: &Path, init_script: &str, busybox: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let init = dir.join("init");
    std::fs::write(&init, init_script).map_err(|e| format!("{}: {e}", init.display()))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let out = dir.join("initrd.cpio");
    husk_image::initramfs::write_file(
        &out,
        &[
            husk_image::initramfs::Entry {
                guest: "/init".into(),
                host: init,
            },
            husk_image::initramfs::Entry {
                guest: "/bin/busybox".into(),
                host: busybox.to_path_buf(),
            },
        ],
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The default guest kernel, or a one-line error saying how to build it.
fn kernel_or_error(k: &Option<PathBuf>) -> Result<PathBuf, String> {
    let kernel = k.clone().unwrap_or_else(husk_vmm::default_kernel_path);
    if kernel.exists() {
        Ok(kernel)
    } else {
        Err(format!(
            "no guest kernel at {}: build it with tools/build-guest-kernel or pass --kernel",
            kernel.display()
        ))
    }
}

/// A guest command line with `extra`'s words (a bench's `--extra`) after it.
fn with_extra(cmdline: &str, extra: &str) -> String {
    std::iter::once(cmdline)
        .chain(extra.split_whitespace())
        .collect::<Vec<_>>()
        .join(" ")
}

use peers::QEMU_MICROVM;
use stats::median;

// What the peer comparisons (startup, density, all) share.
#[derive(Args, Clone)]
pub struct Common {
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest agent (default: $HUSK_AGENT or the installed one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Static busybox: the containers' root filesystem.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// runc binary (skipped with a note when missing).
    #[arg(long, default_value = "runc")]
    runc: String,
    /// crun binary (skipped with a note when missing).
    #[arg(long, default_value = "crun")]
    crun: String,
    /// QEMU binary (skipped with a note when missing).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Seconds one guest may take to boot and answer.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Directory for the JSON of every sample and the PNG charts.
    #[arg(long, default_value = "husk-bench-out")]
    out: PathBuf,
    /// Print the JSON on stdout instead of the tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StartupArgs {
    #[command(flatten)]
    common: Common,
    /// Rounds; each runs every peer once, in a rotating order.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Args)]
struct DensityArgs {
    #[command(flatten)]
    common: Common,
    /// Idle containers per runtime.
    #[arg(long, default_value_t = 5)]
    count: usize,
}

#[derive(Args)]
struct AllArgs {
    #[command(flatten)]
    common: Common,
    /// Startup rounds.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Idle containers per runtime for density.
    #[arg(long, default_value_t = 5)]
    count: usize,
}

/// Runs startup (`runs`) and/or density (`count`) in a temporary
/// directory, prints the tables (or the JSON), writes JSON and charts.
fn compare(c: &Common, runs: Option<usize>, count: Option<usize>) -> Result<i32, String> {
    if runs == Some(0) {
        return Err("--runs must be at least 1".into());
    }
    std::fs::create_dir_all(&c.out).map_err(|e| format!("{}: {e}", c.out.display()))?;
    peers::catch_interrupts();
    let tmp = std::env::temp_dir().join(format!("husk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = compare_in(c, runs, count, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn compare_in(
    c: &Common,
    runs: Option<usize>,
    count: Option<usize>,
    tmp: &Path,
) -> Result<i32, String> {
    let write = |name: &str, v: &serde_json::Value| {
        let p = c.out.join(name);
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    let mut doc = serde_json::Map::new();
    let mut files = Vec::new();
    if let Some(runs) = runs {
        let s = startup::measure(c, runs, &tmp.join("startup"))?;
        let j = startup::json(&s, runs);
        write("startup.json", &j)?;
        let png = c.out.join("startup.png");
        let title = format!("startup of `true` in a container, medians of {runs}");
        chart::startup(&s.series, &title, &png)?;
        files.extend([c.out.join("startup.json"), png]);
        if !c.json {
            startup::print(&s, runs);
        }
        doc.insert("startup".into(), j);
    }
    if let Some(count) = count {
        let d = density::measure(c, count, &tmp.join("density"))?;
        let j = density::json(&d);
        write("density.json", &j)?;
        let png = c.out.join("density.png");
        chart::density(
            &d,
            &format!("host memory for {count} idle containers"),
            &png,
        )?;
        files.extend([c.out.join("density.json"), png]);
        if !c.json {
            if runs.is_some() {
                println!();
            }
            density::print(&d);
        }
        doc.insert("density".into(), j);
    }
    if c.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(doc)).unwrap_or_default()
        );
    }
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn extra_words_follow_the_command_line() {
        assert_eq!(
            super::with_extra("console=ttyS0 quiet", ""),
            "console=ttyS0 quiet"
        );
        assert_eq!(
            super::with_extra("console=ttyS0", " initcall_debug  ignore_loglevel "),
            "console=ttyS0 initcall_debug ignore_loglevel"
        );
    }
}
