//! husk: run OCI containers inside KVM micro-VMs. This file only wires the
//! command line to the libraries.

mod bench;
mod image;
mod run;
mod runc;
mod snapshot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use husk_vmm::config::{Console, DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};
use husk_vmm::exit::code;
use husk_vmm::{ConsoleInputSource, VmExit};

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Run OCI containers inside KVM micro-VMs",
    after_help = "Environment (flags win over these):
  HUSK_ROOT           husk's root directory: images, kernel, agent, state [default: /var/lib/husk]
  HUSK_LOG            log filter, overrides --log-level (e.g. debug, husk_image=trace)
  HUSK_AGENT          guest agent binary [default: $HUSK_ROOT/agent/husk-agent]
  HUSK_KERNEL         guest kernel (vmlinux) [default: $HUSK_ROOT/kernel/vmlinux]
  HUSK_BOOT_TIMEOUT   seconds a guest may take to boot and answer (husk run, create) [default: 30]
  HUSK_TEMPLATE       off: husk run and create boot the guest instead of restoring a warm template [default: on]
  REGISTRY_AUTH_FILE  registry credentials file [default: $HUSK_ROOT/auth.json]
  HOME                ~/.docker/config.json is read for credentials as a last resort"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); HUSK_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// husk's root directory (image store, kernel, agent, run state) [default: $HUSK_ROOT,
    /// else /var/lib/husk]. For runc's commands (create, start, state, kill, delete, list)
    /// it is runc's state root instead [default: /run/husk]; images, kernel and agent then
    /// come from $HUSK_ROOT.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(flatten)]
    runc: runc::RuncGlobals,
    #[command(subcommand)]
    cmd: Command,
}

// Deferred (here and in every subcommand enum): only the chosen
// subcommand's arguments are built. Building them all was most of the time
// from main to the first KVM_RUN (issue 11). The `Args` structs carry `//`
// comments, not doc comments: built late, theirs would replace the help
// line their variant gives the parent's listing (a test checks).
#[derive(Subcommand)]
#[command(defer = true)]
enum Command {
    /// Boot a plain micro-VM with a kernel and an optional initrd.
    Vm(VmArgs),
    /// Write an uncompressed newc initramfs with husk's guest skeleton.
    Initramfs(InitramfsArgs),
    /// Run a container from an image (or a --rootfs directory) inside a fresh micro-VM.
    Run(run::RunArgs),
    /// Pull an image into the store and build its disk.
    Pull(image::PullArgs),
    /// List the images in the store.
    Images(image::ImagesArgs),
    /// Remove images from the store.
    Rmi(image::RmiArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Store credentials for a registry.
    Login(image::LoginArgs),
    /// Remove stored credentials for a registry.
    Logout(image::LogoutArgs),
    /// Benchmarks: husk side by side with other VMMs.
    Bench(bench::BenchArgs),
    /// Snapshots of VMs started with `husk vm --api-sock` (restore: `husk vm --restore DIR`).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Pause, resume, query or stop a VM through its control socket.
    Ctl(snapshot::CtlArgs),
    /// Manage the warm templates `husk run` restores instead of booting.
    #[command(subcommand)]
    Template(snapshot::TemplateCommand),
    /// `husk run`'s VM process (started by `husk run`).
    #[command(name = husk_runtime::run_vm::SUBCOMMAND, hide = true)]
    RunVm {
        /// The run directory with the session.
        dir: PathBuf,
    },
    #[command(flatten)]
    Runc(runc::RuncCommand),
}

#[derive(Args)]
struct VmArgs {
    /// JSON config file (same fields as the flags; flags given override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Guest kernel (vmlinux ELF); default: the one tools/build-guest-kernel built.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (uncompressed cpio recommended).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest kernel command line (replaces the default).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    /// Number of vCPUs (1..=32).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest console: stdout, file:PATH (kept under 8 MiB: past 4 MiB it
    /// moves to PATH.1 and PATH starts again) or none.
    #[arg(long)]
    console: Option<Console>,
    /// virtio-blk disk: path=IMG[,ro][,id=NAME][,direct] (repeatable; /dev/vda first).
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<DiskConfig>,
    /// virtio-net NIC on a tap: tap=NAME[,mac=MAC] (repeatable; eth0 first).
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<NetConfig>,
    /// virtio-vsock device: cid=N,uds=PATH (host clients connect to PATH and
    /// write "CONNECT <port>\n"; guest connections to host port P reach PATH_P).
    #[arg(long, value_name = "SPEC")]
    vsock: Option<VsockConfig>,
    /// Share a host directory through virtio-fs: tag=TAG,dir=DIR[,ro]
    /// (repeatable; the guest runs `mount -t virtiofs TAG MOUNTPOINT`).
    #[arg(long = "fs", value_name = "SPEC")]
    fs: Vec<FsConfig>,
    /// Do not add guest command-line workarounds on kvm_pvm hosts.
    #[arg(long)]
    no_pvm_workarounds: bool,
    /// Do not filter the VMM threads' syscalls (for debugging; also
    /// HUSK_SECCOMP=off, or =log to allow and log what a filter refuses).
    #[arg(long)]
    no_seccomp: bool,
    /// Serve a control socket at PATH (JSON: pause, resume, status, snapshot,
    /// stop; see `husk ctl` and `husk snapshot create`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Jail the VMM once the VM is built: dir=DIR,uid=N,gid=N[,netns]
    /// [,pidns][,nofile=N][,fsize=BYTES][,cgroup=/sys/fs/cgroup/...]... It
    /// then sees only DIR (which must belong to uid N, mode 0700), runs as
    /// N:G without capabilities, in its own mount (and with netns, network;
    /// with pidns, PID) namespace.
    /// The control socket, the vsock socket and a console file must be in
    /// DIR (snapshots go through descriptors `husk snapshot create` opens).
    #[arg(long, value_name = "SPEC")]
    jail: Option<husk_vmm::jail::JailConfig>,
    /// Resume the VM saved in DIR by `husk snapshot create` instead of
    /// booting one. Only --console, --api-sock, --vsock (its socket path;
    /// the CID stays), --net and --fs (the saved NICs and shares, in order:
    /// another tap and MAC, another directory with the saved tag), --clock,
    /// --no-seccomp, --jail and --boot-timing apply.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "mem", "vcpus", "disks",
        "no_pvm_workarounds", "profile",
    ])]
    restore: Option<PathBuf>,
    /// With --restore: `step` moves the guest's clock on by the time since
    /// the snapshot; `continue` goes on from the snapshot's time (no catch-up
    /// work in the guest; its wall clock is then behind until set).
    #[arg(long, value_enum, default_value = "step", requires = "restore")]
    clock: RestoreClock,
    /// Print boot timing (CLOCK_MONOTONIC ns of process start and first KVM_RUN) on stderr.
    #[arg(long)]
    boot_timing: bool,
    /// Sample the guest's instruction pointer and write the samples to FILE
    /// when the VM stops (`husk bench profile` reads it).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Samples per second for --profile.
    #[arg(long, default_value_t = 1000)]
    profile_hz: u32,
}

