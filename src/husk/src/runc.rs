//! runc's command line: `husk create|start|state|kill|delete|list|spec|
//! features` with runc's flags, for containerd, Docker, Podman and any
//! other caller of runc. Errors go to stderr and, with `--log`, to the log
//! file as runc writes it (JSON lines with `--log-format json`, the last
//! error line being what containerd and Docker show).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use husk_runtime::runc::{create, events, exec, lifecycle, query, update, vmm, DEFAULT_STATE_ROOT};
use husk_runtime::RuntimeError;

// runc's global flags.
#[derive(Args, Clone, Debug)]
pub struct RuncGlobals {
    /// Log file for runtime commands (runc's --log).
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log format for --log: text or json.
    #[arg(long, global = true, default_value = "text", value_name = "FORMAT")]
    pub log_format: String,
    /// Debug logging (runc's --debug).
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility: the VMM process joins no systemd unit; cgroup
    /// limits apply inside the guest.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility; checkpoint/restore is not supported.
    #[arg(long, global = true, value_name = "PATH")]
    pub criu: Option<String>,
    /// Accepted for runc compatibility (true, false or auto); husk runs as root.
    #[arg(long, global = true, value_name = "VALUE")]
    pub rootless: Option<String>,
}

/// runc's commands.
#[derive(Subcommand)]
#[command(defer = true)]
pub enum RuncCommand {
    /// Create a container from an OCI bundle (runc create): its VM boots and the container
    /// is created, not started.
    Create(CreateArgs),
    /// Start a created container (runc start).
    Start(IdArg),
    /// Print a container's state JSON (runc state).
    State(IdArg),
    /// Send a signal to a container's process (runc kill).
    Kill(KillArgs),
    /// Delete a container and its VM (runc delete).
    Delete(DeleteArgs),
    /// List containers (runc list).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Write a default config.json (runc spec).
    Spec(SpecArgs),
    /// Print the runtime's features as JSON (runc features).
    Features,
    /// Run a process in a running container (runc exec).
    Exec(ExecArgs),
    /// Pause a container: its VM's vCPUs stop (runc pause).
    Pause(IdArg),
    /// Resume a paused container (runc resume).
    Resume(IdArg),
    /// The host processes of a container: its VMM process (standing for the container's
    /// init) and exec helpers (runc ps). `husk exec ID ps` shows the guest's own.
    Ps(PsArgs),
    /// The container's resource usage from its cgroup in the guest, as JSON lines (runc
    /// events): once with --stats, else every --interval, until it stops.
    Events(EventsArgs),
    /// Change a running container's limits (runc update): memory, CPU and pids apply to
    /// its cgroup in the guest; the VM keeps the size it was created with.
    Update(UpdateArgs),
    /// The helper of a detached exec (started by exec --detach).
    #[command(hide = true)]
    ExecServe {
        /// The container's state directory.
        dir: PathBuf,
        /// The process JSON.
        file: PathBuf,
    },
    /// The VMM process of a created container (started by create).
    #[command(hide = true)]
    VmmServe {
        /// The container's state directory.
        dir: PathBuf,
    },
}

// `create` flags.
#[derive(Args)]
pub struct CreateArgs {
    /// Bundle directory.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Unix socket to receive the terminal's master (process.terminal).
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Write the pid of the container's host process (the VMM; its exit status is the
    /// container's) to this file.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest agent sets up the root).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    no_new_keyring: bool,
    /// Accepted for runc compatibility: fds cannot cross into a VM.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Guest kernel; default: husk's.
    #[arg(long, hide = true)]
    kernel: Option<PathBuf>,
    /// Container id.
    id: String,
}

// `exec` flags.
#[derive(Args)]
pub struct ExecArgs {
    /// An OCI process JSON file instead of inline arguments.
    #[arg(short, long, value_name = "FILE")]
    process: Option<PathBuf>,
    /// Return once the process runs; a helper keeps its stdio.
    #[arg(short, long)]
    detach: bool,
    /// Write the helper's pid (its exit status is the process's) to this file.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Unix socket to receive the terminal's master.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable K=V (repeatable).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// UID[:GID].
    #[arg(short, long)]
    user: Option<String>,
    /// Accepted for runc compatibility: fds cannot cross into a VM.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
    /// Command and arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

// `ps` flags.
#[derive(Args)]
pub struct PsArgs {
    /// table or json (json: the pids).
    #[arg(short, long, default_value = "table")]
    format: String,
    /// Container id.
    id: String,
    /// ps(1) options for the table [default: -ef].
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    ps_args: Vec<String>,
}

// A container id.
#[derive(Args)]
pub struct IdArg {
    /// Container id.
    id: String,
}

// `kill` flags.
#[derive(Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(short, long)]
    all: bool,
    /// Container id.
    id: String,
    /// Signal, by number or name (with or without SIG).
    #[arg(default_value = "SIGTERM")]
    signal: String,
}

