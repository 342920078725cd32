//! `husk bench fs`: file I/O in the guest on a virtio-fs share (husk's
//! device and virtiofsd) and on a virtio-blk ext4 disk, and on the same
//! share under QEMU's microvm with the same virtiofsd: sequential write
//! and read, creating and stat-ing small files. Timed by the guest
//! (/proc/uptime, 10 ms steps), so runs must last seconds; on a kvm_pvm
//! host (guest kernel emulated) the defaults take ~20 minutes a run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{console_lines, kernel_or_error, median, stop_vm, write_busybox_initrd, QEMU_MICROVM};

// `husk bench fs` arguments.
#[derive(Args)]
pub struct FsArgs {
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Static busybox for the guest.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Runs per VMM (alternating).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// MiB written then read sequentially.
    #[arg(long, default_value_t = 8)]
    mib: u64,
    /// Small files created, then stat-ed.
    #[arg(long, default_value_t = 1000)]
    files: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// virtiofsd for QEMU (husk uses its own default, or $HUSK_VIRTIOFSD).
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// Give up on one VM after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

/// The guest's workload on each mounted target (`fs`: the share, `blk`:
/// the ext4 disk); one RESULT line per target.
fn init_script(mib: u64, files: u32) -> String {
    format!(
        r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mkdir -p /proc /dev /fs /blk
$bb mount -t proc proc /proc
$bb mount -t devtmpfs dev /dev
targets=
$bb mount -t virtiofs share /fs && targets="$targets fs"
$bb mount -t ext4 /dev/vda /blk && targets="$targets blk"
now() {{ read t idle < /proc/uptime; echo $t; }}
drop() {{ $bb sync; echo 3 > /proc/sys/vm/drop_caches; }}
for target in $targets; do
  d=/$target
  t0=$(now); $bb dd if=/dev/zero of=$d/big bs=1M count={mib} conv=fsync 2>/dev/null; w=$?; t1=$(now)
  drop
  t2=$(now); $bb dd if=$d/big of=/dev/null bs=1M 2>/dev/null; r=$?; t3=$(now)
  $bb mkdir $d/small
  t4=$(now); i=0; while [ $i -lt {files} ]; do echo $i > $d/small/f$i; i=$((i+1)); done; $bb sync; t5=$(now)
  drop
  t6=$(now); n=$($bb ls -l $d/small | $bb wc -l); t7=$(now)
  echo "RESULT target=$target write=$t0,$t1 read=$t2,$t3 create=$t4,$t5 stat=$t6,$t7 rc=$w$r n=$n"
done
echo HUSK-BENCH-DONE
$bb reboot -f
"#
    )
}

/// Seconds per phase on one target.
#[derive(Debug, Clone, Copy, Default)]
struct Phases {
    write: f64,
    read: f64,
    create: f64,
    stat: f64,
}

fn parse_result(line: &str, files: u32) -> Result<(String, Phases), String> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .ok_or_else(|| format!("bad result line: {line}"))
    };
    let span = |k: &str| -> Result<f64, String> {
        let v = field(k)?;
        let (a, b) = v
            .split_once(',')
            .ok_or_else(|| format!("bad {k} in {line}"))?;
        let (a, b): (f64, f64) = (
            a.parse().map_err(|_| format!("bad {k} in {line}"))?,
            b.parse().map_err(|_| format!("bad {k} in {line}"))?,
        );
        Ok((b - a).max(0.01))
    };
    if field("rc=")? != "00" {
        return Err(format!("the guest's dd failed: {line}"));
    }
    // `ls -l` prints a "total" line first.
    if field("n=")? != (files + 1).to_string() {
        return Err(format!("the guest saw the wrong number of files: {line}"));
    }
    Ok((
        field("target=")?.to_string(),
        Phases {
            write: span("write=")?,
            read: span("read=")?,
            create: span("create=")?,
            stat: span("stat=")?,
        },
    ))
}

