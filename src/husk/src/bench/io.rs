//! `husk bench io`: guest sequential read from virtio-blk (O_DIRECT in the
//! guest) and guest-to-host TCP over virtio-net, husk vs QEMU microvm on
//! the same kernel, disk image and tap.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{console_lines, kernel_or_error, median, stop_vm, write_busybox_initrd, QEMU_MICROVM};

// `husk bench io` arguments.
#[derive(Args)]
pub struct IoArgs {
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Static busybox for the guest.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Runs per VMM (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// MiB the guest reads from the disk.
    #[arg(long, default_value_t = 256)]
    blk_mib: u64,
    /// MiB the guest sends over TCP.
    #[arg(long, default_value_t = 4)]
    net_mib: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Give up on one VM after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
}

const HOST_IP: &str = "10.213.9.1";
const GUEST_IP: &str = "10.213.9.2";
const PORT: u16 = 7009;

fn init_script(blk_mib: u64, net_mib: u64) -> String {
    format!(
        r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t devtmpfs dev /dev
$bb ip link set lo up
$bb ip addr add {GUEST_IP}/24 dev eth0
$bb ip link set eth0 up
# CLOCK_MONOTONIC in ns (/proc/uptime has 10 ms resolution).
now() {{ $bb head -n 3 /proc/timer_list | $bb sed -n 's/^now at \([0-9]*\) nsecs$/\1/p'; }}
t0=$(now)
$bb dd if=/dev/vda of=/dev/null bs=1M count={blk_mib} iflag=direct 2>/tmp/dd.err
rc=$?
t1=$(now)
echo "BLK: start=$t0 end=$t1 rc=$rc err=$($bb tail -n1 /tmp/dd.err | $bb tr ' ' _)"
$bb dd if=/dev/zero bs=64k count={net_count} 2>/dev/null | $bb nc {HOST_IP} {PORT}
echo "NET: rc=$?"
echo HUSK-BENCH-DONE
$bb reboot -f
"#,
        net_count = net_mib * 16
    )
}

/// One VM's results.
#[derive(Debug, Clone, Copy)]
struct IoSample {
    blk_mb_s: f64,
    net_mb_s: f64,
}

/// A network namespace holding the benchmark's tap; deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str, tap: &str) -> Result<Self, String> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Netns(name.to_string());
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", tap, "mode", "tap"],
            vec!["addr", "add", &format!("{HOST_IP}/24"), "dev", tap],
            vec!["link", "set", tap, "up"],
        ] {
            let mut full = vec!["netns", "exec", name, "ip"];
            full.extend(args);
            ip(&full)?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e} (install iproute2)"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Bytes received and MB/s, or what went wrong.
type SinkResult = Result<(u64, f64), String>;

/// Accepts one connection inside `netns` and times the bytes it receives
/// (first byte to EOF). Returns (bytes, MB/s).
fn tcp_sink(netns: &str) -> Result<mpsc::Receiver<SinkResult>, String> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns_path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let result = (|| -> SinkResult {
            let ns = std::fs::File::open(&ns_path).map_err(|e| e.to_string())?;
            // SAFETY: setns moves only this thread into the namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            let listener = TcpListener::bind((HOST_IP, PORT)).map_err(|e| e.to_string())?;
            let _ = ready_tx.send(());
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            let mut first = None;
            loop {
                let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
            let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
            Ok((total, total as f64 / 1e6 / secs.max(1e-9)))
        })();
        let _ = tx.send(result);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "TCP sink did not start".to_string())?;
    Ok(rx)
}

/// Writes `mib` MiB of pseudo-random bytes (not sparse, not compressible).
fn write_disk(path: &Path, mib: u64) -> Result<(), String> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).map_err(|e| e.to_string())?;
    }
    f.flush().map_err(|e| e.to_string())
}

