//! `husk bench startup`: `true` in a busybox container, start to exit, run
//! by husk (booted cold with the root as a cached image disk, restored
//! from the warm template, and with the root as a virtio-fs share), runc,
//! crun, QEMU microvm and `husk vm` (same kernel, agent disk and root disk,
//! to the agent's first console line) and the agent natively on the host,
//! interleaved, stage by stage.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::native;
use super::peers::{self, ConsoleVm, Skipped};
use super::stats::{print_table, ratio, round_order, stage_names, Series};
use super::Common;

/// husk's stages (`husk run --timing`), in order; they add up to the total.
const HUSK_STAGES: [&str; 7] = [
    "process start → first KVM_RUN",
    "first KVM_RUN → agent start",
    "agent start → ready",
    "ready → container created",
    "created → exec",
    "exec → exit",
    "exit → process exit",
];
const RUNC_STAGES: [&str; 1] = ["run (create, start, exit, delete)"];
const CONSOLE_STAGES: [&str; 1] = ["process start → agent start"];
/// The agent's first console line (with `quiet`, nothing else prints).
const AGENT_MARKER: &str = "husk-agent:";

/// One way of running the workload.
enum Peer {
    Husk {
        share: bool,
        agent: PathBuf,
        /// Restore the warm template instead of booting.
        warm: bool,
    },
    Oci {
        bin: PathBuf,
    },
    /// A VMM (QEMU, or `husk vm`) booting the sandbox's kernel and disks,
    /// timed to the agent's first console line.
    Console {
        cmd: fn(&Path, &Path, &[PathBuf; 2]) -> Command,
        bin: PathBuf,
        disks: [PathBuf; 2],
    },
    Native {
        agent: PathBuf,
    },
}

/// What the startup benchmark measured.
pub struct Startup {
    pub series: Vec<Series>,
    pub skipped: Vec<Skipped>,
    pub prepared_s: Vec<(String, f64)>,
}

