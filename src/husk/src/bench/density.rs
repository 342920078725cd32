//! `husk bench density`: N idle containers (`sleep`), started one after
//! another with each runtime; after each one is ready, the host memory
//! that runtime's processes hold (sum of PSS: pages shared between VMs,
//! such as the kernel mapped from the page cache, count once in all); the
//! wall time until all N are ready; the disk each container's state takes.
//! Kernel memory that no process's PSS shows (page tables, KVM's included,
//! and kernel stacks) is read system-wide from /proc/meminfo before and
//! after, and reported apart, per container.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::peers::{self, ConsoleVm, Skipped};
use super::stats::{print_table, ratio, Summary};
use super::Common;

/// How one runtime starts an idle container.
enum Kind {
    /// husk's runc command line; `image`: the root as the shared read-only
    /// ext4 image (annotation io.husk.rootfs=image), else virtio-fs.
    Husk {
        image: bool,
        /// Restored from the warm template (else booted: HUSK_TEMPLATE=off).
        template: bool,
    },
    Oci {
        bin: PathBuf,
    },
    /// QEMU microvm booting the same kernel into an idle busybox init.
    Qemu {
        bin: PathBuf,
        initrd: PathBuf,
    },
}

/// One runtime's density run.
#[derive(Debug, Clone)]
pub struct Curve {
    pub name: String,
    pub what: String,
    /// (containers running, sum of PSS MiB).
    pub points: Vec<(usize, f64)>,
    /// Seconds each container took to be ready.
    pub start_s: Vec<f64>,
    /// Seconds from the first start to the last ready.
    pub all_ready_s: f64,
    /// Disk of the runtime's state per container, KiB.
    pub disk_kib_per_container: f64,
    /// Per VM with all N running (mean): the VMM process's RSS and PSS
    /// minus its guest RAM's, MiB. None for containers without a VMM.
    pub vmm_overhead_mib: Option<(f64, f64)>,
    /// Disk all containers share on top of the root tree, KiB (husk's
    /// read-only root image).
    pub shared_disk_kib: f64,
    /// Growth of the kernel's page tables and stacks (system-wide) per
    /// running container, MiB.
    pub kernel_mib_per_container: f64,
}

impl Curve {
    /// MiB of PSS per container with all N running.
    fn per_container(&self) -> f64 {
        match self.points.last() {
            Some(&(n, pss)) if n > 0 => pss / n as f64,
            _ => f64::NAN,
        }
    }

    fn json(&self) -> serde_json::Value {
        let disk = if self.disk_kib_per_container.is_nan() {
            serde_json::Value::Null
        } else {
            json!(self.disk_kib_per_container)
        };
        json!({
            "name": self.name, "what": self.what,
            "points": self.points.iter().map(|(n, p)| json!({"containers": n, "pss_mib": p})).collect::<Vec<_>>(),
            "start_s": self.start_s, "start_summary_s": Summary::of(&self.start_s).json(),
            "all_ready_s": self.all_ready_s,
            "pss_mib_per_container": self.per_container(),
            "disk_kib_per_container": disk,
            "shared_disk_kib": (!self.shared_disk_kib.is_nan()).then_some(self.shared_disk_kib),
            "vmm_overhead_rss_mib": self.vmm_overhead_mib.map(|o| o.0),
            "vmm_overhead_pss_mib": self.vmm_overhead_mib.map(|o| o.1),
            "kernel_mib_per_container": self.kernel_mib_per_container,
        })
    }
}

pub struct Density {
    pub count: usize,
    pub curves: Vec<Curve>,
    pub skipped: Vec<Skipped>,
}

const IDLE_INIT: &str = r#"#!/bin/busybox sh
echo HUSK-BENCH-IDLE
exec /bin/busybox sleep 1000000000
"#;