// `events` flags.
#[derive(Args)]
pub struct EventsArgs {
    /// Print the stats once and exit.
    #[arg(long)]
    stats: bool,
    /// How often to print stats (5s, 500ms, 1m).
    #[arg(long, default_value = "5s")]
    interval: String,
    /// Container id.
    id: String,
}

// `update` flags (runc's; they override --resources).
#[derive(Args)]
pub struct UpdateArgs {
    /// linux.resources JSON: a file, or - for stdin.
    #[arg(short, long, value_name = "FILE")]
    resources: Option<String>,
    /// Memory limit in bytes (k, m, g suffixes; -1: none).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    memory: Option<String>,
    /// Memory plus swap limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    memory_swap: Option<String>,
    /// Memory soft limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    memory_reservation: Option<String>,
    /// Accepted for runc compatibility; kernel memory limits are not applied.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    kernel_memory: Option<String>,
    /// Accepted for runc compatibility; kernel TCP memory limits are not applied.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    kernel_memory_tcp: Option<String>,
    /// CPU shares (relative weight).
    #[arg(long)]
    cpu_share: Option<u64>,
    /// CPU CFS quota in microseconds per period (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPUs the container may use (0-3, 0,1).
    #[arg(long)]
    cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long)]
    cpuset_mems: Option<String>,
    /// Most processes (-1 or 0: none).
    #[arg(long, allow_hyphen_values = true)]
    pids_limit: Option<i64>,
    /// Block IO weight: accepted for runc compatibility, not applied (the VM's disk is
    /// its own).
    #[arg(long)]
    blkio_weight: Option<u16>,
    /// Container id.
    id: String,
}

// `delete` flags.
#[derive(Args)]
pub struct DeleteArgs {
    /// Delete a running container too (its VM is killed).
    #[arg(short, long)]
    force: bool,
    /// Container id.
    id: String,
}

// `list` flags.
#[derive(Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(short, long, default_value = "table")]
    format: String,
    /// Ids only.
    #[arg(short, long)]
    quiet: bool,
}

// `spec` flags.
#[derive(Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
}

/// Writes an error line to `--log` as runc does.
fn log_error(g: &RuncGlobals, msg: &str) {
    let Some(path) = &g.log else { return };
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let line = if g.log_format == "json" {
        serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
    } else {
        format!("time=\"{time}\" level=error msg={msg:?}")
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Runs a runc command with state root `root`; returns the exit code.
pub fn cmd(c: RuncCommand, root: Option<PathBuf>, g: &RuncGlobals, log_level: &str) -> i32 {
    let root = root.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT));
    match &c {
        RuncCommand::VmmServe { dir } => return vmm::serve(dir),
        RuncCommand::ExecServe { dir, file } => return exec::serve(dir, file),
        _ => {}
    }
    match dispatch(c, &root, g, log_level) {
        Ok(code) => code,
        Err(e) => {
            let msg = e.to_string();
            eprintln!("husk: {msg}");
            log_error(g, &msg);
            1
        }
    }
}

/// runc's `run` (`husk run --bundle DIR ID`); returns the exit code.
pub fn cmd_run_bundle(
    a: crate::run::RunArgs,
    root: Option<PathBuf>,
    g: &RuncGlobals,
    log_level: &str,
) -> i32 {
    let root = root.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT));
    let level = if g.debug { "debug" } else { log_level };
    let result = (|| {
        let [id] = a.args.as_slice() else {
            return Err(RuntimeError::Invalid(
                "run --bundle takes one argument, the container id".into(),
            ));
        };
        // SAFETY: isatty(3) of fd 0.
        let stdio_terminal = !a.detach && unsafe { libc::isatty(0) } == 1;
        let o = create::CreateOptions {
            id: id.clone(),
            bundle: a.bundle.clone().unwrap_or_default(),
            pid_file: a.pid_file.clone(),
            console_socket: a.console_socket.clone(),
            stdio_terminal,
            kernel: a.kernel.clone(),
            agent: None,
            boot_timeout: hook_timeout()?,
            vmm_args: vec!["--log-level".to_owned(), level.to_owned()],
        };
        husk_runtime::runc::run::run(&root, &o, a.detach, a.keep)
    })();
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = e.to_string();
            eprintln!("husk: {msg}");
            log_error(g, &msg);
            1
        }
    }
}

