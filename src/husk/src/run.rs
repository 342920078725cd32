//! `husk run`: flags to husk_runtime::run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use husk_runtime::run::{self, RunOptions};
use husk_runtime::spec::{self, RunSpec};

/// docker's exit code for the runtime's own failures.
pub const RUN_FAILURE: i32 = 125;

/// `husk run` arguments.
#[derive(Args)]
pub struct RunArgs {
    /// Root filesystem of the container (a directory; converted to a
    /// read-only ext4 image, cached).
    #[arg(long)]
    rootfs: PathBuf,
    /// Keep stdin open and relay it to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal (a pty in the guest).
    #[arg(short, long)]
    tty: bool,
    /// Environment variable K=V (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// UID[:GID] to run as.
    #[arg(short, long)]
    user: Option<String>,
    /// Memory limit (e.g. 256m, 1g); the VM gets 128 MiB more.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit (fractions allowed); the VM gets ceil(N) vCPUs.
    #[arg(long)]
    cpus: Option<f64>,
    /// Container hostname.
    #[arg(long, default_value = "husk")]
    hostname: String,
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest agent binary (default: $HUSK_AGENT or $HUSK_ROOT/agent/husk-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Seconds the guest may take to boot and answer [default: 30, or
    /// $HUSK_BOOT_TIMEOUT].
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Print the startup split (VMM, kernel, agent, exec, exit) on stderr.
    #[arg(long)]
    timing: bool,
    /// Command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs a container; returns its exit code (125 for husk's own failures).
pub fn cmd_run(a: RunArgs, process_start_ns: u64) -> i32 {
    match run_inner(a, process_start_ns) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: {e}");
            RUN_FAILURE
        }
    }
}

/// The flag, else $HUSK_BOOT_TIMEOUT, else 30 s (ample on VT-x hosts,
/// where a guest boots in well under a second).
fn boot_timeout(flag: Option<u64>) -> Result<u64, husk_runtime::RuntimeError> {
    match (flag, std::env::var("HUSK_BOOT_TIMEOUT")) {
        (Some(s), _) => Ok(s),
        (None, Ok(v)) => v.trim().parse().map_err(|_| {
            husk_runtime::RuntimeError::Invalid(format!(
                "invalid HUSK_BOOT_TIMEOUT {v:?}: expected seconds"
            ))
        }),
        (None, Err(_)) => Ok(30),
    }
}

fn run_inner(a: RunArgs, process_start_ns: u64) -> Result<i32, husk_runtime::RuntimeError> {
    let memory = a.memory.as_deref().map(spec::parse_size).transpose()?;
    let opts = RunOptions {
        rootfs: a.rootfs,
        spec: RunSpec {
            args: a.command,
            env: a.env,
            cwd: a.workdir,
            user: a.user,
            memory,
            cpus: a.cpus,
            tty: a.tty,
            hostname: a.hostname,
        },
        interactive: a.interactive,
        kernel: a.kernel,
        agent: a.agent,
        boot_timeout: Duration::from_secs(boot_timeout(a.boot_timeout)?),
    };
    let outcome = run::run(&opts)?;
    let st = &outcome.status;
    if st.oom_killed {
        eprintln!("husk: the container was killed: out of memory");
    }
    if a.timing {
        let t = &st.timestamps;
        let ms = |ns: u64| ns as f64 / 1e6;
        let now = husk_vmm::vstate::vcpu::monotonic_ns();
        // Guest times are CLOCK_BOOTTIME in the guest: ~0 at the first KVM_RUN.
        eprintln!(
            "husk-timing: host_setup_ms={:.1} guest_kernel_ms={:.1} agent_ready_ms={:.1} create_ms={:.1} exec_ms={:.1} run_ms={:.1} total_ms={:.1}",
            ms(outcome.vm_started_ns.saturating_sub(process_start_ns)),
            ms(t.agent_started_ns),
            ms(t.agent_ready_ns.saturating_sub(t.agent_started_ns)),
            ms(t.created_ns.unwrap_or(0).saturating_sub(t.agent_ready_ns)),
            ms(t.exec_ns.unwrap_or(0).saturating_sub(t.created_ns.unwrap_or(0))),
            ms(t.exited_ns.unwrap_or(0).saturating_sub(t.exec_ns.unwrap_or(0))),
            ms(now.saturating_sub(process_start_ns)),
        );
    }
    Ok(st.exit_code)
}