/// Starts `count` idle containers with each runtime in turn.
pub fn measure(c: &Common, count: usize, tmp: &Path) -> Result<Density, String> {
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    // Runtimes detach their containers (husk's VMM, runc's init): as their
    // subreaper this process sees them in its tree and reaps them.
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        ));
    }
    let kernel = super::kernel_or_error(&c.kernel)?;
    let rootfs = peers::busybox_tree(tmp, &c.busybox)?;
    let sleep = ["sleep", "1000000000"];
    let mut kinds = vec![
        (
            Kind::Husk {
                image: true,
                template: false,
            },
            "husk",
            "husk create/start, booted cold; root: one shared read-only ext4 image (io.husk.rootfs=image)",
        ),
        (
            Kind::Husk {
                image: true,
                template: true,
            },
            "husk-template",
            "husk create/start, restored from the warm template (memory shared copy-on-write); root: the same image",
        ),
        (
            Kind::Husk {
                image: false,
                template: false,
            },
            "husk-share",
            "husk create/start, booted cold; root: virtio-fs (one virtiofsd per container, husk's default)",
        ),
        (
            Kind::Husk {
                image: false,
                template: true,
            },
            "husk-share-template",
            "husk create/start, restored from the warm template with a share slot (guest memory a private copy in a memfd, which virtiofsd maps); root: virtio-fs",
        ),
    ];
    let mut skipped = Vec::new();
    for (name, bin) in [("runc", &c.runc), ("crun", &c.crun)] {
        match peers::which(bin) {
            Some(bin) => kinds.push((Kind::Oci { bin }, name, "create/start of the same bundle")),
            None => skipped.push(Skipped::new(name, format!("{bin} is not installed"))),
        }
    }
    match peers::which(&c.qemu) {
        Some(bin) => {
            let dir = tmp.join("qemu-initrd");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let initrd = super::write_busybox_initrd(&dir, IDLE_INIT, &c.busybox)?;
            kinds.push((
                Kind::Qemu { bin, initrd },
                "qemu",
                "qemu-system-x86_64 -M microvm, same kernel and memory, idle busybox init (no agent: no vhost-vsock here)",
            ));
        }
        None => skipped.push(Skipped::new("qemu", format!("{} is not installed", c.qemu))),
    }
    let mut curves = Vec::new();
    for (kind, name, what) in kinds {
        eprintln!("density: {count} x {name}");
        let dir = tmp.join(format!("density-{name}"));
        let annotations: &[(&str, &str)] = match kind {
            Kind::Husk { image: true, .. } => &[("io.husk.rootfs", "image")],
            _ => &[],
        };
        let bundle = peers::oci_bundle(&dir.join("bundle"), &rootfs, &sleep, annotations)?;
        let mut run = Run {
            kind: &kind,
            state: dir.join("state"),
            kernel: &kernel,
            common: c,
            ids: Vec::new(),
            vms: Vec::new(),
        };
        let result = run.fill(name, what, &bundle, count);
        run.stop();
        curves.push(result?);
    }
    Ok(Density {
        count,
        curves,
        skipped,
    })
}

/// The containers of one runtime, stopped on every path.
struct Run<'a> {
    kind: &'a Kind,
    state: PathBuf,
    kernel: &'a Path,
    common: &'a Common,
    ids: Vec<String>,
    vms: Vec<ConsoleVm>,
}

impl Run<'_> {
    /// The runtime's command with its private state root.
    fn runtime(&self) -> Command {
        match self.kind {
            Kind::Husk { template, .. } => {
                let exe = std::env::current_exe().unwrap_or_else(|_| "husk".into());
                let mut c = Command::new(exe);
                c.env("HUSK_BOOT_TIMEOUT", self.common.timeout.to_string());
                c.env("HUSK_TEMPLATE", if *template { "on" } else { "off" });
                if let Some(a) = &self.common.agent {
                    c.env("HUSK_AGENT", a);
                }
                c.arg("--root").arg(&self.state);
                c
            }
            Kind::Oci { bin } => {
                let mut c = peers::oci_runtime(bin);
                c.arg("--root").arg(&self.state);
                c
            }
            Kind::Qemu { bin, .. } => Command::new(bin),
        }
    }

    fn start_one(&mut self, bundle: &Path, i: usize) -> Result<(), String> {
        let timeout = Duration::from_secs(self.common.timeout);
        if let Kind::Qemu { initrd, .. } = self.kind {
            let mut q = peers::qemu_sandbox(self.runtime(), self.kernel, None);
            q.arg("-initrd").arg(initrd);
            self.vms
                .push(ConsoleVm::start(q, "HUSK-BENCH-IDLE", timeout)?);
            return Ok(());
        }
        let id = format!("husk-density-{}-{i}", std::process::id());
        let mut create = self.runtime();
        create.arg("create");
        if let Kind::Husk { .. } = self.kind {
            create.arg("--kernel").arg(self.kernel);
        }
        create.arg("--bundle").arg(bundle).arg(&id);
        self.ids.push(id.clone());
        peers::timed(create, "create")?;
        let mut start = self.runtime();
        start.args(["start", &id]);
        peers::timed(start, "start")?;
        Ok(())
    }

    fn fill(
        &mut self,
        name: &str,
        what: &str,
        bundle: &Path,
        count: usize,
    ) -> Result<Curve, String> {
        let me = std::process::id() as i32;
        let base_pss: u64 = peers::descendants(me).into_iter().map(peers::pss_kib).sum();
        let base_kernel = peers::kernel_kib();
        let mut points = Vec::new();
        let mut start_s = Vec::new();
        let first = Instant::now();
        for i in 0..count {
            peers::check_interrupted()?;
            let t0 = Instant::now();
            self.start_one(bundle, i)?;
            start_s.push(t0.elapsed().as_secs_f64());
            let pss: u64 = peers::descendants(me).into_iter().map(peers::pss_kib).sum();
            points.push((i + 1, pss.saturating_sub(base_pss) as f64 / 1024.0));
        }
        let all_ready_s = first.elapsed().as_secs_f64();
        let kernel_mib_per_container =
            peers::kernel_kib().saturating_sub(base_kernel) as f64 / 1024.0 / count as f64;
        let mem_mib = husk_runtime::run::vm_mem_mib(None);
        let overheads: Vec<(f64, f64)> = peers::descendants(me)
            .into_iter()
            .filter_map(|pid| {
                let ram = peers::guest_ram(pid as u32, mem_mib)?;
                let rss = peers::rss_kib(pid).saturating_sub(ram.rss_kib);
                let pss = peers::pss_kib(pid).saturating_sub(ram.pss_kib);
                Some((rss as f64 / 1024.0, pss as f64 / 1024.0))
            })
            .collect();
        let n = overheads.len() as f64;
        let vmm_overhead_mib = (!overheads.is_empty()).then(|| {
            (
                overheads.iter().map(|o| o.0).sum::<f64>() / n,
                overheads.iter().map(|o| o.1).sum::<f64>() / n,
            )
        });
        let disk = match self.kind {
            Kind::Qemu { .. } => f64::NAN,
            _ => peers::disk_usage(&self.state) as f64 / 1024.0 / count as f64,
        };
        Ok(Curve {
            name: name.into(),
            what: what.into(),
            points,
            start_s,
            all_ready_s,
            disk_kib_per_container: disk,
            vmm_overhead_mib,
            shared_disk_kib: self.shared_disk_kib(bundle)?,
            kernel_mib_per_container,
        })
    }

    /// husk's image of the bundle's root (built by the first create).
    fn shared_disk_kib(&self, bundle: &Path) -> Result<f64, String> {
        match self.kind {
            Kind::Husk { image: true, .. } => {}
            Kind::Qemu { .. } => return Ok(f64::NAN),
            _ => return Ok(0.0),
        }
        let image = husk_image::ext4::image_for_dir(
            &bundle_rootfs(bundle)?,
            &husk_runtime::paths::image_cache(),
        )
        .map_err(|e| e.to_string())?;
        Ok(peers::disk_usage(&image) as f64 / 1024.0)
    }

    /// Kills and deletes every container, then reaps what was detached.
    fn stop(&mut self) {
        for vm in self.vms.drain(..) {
            vm.kill();
        }
        for id in std::mem::take(&mut self.ids) {
            let mut kill = self.runtime();
            kill.args(["kill", &id, "KILL"]);
            let _ = peers::timed(kill, "kill");
            let mut delete = self.runtime();
            delete.args(["delete", "--force", &id]);
            let _ = peers::timed(delete, "delete");
        }
        reap_detached(Duration::from_secs(self.common.timeout));
    }
}