fn dispatch(
    c: RuncCommand,
    root: &Path,
    g: &RuncGlobals,
    log_level: &str,
) -> Result<i32, RuntimeError> {
    let level = if g.debug { "debug" } else { log_level };
    let helper_args = vec!["--log-level".to_owned(), level.to_owned()];
    match c {
        RuncCommand::Exec(a) => exec::exec(
            root,
            &exec::ExecOptions {
                id: a.id,
                process: match a.process {
                    Some(f) => exec::ProcessSource::File(f),
                    None => exec::ProcessSource::Inline {
                        args: a.args,
                        cwd: a.cwd,
                        env: a.env,
                        user: a.user,
                        tty: a.tty,
                    },
                },
                detach: a.detach,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
                helper_args,
            },
        ),
        RuncCommand::Create(a) => create::create(
            root,
            &create::CreateOptions {
                id: a.id,
                bundle: a.bundle,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
                stdio_terminal: false,
                kernel: a.kernel,
                agent: None,
                boot_timeout: hook_timeout()?,
                vmm_args: helper_args,
            },
        )
        .map(|()| 0),
        RuncCommand::Start(a) => lifecycle::start(root, &a.id, hook_timeout()?).map(|()| 0),
        RuncCommand::Pause(a) => lifecycle::pause(root, &a.id).map(|()| 0),
        RuncCommand::Resume(a) => lifecycle::resume(root, &a.id).map(|()| 0),
        RuncCommand::Ps(a) => ps(root, &a).map(|()| 0),
        RuncCommand::State(a) => {
            println!("{}", query::state(root, &a.id)?);
            Ok(0)
        }
        RuncCommand::Events(a) => events::events(
            root,
            &a.id,
            a.stats,
            events::parse_interval(&a.interval)?,
            &mut std::io::stdout(),
        )
        .map(|()| 0),
        RuncCommand::Update(a) => update::update(
            root,
            &a.id,
            &update::UpdateFlags {
                resources: a.resources,
                memory: a.memory,
                memory_swap: a.memory_swap,
                memory_reservation: a.memory_reservation,
                cpu_share: a.cpu_share,
                cpu_quota: a.cpu_quota,
                cpu_period: a.cpu_period,
                cpuset_cpus: a.cpuset_cpus,
                cpuset_mems: a.cpuset_mems,
                pids_limit: a.pids_limit,
            },
        )
        .map(|()| 0),
        RuncCommand::Kill(a) => lifecycle::kill(root, &a.id, &a.signal, a.all).map(|()| 0),
        RuncCommand::Delete(a) => {
            lifecycle::delete(root, &a.id, a.force, hook_timeout()?).map(|()| 0)
        }
        RuncCommand::List(a) => {
            print!("{}", query::list(root, &a.format, a.quiet)?);
            Ok(0)
        }
        RuncCommand::Spec(a) => write_spec(&a.bundle).map(|()| 0),
        RuncCommand::Features => {
            println!("{}", features());
            Ok(0)
        }
        RuncCommand::VmmServe { .. } | RuncCommand::ExecServe { .. } => Ok(0),
    }
}

fn ps(root: &Path, a: &PsArgs) -> Result<(), RuntimeError> {
    let pids = lifecycle::host_pids(root, &a.id)?;
    match a.format.as_str() {
        "json" => {
            println!("{}", serde_json::to_string(&pids).unwrap_or_default());
            Ok(())
        }
        "table" => {
            let args = if a.ps_args.is_empty() {
                vec!["-ef".to_owned()]
            } else {
                a.ps_args.clone()
            };
            let o = std::process::Command::new("ps")
                .args(&args)
                .output()
                .map_err(|e| RuntimeError::Io("ps".into(), e))?;
            if !o.status.success() {
                return Err(RuntimeError::Invalid(format!(
                    "ps {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
            let text = String::from_utf8_lossy(&o.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let col = header
                .split_whitespace()
                .position(|h| h == "PID")
                .ok_or_else(|| RuntimeError::Invalid("ps printed no PID column".into()))?;
            println!("{header}");
            for l in lines {
                let pid = l.split_whitespace().nth(col).and_then(|p| p.parse().ok());
                if pid.is_some_and(|p: i32| pids.contains(&p)) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        other => Err(RuntimeError::Invalid(format!(
            "invalid format option {other:?}: table or json"
        ))),
    }
}

fn write_spec(bundle: &Path) -> Result<(), RuntimeError> {
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(RuntimeError::Invalid(
            "File config.json exists. Remove it first".into(),
        ));
    }
    let mut spec = oci_spec::runtime::Spec::default();
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(true));
        p.set_args(Some(vec!["sh".into()]));
    }
    let text =
        serde_json::to_string_pretty(&spec).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| RuntimeError::Io(path.display().to_string(), e))
}

fn features() -> String {
    let j = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": query::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
                  "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "relatime", "strictatime",
                          "rprivate", "private", "rslave", "slave", "rshared", "shared"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.husk.sandbox": "micro-VM",
            "io.github.husk.mounts": "bind mounts of host files are copied into the VM; \
                                      host directories are not supported yet",
            "io.github.husk.hooks": "all run on the host, in the runtime's namespaces"
        }
    });
    serde_json::to_string_pretty(&j).unwrap_or_default()
}

/// The boot timeout ($HUSK_BOOT_TIMEOUT, else the default), which also
/// bounds hooks that give no timeout of their own.
fn hook_timeout() -> Result<Duration, RuntimeError> {
    Ok(Duration::from_secs(crate::run::boot_timeout(None)?))
}