/// Boots one VM and collects its RESULT lines.
fn run_vm(
    mut cmd: Command,
    timeout: Duration,
    files: u32,
) -> Result<Vec<(String, Phases)>, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let rx = console_lines(&mut child, "RESULT ");
    let deadline = Instant::now() + timeout;
    let mut results = Vec::new();
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("RESULT ") => match parse_result(&l, files) {
                Ok(r) => results.push(r),
                Err(e) => break Err(e),
            },
            Ok(_) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err("the VM exited before the guest finished".to_string())
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                break Err(format!("no result within {} s", timeout.as_secs()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    stop_vm(&mut child);
    outcome.map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if results.len() != 2 {
        return Err(format!(
            "{:?}: the guest mounted {} of the 2 targets",
            cmd.get_program(),
            results.len()
        ));
    }
    Ok(results)
}

/// A fresh share directory and an empty ext4 disk for one run.
fn fresh_targets(tmp: &Path, mib: u64) -> Result<(PathBuf, PathBuf), String> {
    let share = tmp.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
    let disk = tmp.join("disk.img");
    let size = format!("{}M", mib * 2 + 64);
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .arg(&size)
        .output()
        .map_err(|e| format!("mkfs.ext4: {e} (install e2fsprogs)"))?;
    if !o.status.success() {
        return Err(format!(
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok((share, disk))
}

/// Starts virtiofsd for QEMU and waits (bounded) for its socket.
fn start_virtiofsd(bin: &Path, share: &Path, sock: &Path) -> Result<Child, String> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(bin)
        .arg(format!("--socket-path={}", sock.display()))
        .arg("-o")
        .arg(format!("source={}", share.display()))
        .args([
            "-o",
            "cache=auto",
            "-o",
            "sandbox=namespace",
            "-o",
            "log_level=err",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{} exited: {st}", bin.display()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{} made no socket within 10 s", bin.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// Runs the fs benchmark.
pub fn fs(a: FsArgs) -> Result<i32, String> {
    let kernel = kernel_or_error(&a.kernel)?;
    let tmp = std::env::temp_dir().join(format!("husk-bench-fs-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = fs_in(&a, &kernel, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn fs_in(a: &FsArgs, kernel: &Path, tmp: &Path) -> Result<i32, String> {
    let initrd = write_busybox_initrd(tmp, &init_script(a.mib, a.files), &a.busybox)?;
    let virtiofsd = a
        .virtiofsd
        .clone()
        .unwrap_or_else(husk_vmm::devices::virtio::attach::virtiofsd_path);
    let cmdline = husk_vmm::config::guest_cmdline(
        &husk_vmm::VmConfig::default(),
        husk_vmm::vstate::kvm::is_pvm_host(),
    );
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(a.timeout);
    let mut samples: Vec<(&str, Phases)> = Vec::new();
    for i in 0..a.runs {
        for peer in super::stats::round_order(i, 2) {
            if peer == 0 {
                eprintln!(
                    "run {}/{}: husk (virtio-fs share, virtio-blk ext4 disk)",
                    i + 1,
                    a.runs
                );
                let (share, disk) = fresh_targets(tmp, a.mib)?;
                let mut c = Command::new(&husk);
                c.args(["vm", "--mem", &a.mem.to_string(), "--kernel"])
                    .arg(kernel)
                    .arg("--initrd")
                    .arg(&initrd)
                    .arg("--disk")
                    .arg(format!("path={}", disk.display()))
                    .arg("--fs")
                    .arg(format!("tag=share,dir={}", share.display()));
                for (target, p) in run_vm(c, timeout, a.files)? {
                    samples.push((
                        if target == "fs" {
                            "husk fs"
                        } else {
                            "husk blk"
                        },
                        p,
                    ));
                }
            } else {
                eprintln!("run {}/{}: qemu microvm (same virtiofsd)", i + 1, a.runs);
                let (share, disk) = fresh_targets(tmp, a.mib)?;
                let sock = tmp.join("virtiofsd.sock");
                let mut daemon = start_virtiofsd(&virtiofsd, &share, &sock)?;
                let mut flags: Vec<String> = QEMU_MICROVM.iter().map(|s| s.to_string()).collect();
                // vhost-user needs guest memory the backend can map.
                if let Some(m) = flags.iter_mut().find(|f| f.starts_with("microvm,")) {
                    m.push_str(",memory-backend=mem");
                }
                let mut c = Command::new(&a.qemu);
                c.args(&flags)
                    .arg("-object")
                    .arg(format!(
                        "memory-backend-memfd,id=mem,size={}M,share=on",
                        a.mem
                    ))
                    .args(["-m", &a.mem.to_string(), "-kernel"])
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(&initrd)
                    .arg("-append")
                    .arg(&cmdline)
                    .arg("-drive")
                    .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"])
                    .arg("-chardev")
                    .arg(format!("socket,id=vfs,path={}", sock.display()))
                    .args(["-device", "vhost-user-fs-device,chardev=vfs,tag=share"]);
                let r = run_vm(c, timeout, a.files);
                let _ = daemon.kill();
                let _ = daemon.wait();
                for (target, p) in r? {
                    samples.push((
                        if target == "fs" {
                            "qemu fs"
                        } else {
                            "qemu blk"
                        },
                        p,
                    ));
                }
            }
        }
    }
    println!(
        "guest file I/O: kernel {}, {} MiB guest, {} run(s) each (alternating), medians, guest-timed",
        kernel.display(),
        a.mem,
        a.runs
    );
    let cols = ["husk fs", "husk blk", "qemu fs", "qemu blk"];
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>16}",
        "metric", cols[0], cols[1], cols[2], cols[3], "husk fs/qemu fs"
    );
    type Metric = Box<dyn Fn(&Phases) -> f64>;
    let (mib, files) = (a.mib as f64, f64::from(a.files));
    let rows: [(String, Metric); 4] = [
        (
            format!("seq write {} MiB, fsync (MiB/s)", a.mib),
            Box::new(move |p| mib / p.write),
        ),
        (
            format!("seq read {} MiB, cold (MiB/s)", a.mib),
            Box::new(move |p| mib / p.read),
        ),
        (
            format!("create {} files (files/s)", a.files),
            Box::new(move |p| files / p.create),
        ),
        (
            format!("stat {} files, cold (files/s)", a.files),
            Box::new(move |p| files / p.stat),
        ),
    ];
    for (name, f) in rows {
        let m: Vec<f64> = cols
            .iter()
            .map(|c| {
                median(
                    samples
                        .iter()
                        .filter(|(n, _)| n == c)
                        .map(|(_, p)| f(p))
                        .collect(),
                )
            })
            .collect();
        println!(
            "{name:<34} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>16.3}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[0] / m[2]
        );
    }
    Ok(0)
}