/// The root path of an OCI bundle.
fn bundle_rootfs(bundle: &Path) -> Result<PathBuf, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    cfg["root"]["path"]
        .as_str()
        .map(|r| bundle.join(r))
        .ok_or_else(|| format!("{}: no root.path", path.display()))
}

/// Waits for every process this subreaper inherited, bounded.
fn reap_detached(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn print(d: &Density) {
    println!(
        "density: {} idle containers per runtime, started one after another; host: {}",
        d.count,
        peers::cpu_model()
    );
    let mut rows = vec![vec![
        "runtime".to_string(),
        "PSS/container (MiB)".into(),
        "start each (s)".into(),
        "all ready (s)".into(),
        "state disk/container (KiB)".into(),
        "VMM RSS/PSS - guest RAM (MiB)".into(),
        "shared image (MiB)".into(),
        "kernel PT+stacks/container (MiB)".into(),
    ]];
    for c in &d.curves {
        let disk = match c.disk_kib_per_container {
            d if d.is_nan() => "-".to_string(),
            d => format!("{d:.1}"),
        };
        rows.push(vec![
            c.name.clone(),
            format!("{:.1}", c.per_container()),
            Summary::of(&c.start_s).cell(3),
            format!("{:.3}", c.all_ready_s),
            disk,
            c.vmm_overhead_mib
                .map_or("-".into(), |(r, p)| format!("{r:.1} / {p:.1}")),
            match c.shared_disk_kib {
                d if d.is_nan() => "-".into(),
                d => format!("{:.1}", d / 1024.0),
            },
            format!("{:.2}", c.kernel_mib_per_container),
        ]);
    }
    print_table(&rows);
    if let Some(h) = d.curves.iter().find(|c| c.name == "husk") {
        let hp = h.per_container();
        for p in d.curves.iter().filter(|c| c.name != "husk") {
            println!(
                "husk/{}: PSS per container {}",
                p.name,
                ratio(hp, p.per_container())
            );
        }
    }
    for c in &d.curves {
        println!("{}: {}", c.name, c.what);
    }
    println!("kernel PT+stacks: growth of /proc/meminfo PageTables + SecPageTables + KernelStack while the containers started, system-wide (anything else running counts too), per container; not in PSS.");
}

pub fn json(d: &Density) -> serde_json::Value {
    json!({
        "benchmark": "density",
        "count": d.count,
        "host_cpu": peers::cpu_model(),
        "kvm_pvm": husk_vmm::vstate::kvm::is_pvm_host(),
        "curves": d.curves.iter().map(Curve::json).collect::<Vec<_>>(),
        "skipped": Skipped::json(&d.skipped),
    })
}
