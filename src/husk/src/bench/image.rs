//! `husk bench image`: an OCI image's cold pull (registry to guest disk),
//! a warm `husk run IMAGE true` next to `runc run` of the same unpacked
//! tree, and the disk that N running containers of the image take.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use husk_image::oci::store::StoreLock;
use husk_image::oci::{disk, ImageRecord, ImageRef, Store};

use super::median;
use super::peers::timed;

// `husk bench image` arguments.
#[derive(Args)]
pub struct ImageBenchArgs {
    /// The image (a registry reference, or oci:/oci-archive:/docker-archive:).
    #[arg(long)]
    image: String,
    /// Runs per measurement (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Containers of the image running together for the disk figure (0: skip).
    #[arg(long, default_value_t = 20)]
    containers: usize,
    /// Plain HTTP / no certificate check for the registry.
    #[arg(long, default_value = "true", action = clap::ArgAction::Set)]
    tls_verify: bool,
    /// runc binary.
    #[arg(long, default_value = "runc")]
    runc: String,
    /// Seconds each guest may take to boot and answer.
    #[arg(long, default_value_t = 300)]
    boot_timeout: u64,
    /// Guest kernel; default: husk's.
    #[arg(long)]
    kernel: Option<PathBuf>,
}

/// What each `husk --root TMP` child uses: the kernel and agent of the
/// invoking husk's root (the temporary roots hold only images).
struct Guest {
    kernel: PathBuf,
    agent: PathBuf,
}

