//! `husk bench`: husk side by side with QEMU's microvm machine on the same
//! guest kernel, printed as ratios. Benchmarks are programs, not tests.

mod boot;
mod fs;
mod image;
mod io;
mod profile;
mod run;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

/// `husk bench` arguments.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Boot to an init marker: husk vs qemu-system-x86_64 -M microvm.
    Boot(boot::BootArgs),
    /// virtio-blk read and virtio-net TCP throughput: husk vs QEMU microvm.
    Io(io::IoArgs),
    /// Guest file I/O: virtio-fs share vs virtio-blk disk vs QEMU microvm's virtio-fs.
    Fs(fs::FsArgs),
    /// `run -- true` start to exit: husk run (split by stage) vs runc run.
    Run(run::RunBenchArgs),
    /// An OCI image: cold pull, warm husk run vs runc run, disk per container.
    Image(image::ImageBenchArgs),
    /// Where a sandbox boot spends its time: guest RIP samples by kernel function.
    Profile(profile::ProfileArgs),
}

/// Runs a benchmark.
pub fn run(args: BenchArgs) -> Result<i32, String> {
    match args.what {
        BenchWhat::Boot(b) => boot::boot(b),
        BenchWhat::Io(i) => io::io(i),
        BenchWhat::Fs(f) => fs::fs(f),
        BenchWhat::Run(r) => run::run_bench(r),
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

/// The median (upper median for even counts); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
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

/// QEMU microvm flags common to every benchmark: no firmware tables the
/// guest kernel cannot use, virtio-mmio devices announced on its command
/// line, modern (1.x) virtio-mmio.
const QEMU_MICROVM: &[&str] = &[
    "-M",
    "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
    "-global",
    "virtio-mmio.force-legacy=false",
    "-enable-kvm",
    "-cpu",
    "host",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
];