/// Runs `runs` interleaved rounds.
pub fn measure(c: &Common, runs: usize, tmp: &Path) -> Result<Startup, String> {
    let kernel = super::kernel_or_error(&c.kernel)?;
    let agent = husk_runtime::paths::agent_binary(c.agent.as_deref()).map_err(|e| e.to_string())?;
    let rootfs = peers::busybox_tree(tmp, &c.busybox)?;
    let bundle = peers::oci_bundle(&tmp.join("bundle"), &rootfs, &["true"], &[])?;
    let mut skipped = Vec::new();
    let mut peers_list: Vec<(Peer, Series)> = vec![
        (
            Peer::Husk {
                share: false,
                agent: agent.clone(),
                warm: false,
            },
            Series::new(
                "husk",
                "husk run --no-template --rootfs TREE -- true (cold boot; root: cached ext4 image disk)",
                &HUSK_STAGES,
            ),
        ),
        (
            Peer::Husk {
                share: false,
                agent: agent.clone(),
                warm: true,
            },
            Series::new(
                "husk-warm",
                "husk run --rootfs TREE -- true (restored from the warm template; root: the same image disk)",
                &HUSK_STAGES,
            ),
        ),
        (
            Peer::Husk {
                share: true,
                agent: agent.clone(),
                warm: false,
            },
            Series::new(
                "husk-share",
                "husk run --no-template --rootfs TREE --rootfs-share -- true (cold boot; root: virtio-fs)",
                &HUSK_STAGES,
            ),
        ),
        (
            Peer::Husk {
                share: true,
                agent: agent.clone(),
                warm: true,
            },
            Series::new(
                "husk-share-warm",
                "husk run --rootfs TREE --rootfs-share -- true (restored from the warm template with a share slot; root: virtio-fs)",
                &HUSK_STAGES,
            ),
        ),
    ];
    // What a first `husk run` builds once (cold caches): built here, timed
    // and reported apart, so that no measured run pays for it.
    let mut prepared_s = Vec::new();
    let t = Instant::now();
    let agent_disk = husk_runtime::paths::agent_disk(&agent).map_err(|e| e.to_string())?;
    prepared_s.push(("agent disk".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let root_disk = husk_image::ext4::image_for_dir(&rootfs, &husk_runtime::paths::image_cache())
        .map_err(|e| e.to_string())?;
    prepared_s.push(("root image".to_string(), t.elapsed().as_secs_f64()));
    // The first templated run of each shape boots and snapshots its
    // template (unless an earlier run of this kernel + agent + shape left
    // it: then no template is added).
    let count = || {
        husk_runtime::template::list()
            .map(|l| l.len())
            .map_err(|e| e.to_string())
    };
    for (share, what) in [(false, ""), (true, " with a share")] {
        let before = count()?;
        let t = Instant::now();
        husk_run(c, &kernel, &agent, &rootfs, share, true)?;
        let secs = t.elapsed().as_secs_f64();
        prepared_s.push((
            if count()? > before {
                format!("warm template{what} (first run: boot + snapshot + restore)")
            } else {
                format!("warm template{what} (found; one warm run)")
            },
            secs,
        ));
    }
    for (name, bin) in [("runc", &c.runc), ("crun", &c.crun)] {
        match peers::which(bin) {
            Some(bin) => peers_list.push((
                Peer::Oci { bin },
                Series::new(
                    name,
                    &format!("{name} run of the same bundle"),
                    &RUNC_STAGES,
                ),
            )),
            None => skipped.push(Skipped::new(name, format!("{bin} is not installed"))),
        }
    }
    let disks = [agent_disk, root_disk];
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    peers_list.push((
        Peer::Console {
            cmd: husk_vm_command,
            bin: husk,
            disks: disks.clone(),
        },
        Series::new(
            "husk-console",
            "husk vm: the same VM as husk run's, no vsock, timed like qemu to the agent's first console line",
            &CONSOLE_STAGES,
        ),
    ));
    match peers::which(&c.qemu) {
        Some(bin) => {
            peers_list.push((
                Peer::Console {
                    cmd: qemu_command,
                    bin,
                    disks,
                },
                Series::new(
                    "qemu",
                    "qemu-system-x86_64 -M microvm: same kernel, command line, agent disk and root disk, to the agent's first console line (no vhost-vsock device here, so the agent stops there)",
                    &CONSOLE_STAGES,
                ),
            ));
        }
        None => skipped.push(Skipped::new("qemu", format!("{} is not installed", c.qemu))),
    }
    peers_list.push((
        Peer::Native {
            agent: agent.clone(),
        },
        Series::new(
            "agent-native",
            "the agent's stages on the host (husk-agent --unix): estimate for a VT-x host",
            &native::STAGES,
        ),
    ));

    let mut dead = vec![false; peers_list.len()];
    for round in 0..runs {
        for i in round_order(round, peers_list.len()) {
            peers::check_interrupted()?;
            if dead[i] {
                continue;
            }
            let (peer, series) = &mut peers_list[i];
            eprintln!("run {}/{runs}: {}", round + 1, series.name);
            match run_peer(c, peer, &kernel, &rootfs, &bundle, tmp, round) {
                Ok((stages, total)) => series.push(stages, total),
                // husk failing is the benchmark failing; a peer that dies
                // is reported and left out of the remaining rounds.
                Err(e) if series.name.starts_with("husk") => return Err(e),
                Err(e) => {
                    dead[i] = true;
                    skipped.push(Skipped::new(&series.name, format!("died: {e}")));
                }
            }
        }
    }
    let series = peers_list
        .into_iter()
        .zip(dead)
        .filter(|((_, s), dead)| !dead || !s.samples.is_empty())
        .map(|((_, s), _)| s)
        .collect();
    Ok(Startup {
        series,
        skipped,
        prepared_s,
    })
}

/// One run of `peer`: the stages (ms) and the total (s).
fn run_peer(
    c: &Common,
    peer: &Peer,
    kernel: &Path,
    rootfs: &Path,
    bundle: &Path,
    tmp: &Path,
    round: usize,
) -> Result<(Vec<f64>, f64), String> {
    match peer {
        Peer::Husk { share, agent, warm } => {
            let (total, stages) = husk_run(c, kernel, agent, rootfs, *share, *warm)?;
            Ok((stages, total))
        }
        Peer::Oci { bin } => {
            let id = format!("husk-bench-{}-{round}", std::process::id());
            let mut cmd = peers::oci_runtime(bin);
            cmd.args(["run", "--bundle"]).arg(bundle).arg(&id);
            let total = peers::timed(cmd, "run")?;
            Ok((vec![total * 1e3], total))
        }
        Peer::Console { cmd, bin, disks } => {
            let vm = ConsoleVm::start(
                cmd(bin, kernel, disks),
                AGENT_MARKER,
                Duration::from_secs(c.timeout),
            )?;
            let t = vm.to_marker();
            vm.kill();
            Ok((vec![t * 1e3], t))
        }
        Peer::Native { agent } => {
            let dir = tmp.join(format!("native-{round}"));
            let stages = native::run_once(agent, rootfs, &dir, Duration::from_secs(c.timeout))?;
            let total = stages.iter().sum::<f64>() / 1e3;
            Ok((stages, total))
        }
    }
}

/// One `husk run --timing -- true`: wall seconds and the stages (ms).
fn husk_run(
    c: &Common,
    kernel: &Path,
    agent: &Path,
    rootfs: &Path,
    share: bool,
    warm: bool,
) -> Result<(f64, Vec<f64>), String> {
    let run = HuskRun {
        timeout: c.timeout,
        kernel,
        agent,
        rootfs,
        share,
        warm,
        args: &["true"],
        profile: None,
    };
    run.once().map(|r| (r.wall, r.stages))
}

/// What one `husk run --timing` reported.
pub(super) struct RunTiming {
    /// Wall seconds.
    pub wall: f64,
    /// The stages (ms), in `TIMING_KEYS` order.
    pub stages: Vec<f64>,
    /// CLOCK_MONOTONIC ns just before the process was started.
    pub start_ns: u64,
    /// The `husk-timing-setup:` line, if it printed one.
    pub setup: Option<String>,
}

/// `husk run --timing` of a command in a root directory.
pub(super) struct HuskRun<'a> {
    /// Boot timeout, seconds.
    pub timeout: u64,
    pub kernel: &'a Path,
    pub agent: &'a Path,
    pub rootfs: &'a Path,
    /// The root as a virtio-fs share instead of an image.
    pub share: bool,
    /// Restore the warm template (else `--no-template`).
    pub warm: bool,
    /// The container's command.
    pub args: &'a [&'a str],
    /// `HUSK_PROFILE` for the run (sample file, rate).
    pub profile: Option<(&'a Path, u32)>,
}

impl HuskRun<'_> {
    /// Runs it once.
    pub fn once(&self) -> Result<RunTiming, String> {
        let mut cmd = self.command()?;
        let t0 = Instant::now();
        let start_ns = husk_vmm::vstate::vcpu::monotonic_ns();
        let o = cmd.output().map_err(|e| e.to_string())?;
        let wall = t0.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(0) {
            return Err(format!("husk run failed: {}", peers::last_line(&err)));
        }
        let line = err
            .lines()
            .find(|l| l.starts_with("husk-timing:"))
            .ok_or("husk run printed no timing line")?;
        let setup = err
            .lines()
            .find(|l| l.starts_with("husk-timing-setup:"))
            .map(str::to_owned);
        Ok(RunTiming {
            wall,
            stages: timing_fields(line),
            start_ns,
            setup,
        })
    }

    fn command(&self) -> Result<Command, String> {
        let husk = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(husk);
        cmd.env("HUSK_BOOT_TIMEOUT", self.timeout.to_string())
            .args(["run", "--timing", "--kernel"])
            .arg(self.kernel)
            .arg("--agent")
            .arg(self.agent)
            .arg("--rootfs")
            .arg(self.rootfs);
        if self.share {
            cmd.arg("--rootfs-share");
        }
        if !self.warm {
            cmd.arg("--no-template");
        }
        match self.profile {
            Some((file, hz)) => cmd.env("HUSK_PROFILE", format!("{}:{hz}", file.display())),
            None => cmd.env_remove("HUSK_PROFILE"),
        };
        cmd.arg("--").args(self.args).stdin(Stdio::null());
        Ok(cmd)
    }
}