/// Runs the benchmark in a temporary directory, removed afterwards.
pub fn image_bench(a: ImageBenchArgs) -> Result<i32, String> {
    let tmp = std::env::temp_dir().join(format!("husk-bench-image-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let result = bench_in(&a, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `husk --root ROOT ARGS...` with the bench's boot timeout.
fn husk(root: &Path, a: &ImageBenchArgs) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(exe);
    c.env("HUSK_BOOT_TIMEOUT", a.boot_timeout.to_string())
        .arg("--root")
        .arg(root);
    Ok(c)
}

/// `husk --root ROOT run --kernel K ARGS...`, the agent from `g`.
fn husk_run(root: &Path, a: &ImageBenchArgs, g: &Guest) -> Result<Command, String> {
    let mut c = husk(root, a)?;
    c.env("HUSK_AGENT", &g.agent)
        .arg("run")
        .arg("--kernel")
        .arg(&g.kernel);
    Ok(c)
}

fn pull(root: &Path, a: &ImageBenchArgs) -> Result<f64, String> {
    let mut c = husk(root, a)?;
    c.args(["pull", "-q", &format!("--tls-verify={}", a.tls_verify)])
        .arg(&a.image);
    timed(c, "husk pull")
}

/// `root`'s store, locked, and the record of the pulled image `r`.
fn stored(
    root: &Path,
    r: &ImageRef,
    exclusive: bool,
) -> Result<(Store, StoreLock, ImageRecord), String> {
    let store = Store::open(root).map_err(|e| e.to_string())?;
    let lock = store.lock(exclusive).map_err(|e| e.to_string())?;
    let rec = store
        .find(&r.to_string())
        .map_err(|e| e.to_string())?
        .ok_or("the pulled image is not in the store")?;
    Ok((store, lock, rec))
}

/// Rebuilds the image's disk in `root`'s store; returns the seconds taken.
fn disk_build(root: &Path, r: &ImageRef) -> Result<f64, String> {
    let (store, _lock, rec) = stored(root, r, true)?;
    let path = store
        .disk_path(&rec.config_digest)
        .map_err(|e| e.to_string())?;
    std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t0 = Instant::now();
    disk::ensure(&store, &rec, true).map_err(|e| e.to_string())?;
    Ok(t0.elapsed().as_secs_f64())
}

/// The image's tree, unpacked from `root`'s store into `dest`.
fn unpack(root: &Path, r: &ImageRef, dest: &Path) -> Result<(), String> {
    let (store, _lock, rec) = stored(root, r, false)?;
    disk::unpack(&store, &rec, dest).map_err(|e| e.to_string())
}

/// Bytes the files under `dir` occupy on disk (allocated blocks).
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn bench_in(a: &ImageBenchArgs, tmp: &Path) -> Result<i32, String> {
    let r = ImageRef::parse(&a.image).map_err(|e| e.to_string())?;
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let g = Guest {
        kernel: super::kernel_or_error(&a.kernel)?,
        agent: husk_runtime::paths::agent_binary(None).map_err(|e| e.to_string())?,
    };
    // The warm store: pulled once, used by every warm run.
    let warm = tmp.join("warm");
    eprintln!("preparing: pulling {r} into a warm store");
    pull(&warm, a)?;
    let tree = tmp.join("rootfs");
    unpack(&warm, &r, &tree)?;
    let bundle = super::peers::oci_bundle(&tmp.join("bundle"), &tree, &["true"], &[])?;

    let (mut pulls, mut builds, mut runs, mut runcs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.runs {
        let n = format!("{}/{}", i + 1, a.runs);
        eprintln!("{n}: cold husk pull");
        let cold = tmp.join(format!("cold-{i}"));
        pulls.push(pull(&cold, a)?);
        builds.push(disk_build(&cold, &r)?);
        let _ = std::fs::remove_dir_all(&cold);
        eprintln!("{n}: husk run IMAGE true");
        let mut c = husk_run(&warm, a, &g)?;
        c.args(["--pull", "never"]).arg(&a.image).arg("true");
        runs.push(timed(c, "husk run")?);
        eprintln!("{n}: runc run");
        let mut c = Command::new(&a.runc);
        c.args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("husk-bench-{}-{i}", std::process::id()));
        runcs.push(timed(c, "runc run")?);
    }
    println!("image {r}, {} runs each (alternating)", a.runs);
    println!("{:<44} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    let row = |name: &str, v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "{name:<44} {:>10.3} {:>10.3} {:>10.3}",
            median(v.to_vec()),
            min,
            max
        );
    };
    row("cold husk pull, registry to disk (s)", &pulls);
    row("  of which the disk build alone (s)", &builds);
    row("warm husk run IMAGE true (s)", &runs);
    row("runc run of the unpacked tree, true (s)", &runcs);
    println!(
        "{:<44} {:>10.1}",
        "husk run / runc run (medians)",
        median(runs.clone()) / median(runcs.clone())
    );
    if a.containers == 0 {
        return Ok(0);
    }
    // Printed after the startup table, which stands on its own.
    let d = disk_per_container(&warm, a, &g)?;
    {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        println!();
        println!(
            "disk, {} containers of the image running together (each wrote 4 KiB)",
            a.containers
        );
        println!(
            "{:<44} {:>10.2}",
            "the image's disk, shared (MiB)",
            mib(d.image)
        );
        println!(
            "{:<44} {:>10.2}",
            "husk's root grew by, all containers (MiB)",
            mib(d.grown)
        );
        println!(
            "{:<44} {:>10.1}",
            "per container (KiB)",
            d.grown as f64 / 1024.0 / a.containers as f64
        );
        println!(
            "{:<44} {:>10.1}",
            "wall to start them one by one (s)", d.ready_s
        );
    }
    Ok(0)
}

struct Density {
    image: u64,
    grown: u64,
    ready_s: f64,
}

/// Starts `a.containers` containers of the image one after another, each writing a
/// file and waiting on stdin; measures husk's root while all run.
fn disk_per_container(warm: &Path, a: &ImageBenchArgs, g: &Guest) -> Result<Density, String> {
    let before = disk_use(warm);
    let image = disk_use(&warm.join("oci/disks"));
    eprintln!("starting {} containers, one after another", a.containers);
    let script = "dd if=/dev/zero of=/tmp/data bs=4k count=1 2>/dev/null; echo ready; read x";
    let t0 = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let mut failed = None;
    let result = (|| {
        // One after another, each once the previous one runs: booting many
        // guests at once on a small host can starve every boot.
        for i in 0..a.containers {
            let mut c = husk_run(warm, a, g)?;
            c.args(["-i", "--pull", "never", "--entrypoint", "sh"])
                .arg(&a.image)
                .args(["-c", script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().map_err(|e| format!("husk run: {e}"))?;
            let out = child.stdout.take();
            children.push(child);
            let deadline = Instant::now() + Duration::from_secs(a.boot_timeout);
            if let Some(out) = out {
                wait_ready(out, deadline).map_err(|e| {
                    failed = Some(i);
                    format!("container {}/{}: {e}", i + 1, a.containers)
                })?;
            }
            eprintln!("  {}/{} running", i + 1, a.containers);
        }
        let ready_s = t0.elapsed().as_secs_f64();
        let grown = disk_use(warm).saturating_sub(before);
        Ok(Density {
            image,
            grown,
            ready_s,
        })
    })();
    // Release them (or, on failure, kill them) and reap every one.
    for child in &mut children {
        if result.is_err() {
            let _ = child.kill();
        } else if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
    }
    for child in &mut children {
        let _ = child.wait();
    }
    result.map_err(|e| match failed.and_then(|i| children.get_mut(i)) {
        Some(child) => {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut err);
            }
            format!(
                "{e} (its last stderr line: {}); --boot-timeout waits longer",
                err.lines().last().unwrap_or("")
            )
        }
        None => e,
    })
}

/// Reads lines until "ready", bounded by `deadline` (a reader thread: a
/// pipe read cannot time out by itself).
fn wait_ready(out: std::process::ChildStdout, deadline: Instant) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        let ok = lines.any(|l| l.is_ok_and(|l| l == "ready"));
        let _ = tx.send(ok);
    });
    let left = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(left) {
        Ok(true) => Ok(()),
        Ok(false) => Err("ended before it was ready".into()),
        Err(_) => Err("not ready within the boot timeout".into()),
    }
}