/// `husk vm --clock`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RestoreClock {
    Step,
    Continue,
}

#[derive(Args)]
struct InitramfsArgs {
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
    /// GUEST_PATH=HOST_PATH: copy a host file into the archive (repeatable).
    #[arg(long = "add", value_name = "GUEST=HOST", required = true)]
    add: Vec<String>,
}

fn main() -> ExitCode {
    let start_ns = husk_vmm::vstate::vcpu::monotonic_ns();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::from(0);
            }
            // Like docker, `husk run` and the image commands keep 1..=124
            // for the container and use 125 for their own failures.
            let docker_like = std::env::args().skip(1).any(|a| {
                matches!(
                    a.as_str(),
                    "run" | "pull" | "images" | "rmi" | "image" | "login" | "logout"
                )
            });
            return ExitCode::from(if docker_like {
                run::RUN_FAILURE
            } else {
                code::USAGE
            } as u8);
        }
    };
    if let Command::Runc(c) = cli.cmd {
        let log_file = match &c {
            runc::RuncCommand::VmmServe { dir } => Some(dir.join("vmm.log")),
            runc::RuncCommand::ExecServe { dir, .. } => Some(dir.join("exec.log")),
            _ => None,
        };
        init_logging(&cli.log_level, log_file.as_deref());
        return ExitCode::from(runc::cmd(c, cli.root, &cli.runc, &cli.log_level) as u8);
    }
    init_logging(&cli.log_level, None);
    if let Command::RunVm { dir } = &cli.cmd {
        return ExitCode::from(husk_runtime::run_vm::serve(dir) as u8);
    }
    // runc's `run` (with --bundle): --root is the state root, as for the
    // other runc commands, so it must not become HUSK_ROOT.
    if let Command::Run(args) = cli.cmd {
        if args.bundle.is_some() {
            return ExitCode::from(
                runc::cmd_run_bundle(args, cli.root, &cli.runc, &cli.log_level) as u8,
            );
        }
        if let Some(root) = &cli.root {
            std::env::set_var("HUSK_ROOT", root);
        }
        // The VM's process (`husk run-vm`) logs as this one does.
        if std::env::var_os("HUSK_LOG").is_none() {
            std::env::set_var("HUSK_LOG", &cli.log_level);
        }
        return ExitCode::from(run::cmd_run(args, start_ns) as u8);
    }
    if let Some(root) = &cli.root {
        // SAFETY-free: no other thread exists yet; every part of husk reads
        // the root through HUSK_ROOT, so the flag wins by setting it.
        std::env::set_var("HUSK_ROOT", root);
    }
    let result = match cli.cmd {
        Command::Vm(args) => cmd_vm(args, start_ns),
        Command::Initramfs(args) => cmd_initramfs(args),
        Command::Bench(args) => bench::run(args),
        Command::Snapshot(c) => snapshot::cmd_snapshot(c),
        Command::Ctl(a) => snapshot::cmd_ctl(a),
        Command::Template(c) => snapshot::cmd_template(c),
        Command::Run(_) => unreachable!("handled above"),
        Command::Pull(a) => return ExitCode::from(image::cmd_pull(a) as u8),
        Command::Images(a) => return ExitCode::from(image::cmd_images(a) as u8),
        Command::Rmi(a) => return ExitCode::from(image::cmd_rmi(a) as u8),
        Command::Image(c) => return ExitCode::from(image::cmd_image(c) as u8),
        Command::Login(a) => return ExitCode::from(image::cmd_login(a) as u8),
        Command::Logout(a) => return ExitCode::from(image::cmd_logout(a) as u8),
        Command::Runc(_) | Command::RunVm { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(msg) => {
            eprintln!("husk: {msg}");
            ExitCode::from(code::HUSK_ERROR as u8)
        }
    }
}