/// The stage fields of a `husk-timing:` line (NaN where one is missing).
fn timing_fields(line: &str) -> Vec<f64> {
    crate::run::TIMING_KEYS
        .iter()
        .map(|k| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect()
}

/// QEMU microvm with the sandbox's kernel, command line, memory and disks.
fn qemu_command(bin: &Path, kernel: &Path, disks: &[PathBuf; 2]) -> Command {
    let cmdline = Some(husk_runtime::sandbox::sandbox_cmdline());
    let mut q = peers::qemu_sandbox(Command::new(bin), kernel, cmdline);
    for (i, d) in disks.iter().enumerate() {
        q.arg("-drive")
            .arg(format!(
                "file={},if=none,id=d{i},format=raw,readonly=on",
                d.display()
            ))
            .args(["-device", &format!("virtio-blk-device,drive=d{i}")]);
    }
    q
}

/// `husk vm` shaped as `husk run`'s sandbox VM (its kernel, command line,
/// memory, vCPU and disks), without the vsock device.
fn husk_vm_command(husk: &Path, kernel: &Path, disks: &[PathBuf; 2]) -> Command {
    let mut c = Command::new(husk);
    c.args(["vm", "--console", "stdout", "--kernel"])
        .arg(kernel)
        .arg("--cmdline")
        .arg(husk_runtime::sandbox::sandbox_cmdline())
        .arg("--mem")
        .arg(husk_runtime::run::vm_mem_mib(None).to_string())
        .args(["--vcpus", "1"]);
    for d in disks {
        c.arg("--disk").arg(format!("path={},ro", d.display()));
    }
    c
}

/// Prints the startup table and the comparisons.
pub fn print(s: &Startup, runs: usize) {
    println!(
        "startup: `true` in a busybox container, {runs} run(s) each, interleaved; median [p10-p90]; host: {}",
        peers::cpu_model()
    );
    let mut rows = vec![std::iter::once("stage (ms)".to_string())
        .chain(s.series.iter().map(|x| x.name.clone()))
        .collect::<Vec<_>>()];
    for st in stage_names(&s.series) {
        let mut row = vec![st.to_string()];
        for x in &s.series {
            row.push(x.stage_named(st).cell(1));
        }
        rows.push(row);
    }
    let mut total = vec!["total, start to exit (s)".to_string()];
    total.extend(s.series.iter().map(|x| x.total().cell(3)));
    rows.push(total);
    print_table(&rows);
    for (name, t) in &s.prepared_s {
        println!("husk's {name}: ready in {t:.3} s before the runs (built once per agent / root tree, then cached; not in the table)");
    }
    let get = |n: &str| s.series.iter().find(|x| x.name == n);
    println!();
    let mut cmp = vec![vec![
        "comparison".to_string(),
        "husk".into(),
        "peer".into(),
        "husk/peer".into(),
    ]];
    if let (Some(h), Some(w)) = (get("husk"), get("husk-warm")) {
        let (a, b) = (w.total().median, h.total().median);
        cmp.push(comparison(
            "start to exit (s), husk warm (template) vs husk cold",
            a,
            b,
            3,
        ));
        let (a, b) = (w.stages_sum(0..3).median, h.stages_sum(0..3).median);
        cmp.push(comparison(
            "start to agent ready (ms), husk warm vs cold",
            a,
            b,
            1,
        ));
    }
    if let (Some(h), Some(w)) = (get("husk-share"), get("husk-share-warm")) {
        let (a, b) = (w.total().median, h.total().median);
        cmp.push(comparison(
            "start to exit (s), root shared: warm vs cold",
            a,
            b,
            3,
        ));
    }
    if let Some(h) = get("husk") {
        for peer in ["runc", "crun"] {
            if let Some(p) = get(peer) {
                let (a, b) = (h.total().median, p.total().median);
                cmp.push(comparison(format!("start to exit (s), vs {peer}"), a, b, 3));
            }
        }
        if let Some(q) = get("qemu") {
            let b = q.stage(0).median;
            if let Some(hc) = get("husk-console") {
                let a = hc.stage(0).median;
                cmp.push(comparison(
                    "start to agent start (ms), husk vm vs qemu microvm (both to the console line)",
                    a,
                    b,
                    1,
                ));
            }
            let a = h.stages_sum(0..2).median;
            cmp.push(comparison(
                "start to agent start (ms), husk run vs qemu microvm",
                a,
                b,
                1,
            ));
        }
        if let Some(n) = get("agent-native") {
            for (hi, ni) in [(2, 0), (3, 1), (4, 2), (5, 3)] {
                let a = h.stage(hi).median;
                let b = n.stage(ni).median;
                cmp.push(comparison(
                    format!("{} (ms), in the VM vs native", HUSK_STAGES[hi]),
                    a,
                    b,
                    1,
                ));
            }
        }
    }
    print_table(&cmp);
    println!("agent-native is the agent on the host: the estimate of the guest stages on a VT-x host. On kvm_pvm hosts (no VT-x) the guest kernel is emulated: compare ratios, not absolute times.");
}

/// A row of the comparison table: what, husk's figure `a`, the peer's `b`
/// (both with `decimals` digits), and a / b.
fn comparison(what: impl Into<String>, a: f64, b: f64, decimals: usize) -> Vec<String> {
    vec![
        what.into(),
        format!("{a:.decimals$}"),
        format!("{b:.decimals$}"),
        ratio(a, b),
    ]
}

pub fn json(s: &Startup, runs: usize) -> serde_json::Value {
    json!({
        "benchmark": "startup",
        "workload": "true in a busybox container",
        "runs": runs,
        "host_cpu": peers::cpu_model(),
        "kvm_pvm": husk_vmm::vstate::kvm::is_pvm_host(),
        "series": s.series.iter().map(Series::json).collect::<Vec<_>>(),
        "prepared_s": s.prepared_s.iter().map(|(n, t)| json!({"name": n, "seconds": t})).collect::<Vec<_>>(),
        "skipped": Skipped::json(&s.skipped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_line_fields_are_read_in_stage_order() {
        let line = "husk-timing: first_kvm_run_ms=2.5 guest_kernel_ms=14000.0 agent_ready_ms=300.0 create_ms=2000.0 exec_ms=900.0 run_ms=2300.0 teardown_ms=50.0 total_ms=19552.5";
        assert_eq!(
            timing_fields(line),
            vec![2.5, 14000.0, 300.0, 2000.0, 900.0, 2300.0, 50.0]
        );
        assert!(timing_fields("husk-timing: create_ms=1")[0].is_nan());
    }
}