/// Runs the io benchmark.
pub fn io(a: IoArgs) -> Result<i32, String> {
    let kernel = kernel_or_error(&a.kernel)?;
    let id = std::process::id();
    let tmp = std::env::temp_dir().join(format!("husk-bench-io-{id}"));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = io_in(&a, &kernel, &tmp, id);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn io_in(a: &IoArgs, kernel: &Path, tmp: &Path, id: u32) -> Result<i32, String> {
    let initrd = write_busybox_initrd(tmp, &init_script(a.blk_mib, a.net_mib), &a.busybox)?;
    let disk = tmp.join("disk.img");
    write_disk(&disk, a.blk_mib)?;
    let ns_name = format!("husk-bench-{id}");
    let tap = format!("hbench{}", id % 100_000);
    let _ns = Netns::new(&ns_name, &tap)?;
    let cmdline = husk_vmm::config::guest_cmdline(
        &husk_vmm::VmConfig::default(),
        husk_vmm::vstate::kvm::is_pvm_host(),
    );
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(a.timeout);
    let (mut h, mut q) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        for peer in super::stats::round_order(i, 2) {
            if peer == 0 {
                eprintln!("run {}/{}: husk", i + 1, a.runs);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns_name])
                    .arg(&husk)
                    .args(["vm", "--mem", &a.mem.to_string(), "--kernel"])
                    .arg(kernel)
                    .arg("--initrd")
                    .arg(&initrd)
                    .arg("--disk")
                    .arg(format!("path={},ro", disk.display()))
                    .arg("--net")
                    .arg(format!("tap={tap}"));
                h.push(run_one(
                    c,
                    &ns_name,
                    a.blk_mib << 20,
                    a.net_mib << 20,
                    timeout,
                )?);
            } else {
                eprintln!("run {}/{}: qemu microvm", i + 1, a.runs);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns_name, &a.qemu])
                    .args(QEMU_MICROVM)
                    .args(["-m", &a.mem.to_string(), "-kernel"])
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(&initrd)
                    .arg("-append")
                    .arg(&cmdline)
                    .arg("-drive")
                    .arg(format!("file={},format=raw,if=none,id=d0,readonly=on", disk.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"])
                    .arg("-netdev")
                    .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"))
                    // The same features husk's virtio-net offers: no offloads.
                    .args(["-device", "virtio-net-device,netdev=n0,csum=off,guest_csum=off,gso=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off,host_ufo=off,guest_ufo=off,mrg_rxbuf=off"]);
                q.push(run_one(
                    c,
                    &ns_name,
                    a.blk_mib << 20,
                    a.net_mib << 20,
                    timeout,
                )?);
            }
        }
    }
    println!(
        "virtio throughput: kernel {}, {} MiB guest, {} run(s) each (alternating), medians, MB/s",
        kernel.display(),
        a.mem,
        a.runs
    );
    println!(
        "{:<44} {:>10} {:>14} {:>10}",
        "metric", "husk", "qemu microvm", "husk/qemu"
    );
    type Metric = fn(&IoSample) -> f64;
    let rows: [(String, Metric); 2] = [
        (
            format!("blk: dd {} MiB iflag=direct (guest-timed)", a.blk_mib),
            |s| s.blk_mb_s,
        ),
        (
            format!("net: {} MiB guest->host TCP (host-timed)", a.net_mib),
            |s| s.net_mb_s,
        ),
    ];
    for (name, f) in rows {
        let hm = median(h.iter().map(f).collect());
        let qm = median(q.iter().map(f).collect());
        println!("{name:<44} {hm:>10.3} {qm:>14.3} {:>10.3}", hm / qm);
    }
    Ok(0)
}

/// Boots one VM, collects the guest's BLK line and the host sink's rate.
fn run_one(
    mut cmd: Command,
    netns: &str,
    blk_bytes: u64,
    net_expected: u64,
    timeout: Duration,
) -> Result<IoSample, String> {
    let sink = tcp_sink(netns)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let rx = console_lines(&mut child, "BLK: ");
    let deadline = Instant::now() + timeout;
    let mut blk = None;
    let mut done = false;
    while !done && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("BLK: ") => blk = Some(l),
            Ok(_) => done = true,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    stop_vm(&mut child);
    let blk =
        blk.ok_or_else(|| format!("{:?}: the guest printed no BLK result", cmd.get_program()))?;
    let field = |k: &str| -> Option<f64> {
        blk.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    if field("rc=") != Some(0.0) {
        return Err(format!(
            "{:?}: the guest's dd failed: {blk}",
            cmd.get_program()
        ));
    }
    let (t0, t1) = (field("start="), field("end="));
    let blk_secs = match (t0, t1) {
        (Some(a), Some(b)) if b > a => (b - a) / 1e9,
        _ => return Err(format!("bad BLK line: {blk}")),
    };
    let (net_bytes, net) = sink
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "TCP sink got no connection".to_string())??;
    if net_bytes != net_expected {
        return Err(format!(
            "{:?}: the host received {net_bytes} of {net_expected} TCP bytes",
            cmd.get_program()
        ));
    }
    if !done {
        return Err(format!(
            "{:?}: the guest did not finish the TCP transfer",
            cmd.get_program()
        ));
    }
    Ok(IoSample {
        blk_mb_s: blk_bytes as f64 / 1e6 / blk_secs,
        net_mb_s: net,
    })
}