/// Logs to stderr, or to `file` (the VMM process of a runtime container:
/// its stderr is the container's).
fn init_logging(level: &str, file: Option<&std::path::Path>) {
    let filter = std::env::var("HUSK_LOG").unwrap_or_else(|_| level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    };
    match file.and_then(open) {
        Some(f) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

fn vm_config(args: &VmArgs) -> Result<VmConfig, String> {
    let mut cfg = match &args.config {
        Some(p) => VmConfig::from_file(p).map_err(|e| e.to_string())?,
        None => VmConfig::default(),
    };
    if let Some(k) = &args.kernel {
        cfg.kernel = Some(k.clone());
    }
    if let Some(i) = &args.initrd {
        cfg.initrd = Some(i.clone());
    }
    if let Some(c) = &args.cmdline {
        cfg.cmdline = Some(c.clone());
    }
    if let Some(m) = args.mem {
        cfg.mem_mib = m;
    }
    if let Some(v) = args.vcpus {
        cfg.vcpus = v;
    }
    if let Some(c) = &args.console {
        cfg.console = c.clone();
    }
    if !args.disks.is_empty() {
        cfg.disks = args.disks.clone();
    }
    if !args.nets.is_empty() {
        cfg.net = args.nets.clone();
    }
    if let Some(v) = &args.vsock {
        cfg.vsock = Some(v.clone());
    }
    if !args.fs.is_empty() {
        cfg.fs = args.fs.clone();
    }
    if args.no_pvm_workarounds {
        cfg.pvm_workarounds = false;
    }
    if args.no_seccomp {
        cfg.seccomp = husk_vmm::seccomp::SeccompMode::Off;
    }
    if let Some(p) = &args.api_sock {
        cfg.api_sock = Some(p.clone());
    }
    if let Some(j) = &args.jail {
        cfg.jail = Some(j.clone());
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// The VM `husk vm` runs: booted from `cfg` (its config), or restored.
fn vm_build(args: &VmArgs, cfg: Option<VmConfig>) -> Result<(husk_vmm::Vm, Console), String> {
    let Some(dir) = &args.restore else {
        let cfg = cfg.ok_or("no VM config")?;
        let vm = husk_vmm::build(&cfg).map_err(|e| e.to_string())?;
        return Ok((vm, cfg.console));
    };
    let opts = husk_vmm::snapshot::RestoreOptions {
        console: args.console.clone().unwrap_or_default(),
        api_sock: args.api_sock.clone(),
        vsock_uds: args.vsock.as_ref().map(|v| v.uds_path.clone()),
        disks: Vec::new(),
        nics: args.nets.iter().cloned().enumerate().collect(),
        shares: args.fs.iter().cloned().enumerate().collect(),
        clock: match args.clock {
            RestoreClock::Step => husk_vmm::snapshot::ClockMode::Step,
            RestoreClock::Continue => husk_vmm::snapshot::ClockMode::Continue,
        },
        seccomp: if args.no_seccomp {
            husk_vmm::seccomp::SeccompMode::Off
        } else {
            husk_vmm::seccomp::SeccompMode::On
        },
        jail: args.jail.clone(),
    };
    let vm = husk_vmm::snapshot::build_restored(dir, &opts).map_err(|e| e.to_string())?;
    Ok((vm, opts.console))
}

fn cmd_vm(args: VmArgs, start_ns: u64) -> Result<i32, String> {
    let cfg = match args.restore {
        None => Some(vm_config(&args)?),
        Some(_) => None,
    };
    // First of all (single-threaded, nothing open): only the child returns.
    // The jail is --jail's, or a config file's.
    let jail = cfg.as_ref().map_or(args.jail.as_ref(), |c| c.jail.as_ref());
    if let Some(j) = jail {
        j.enter_pid_namespace().map_err(|e| e.to_string())?;
    }
    // Created now: the thread that writes it at the end is filtered (no
    // file creation) and may be jailed.
    let mut profile_out = match &args.profile {
        Some(path) => {
            Some(std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let (vm, console) = vm_build(&args, cfg)?;
    // The main thread, which only waits for the VM and tears it down, keeps
    // no capability either: run_confined drops them with its filter, once
    // the guest runs (it handles nothing of the guest's).
    tracing::info!("guest command line: {}", vm.cmdline());
    let input = match console {
        Console::Stdout => ConsoleInputSource::Fd(libc::STDIN_FILENO),
        _ => ConsoleInputSource::None,
    };
    let timing = args.boot_timing.then(|| vm.first_run_probe());
    let profiler = args.profile.as_ref().map(|_| vm.profiler());
    if let Some(p) = &profiler {
        p.enable(args.profile_hz);
    }
    let exit = vm.run_confined(input, true);
    if let (Some(p), Some(out), Some(path)) = (&profiler, &mut profile_out, &args.profile) {
        p.write_to(out)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(probe) = timing {
        if let Some(first) = probe.get() {
            eprintln!(
                "husk-timing: process_start_ns={start_ns} first_kvm_run_ns={first} start_to_first_run_us={}",
                first.saturating_sub(start_ns) / 1000
            );
        }
    }
    if !exit.is_clean() {
        eprintln!("husk: {exit}");
    }
    Ok(match exit {
        VmExit::VmmError(_) => code::HUSK_ERROR,
        e => e.exit_code(),
    })
}

fn cmd_initramfs(args: InitramfsArgs) -> Result<i32, String> {
    let mut entries = Vec::new();
    for spec in &args.add {
        let (guest, host) = spec
            .split_once('=')
            .filter(|(g, h)| g.starts_with('/') && !h.is_empty())
            .ok_or_else(|| format!("invalid --add {spec:?}: expected /GUEST/PATH=HOST_PATH"))?;
        entries.push(husk_image::initramfs::Entry {
            guest: guest.to_string(),
            host: PathBuf::from(host),
        });
    }
    husk_image::initramfs::write_file(&args.output, &entries).map_err(|e| e.to_string())?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_valid() {
        // Deferred subcommands are only built when chosen: this builds all.
        Cli::command().debug_assert();
    }

    /// Each subcommand's help line, as its parent lists it, before and
    /// after the deferred parts are built.
    fn abouts(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String)>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            out.push((name.clone(), about));
            abouts(sub, &name, out);
        }
    }

    #[test]
    fn building_a_subcommand_keeps_its_help_line() {
        let mut before = Vec::new();
        abouts(&Cli::command(), "husk", &mut before);
        let mut built = Cli::command();
        built.build();
        let mut after = Vec::new();
        abouts(&built, "husk", &mut after);
        let before: std::collections::BTreeMap<_, _> = before.into_iter().collect();
        for (name, about) in after {
            // Nested enums are deferred too: present only once built.
            if let Some(b) = before.get(&name) {
                assert_eq!(
                    b, &about,
                    "{name}: an Args struct's doc comment replaced the help line"
                );
            }
        }
        assert!(before.len() > 20, "{before:?}");
    }
}
