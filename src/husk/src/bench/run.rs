//! `husk bench run`: `husk run --rootfs TREE -- true` from process start
//! to exit, split by the agent's timestamps, with the root as a cached
//! disk image and as a virtio-fs share, next to `runc run` of the same
//! tree.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;

use super::median;

/// `husk bench run` arguments.
#[derive(Args)]
pub struct RunBenchArgs {
    /// Root filesystem; default: a busybox tree built from --busybox.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Static busybox for the default tree.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Runs per runtime (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// runc binary.
    #[arg(long, default_value = "runc")]
    runc: String,
}

/// Builds a busybox tree: /bin/busybox and a link per applet.
fn busybox_tree(dir: &Path, busybox: &Path) -> Result<PathBuf, String> {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .map_err(|e| format!("{}: {e}", busybox.display()))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    Ok(root)
}

/// An OCI bundle for runc: `runc spec`, then `true`, no terminal, our root.
pub(super) fn runc_bundle(dir: &Path, rootfs: &Path, runc: &str) -> Result<PathBuf, String> {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
    let o = Command::new(runc)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .map_err(|e| format!("{runc}: {e} (apt-get install runc)"))?;
    if !o.status.success() {
        return Err(format!(
            "runc spec: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    cfg["process"]["args"] = serde_json::json!(["true"]);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["root"]["path"] = serde_json::json!(rootfs);
    cfg["root"]["readonly"] = serde_json::json!(true);
    std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())?;
    Ok(bundle)
}

/// Runs the benchmark.
pub fn run_bench(a: RunBenchArgs) -> Result<i32, String> {
    let tmp = std::env::temp_dir().join(format!("husk-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let result = run_in(&a, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// One `husk run --timing -- true`: wall seconds and the stage split (ms).
fn husk_run(husk: &Path, rootfs: &Path, share: bool) -> Result<(f64, [f64; 6]), String> {
    let t0 = Instant::now();
    let mut c = Command::new(husk);
    c.args(["run", "--timing", "--rootfs"]).arg(rootfs);
    if share {
        c.arg("--rootfs-share");
    }
    let o = c
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let wall = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(0) {
        return Err(format!(
            "husk run failed: {}",
            err.lines().last().unwrap_or("")
        ));
    }
    let line = err
        .lines()
        .find(|l| l.starts_with("husk-timing:"))
        .ok_or("husk run printed no timing")?;
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((
        wall,
        [
            field("host_setup_ms="),
            field("guest_kernel_ms="),
            field("agent_ready_ms="),
            field("create_ms="),
            field("exec_ms="),
            field("run_ms="),
        ],
    ))
}

fn run_in(a: &RunBenchArgs, tmp: &Path) -> Result<i32, String> {
    let rootfs = match &a.rootfs {
        Some(r) => r.clone(),
        None => busybox_tree(tmp, &a.busybox)?,
    };
    let bundle = runc_bundle(tmp, &rootfs, &a.runc)?;
    let husk = std::env::current_exe().map_err(|e| e.to_string())?;
    // [image, share]
    let mut walls: [Vec<f64>; 2] = Default::default();
    let mut splits: [Vec<[f64; 6]>; 2] = Default::default();
    let mut runc_walls = Vec::new();
    for i in 0..a.runs {
        for (mode, share) in [(0, false), (1, true)] {
            let what = if share {
                "--rootfs-share"
            } else {
                "(disk image)"
            };
            eprintln!("run {}/{}: husk run {what}", i + 1, a.runs);
            let (wall, split) = husk_run(&husk, &rootfs, share)?;
            walls[mode].push(wall);
            splits[mode].push(split);
        }
        eprintln!("run {}/{}: runc run", i + 1, a.runs);
        let id = format!("husk-bench-{}-{i}", std::process::id());
        let t0 = Instant::now();
        let o = Command::new(&a.runc)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        runc_walls.push(t0.elapsed().as_secs_f64());
        if !o.status.success() {
            return Err(format!(
                "runc run: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    let hw = median(walls[0].clone());
    let sw = median(walls[1].clone());
    let rw = median(runc_walls);
    println!(
        "`run -- true`, {} runs each (alternating), medians; husk's root as a disk image or a virtio-fs share",
        a.runs
    );
    println!(
        "{:<40} {:>12} {:>12} {:>12} {:>11} {:>12}",
        "", "husk (disk)", "husk (share)", "runc run", "disk/runc", "share/disk"
    );
    println!(
        "{:<40} {:>12.3} {:>12.3} {:>12.3} {:>11.1} {:>12.3}",
        "wall, start to exit (s)",
        hw,
        sw,
        rw,
        hw / rw,
        sw / hw
    );
    let names = [
        "husk: host setup to first KVM_RUN (ms)",
        "husk: guest kernel to agent start (ms)",
        "husk: agent start to ready (ms)",
        "husk: ready to container created (ms)",
        "husk: created to exec (ms)",
        "husk: exec to exit (ms)",
    ];
    for (i, name) in names.iter().enumerate() {
        let d = median(splits[0].iter().map(|s| s[i]).collect());
        let sh = median(splits[1].iter().map(|s| s[i]).collect());
        println!("{name:<40} {d:>12.1} {sh:>12.1}");
    }
    Ok(0)
}
