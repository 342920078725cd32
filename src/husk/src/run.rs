//! `husk run`: flags to husk_runtime::run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use husk_image::oci::disk;
use husk_image::oci::pull::{self, PullPolicy};
use husk_image::oci::ImageRef;
use husk_runtime::image::{self, Overrides};
use husk_runtime::run::{self, Root, RunOptions};
use husk_runtime::spec::{self, RunSpec};
use husk_runtime::RuntimeError;
use husk_vmm::seccomp::SeccompMode;

use crate::image::RegistryArgs;

/// docker's exit code for the runtime's own failures.
pub const RUN_FAILURE: i32 = 125;

// `husk run` arguments.
#[derive(Args)]
pub struct RunArgs {
    /// Use this directory as the container's root instead of an image (converted to a
    /// read-only ext4 image, cached); then every positional argument is the command.
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// With --rootfs: share DIR with the VM through virtio-fs instead of
    /// copying it into a disk image; the container's writes land in DIR.
    #[arg(long, requires = "rootfs")]
    rootfs_share: bool,
    /// Remove the container when it exits (its writable layer lives in the VM's memory and
    /// is always discarded with the VM; accepted for docker compatibility).
    #[arg(long)]
    rm: bool,
    /// Keep stdin open and relay it to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal (a pty in the guest).
    #[arg(short, long)]
    tty: bool,
    /// Environment variable K=V, or K to pass husk's own value (repeatable; wins over
    /// --env-file and the image's Env).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file (K=V lines; repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Working directory inside the container (default: the image's WorkingDir).
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// USER[:GROUP] to run as, names or numbers (names resolve through the image's
    /// /etc/passwd and /etc/group; default: the image's User).
    #[arg(short, long)]
    user: Option<String>,
    /// Override the image's Entrypoint ("" clears it; the image's Cmd is dropped too).
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Memory limit (e.g. 256m, 1g); the VM gets 128 MiB more.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit (fractions allowed); the VM gets ceil(N) vCPUs.
    #[arg(long)]
    cpus: Option<f64>,
    /// Bind a host directory into the container, shared live through
    /// virtio-fs: HOST_DIR:CONTAINER_PATH[:ro] (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    volumes: Vec<husk_runtime::shares::Volume>,
    /// Container hostname.
    #[arg(long, default_value = "husk")]
    hostname: String,
    /// Container name (unique among running containers).
    #[arg(long)]
    name: Option<String>,
    /// When to pull the image: missing, always or never.
    #[arg(long, default_value = "missing", value_name = "POLICY")]
    pull: PullPolicy,
    /// No pull progress output.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Guest kernel (default: the one tools/build-guest-kernel built).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest agent binary (default: $HUSK_AGENT or $HUSK_ROOT/agent/husk-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Seconds the guest may take to boot and answer [default: 30, or
    /// $HUSK_BOOT_TIMEOUT].
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Print the startup split (VMM, kernel, agent, create, exec, exit, teardown) on stderr.
    #[arg(long)]
    timing: bool,
    /// Do not filter the VMM threads' syscalls (for debugging; also
    /// HUSK_SECCOMP=off, or =log to allow and log what a filter refuses).
    #[arg(long)]
    no_seccomp: bool,
    /// seccomp=unconfined: no seccomp profile for the container (by
    /// default husk's, like Docker's: mounts, namespaces, BPF, keyring,
    /// kernel modules and the like fail with EPERM).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Boot the guest instead of restoring the warm template of this
    /// kernel, agent and VM shape (made by the first run that needs it;
    /// see `husk template`). Also HUSK_TEMPLATE=off.
    #[arg(long)]
    no_template: bool,
    /// runc's `run`: run the OCI bundle in DIR as container ID (the one
    /// positional argument), runc's flags below; `--root` is then runc's state root.
    #[arg(short = 'b', long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// With --bundle: return once the container started.
    #[arg(short = 'd', long, requires = "bundle")]
    pub detach: bool,
    /// With --bundle: where to write the VMM process's pid.
    #[arg(long, requires = "bundle", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// With --bundle: Unix socket to send the terminal's master to.
    #[arg(long, requires = "bundle", value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// With --bundle: do not delete the container after it exits.
    #[arg(long, requires = "bundle")]
    pub keep: bool,
    /// With --bundle: accepted for runc compatibility.
    #[arg(long, requires = "bundle")]
    pub no_subreaper: bool,
    /// With --bundle: accepted for runc compatibility.
    #[arg(long, requires = "bundle")]
    pub no_pivot: bool,
    /// With --bundle: accepted for runc compatibility.
    #[arg(long, requires = "bundle")]
    pub no_new_keyring: bool,
    /// With --bundle: accepted for runc compatibility (no fds beyond stdio reach a VM).
    #[arg(long, requires = "bundle", default_value_t = 0)]
    pub preserve_fds: u32,
    /// IMAGE [CMD [ARG...]] (image: NAME[:TAG|@DIGEST], oci:DIR[:TAG],
    /// oci-archive:FILE[:TAG], docker-archive:FILE); with --rootfs: CMD [ARG...].
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "IMAGE [CMD]"
    )]
    pub args: Vec<String>,
}

/// Runs a container; returns its exit code (125 for husk's own failures,
/// 128+N when signal N came before the container started, as if it had
/// killed husk).
pub fn cmd_run(a: RunArgs, process_start_ns: u64) -> i32 {
    match run_inner(a, process_start_ns) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: {e}");
            match e {
                RuntimeError::Interrupted(signal) => 128 + signal,
                _ => RUN_FAILURE,
            }
        }
    }
}

pub(crate) use husk_runtime::boot_timeout;

/// `-e K` takes husk's own value of K (dropped when unset), as docker.
fn env_flags(env: &[String]) -> Vec<String> {
    env.iter()
        .filter_map(|e| {
            if e.contains('=') {
                Some(e.clone())
            } else {
                std::env::var(e).ok().map(|v| format!("{e}={v}"))
            }
        })
        .collect()
}

/// Whether `--security-opt` asks for no seccomp profile (Docker's
/// `seccomp=unconfined`, or its older `seccomp:unconfined`).
fn seccomp_unconfined(opts: &[String]) -> Result<bool, RuntimeError> {
    let mut unconfined = false;
    for o in opts {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => unconfined = true,
            _ => {
                return Err(RuntimeError::Invalid(format!(
                    "unsupported --security-opt {o:?}: expected seccomp=unconfined"
                )))
            }
        }
    }
    Ok(unconfined)
}

/// The root disk and the run spec: from --rootfs, or from the image.
fn root_and_spec(a: &RunArgs, base: RunSpec) -> Result<(Root, RunSpec), RuntimeError> {
    let mut env = Vec::new();
    for f in &a.env_file {
        env.extend(image::read_env_file(f)?);
    }
    env.extend(env_flags(&a.env));
    let mut spec = base;
    if let Some(dir) = &a.rootfs {
        if a.entrypoint.is_some() {
            return Err(RuntimeError::Invalid(
                "--entrypoint needs an image (not --rootfs)".into(),
            ));
        }
        spec.args = a.args.clone();
        spec.env = env;
        spec.cwd = a.workdir.clone();
        spec.user = a.user.clone();
        let root = if a.rootfs_share {
            Root::Share(dir.clone())
        } else {
            Root::Dir(dir.clone())
        };
        return Ok((root, spec));
    }
    let (reference, command) = a
        .args
        .split_first()
        .ok_or_else(|| RuntimeError::Invalid("no image given".into()))?;
    let r = ImageRef::parse(reference)?;
    let store = crate::image::store()?;
    let opts = crate::image::pull_options(&r, &a.registry, a.quiet)?;
    let rec = pull::resolve(&store, &r, a.pull, &opts)?;
    let config = pull::config(&store, &rec)?;
    let overrides = Overrides {
        entrypoint: a.entrypoint.clone(),
        command: command.to_vec(),
        env,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
    };
    image::apply(&mut spec, config.config().as_ref(), &overrides, |u| {
        Ok(disk::resolve_image_user(&store, &rec, u)?)
    })?;
    Ok((Root::Disk(store.disk_path(&rec.config_digest)?), spec))
}

/// `husk run --timing`'s stages, in ms, which add up to the total: process
/// start → first KVM_RUN (image, agent disk, VM build) → agent started
/// (guest kernel boot) → agent ready → container created → exec → exit →
/// this line (output drained, VM torn down). The agent's stamps are put on
/// the host's clock through its stamped Hello (`clock_err_ms` is that
/// mapping's bound); an agent without one leaves them on the guest's boot
/// clock, which starts after the first KVM_RUN, and the line says
/// `guest_clock=unmapped`.
/// The keys of `timing_line`'s stages, in order; `husk bench startup`
/// reads them.
pub const TIMING_KEYS: [&str; 7] = [
    "first_kvm_run_ms",
    "guest_kernel_ms",
    "agent_ready_ms",
    "create_ms",
    "exec_ms",
    "run_ms",
    "teardown_ms",
];

fn timing_line(outcome: &run::RunOutcome, process_start_ns: u64) -> String {
    let t = &outcome.status.timestamps;
    let ms = |ns: u64| ns as f64 / 1e6;
    let now = husk_vmm::vstate::vcpu::monotonic_ns();
    let first = outcome.first_run_ns.unwrap_or(process_start_ns);
    let created = t.created_ns.unwrap_or(t.agent_ready_ns);
    let exec = t.exec_ns.unwrap_or(created);
    let exited = t.exited_ns.unwrap_or(exec);
    let mut stages = if outcome.restored {
        // Restored from a template: no kernel boot; "agent ready" is the
        // restore to the agent's first answer, and the container's stamps
        // go on the host's clock (the template's own start and ready
        // stamps are from before the snapshot).
        let answered = outcome.answered_ns.unwrap_or(first).max(first);
        let host = |g: u64| outcome.guest_clock.map_or(answered, |c| c.to_host(g));
        let (c, e, x) = (host(created).max(answered), host(exec), host(exited));
        vec![
            first.saturating_sub(process_start_ns),
            0,
            answered - first,
            c - answered,
            e.saturating_sub(c),
            x.saturating_sub(e.max(c)),
        ]
    } else {
        let kernel = match outcome.guest_clock {
            Some(c) => c.to_host(t.agent_started_ns).saturating_sub(first),
            None => t.agent_started_ns,
        };
        vec![
            first.saturating_sub(process_start_ns),
            kernel,
            t.agent_ready_ns.saturating_sub(t.agent_started_ns),
            created.saturating_sub(t.agent_ready_ns),
            exec.saturating_sub(created),
            exited.saturating_sub(exec),
        ]
    };
    let total = now.saturating_sub(process_start_ns);
    stages.push(total.saturating_sub(stages.iter().sum::<u64>()));
    let clock = match outcome.guest_clock {
        Some(c) => format!("clock_err_ms={:.1}", ms(c.error_ns)),
        None => "guest_clock=unmapped".into(),
    };
    let fields: Vec<String> = TIMING_KEYS
        .iter()
        .zip(stages)
        .map(|(k, ns)| format!("{k}={:.1}", ms(ns)))
        .collect();
    format!(
        "husk-timing: {} total_ms={:.1} {clock}{}",
        fields.join(" "),
        ms(total),
        if outcome.restored {
            " template=restored"
        } else {
            ""
        }
    )
}

/// `husk-timing-setup: step=ms ...`: the agent's steps creating the
/// container, each in ms since the one before (the guest's clock; they
/// add up to about `create_ms`, which also holds the request's transit).
/// Steps named with spaces get underscores.
pub fn setup_line(steps: &[husk_proto::SetupStep]) -> Option<String> {
    let start = steps.first()?.ns;
    let mut prev = start;
    let mut fields = Vec::with_capacity(steps.len());
    for s in &steps[1..] {
        let name: String = s
            .step
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        fields.push(format!(
            "{name}={:.1}",
            s.ns.saturating_sub(prev) as f64 / 1e6
        ));
        prev = prev.max(s.ns);
    }
    Some(format!(
        "husk-timing-setup: {} total_ms={:.1}",
        fields.join(" "),
        prev.saturating_sub(start) as f64 / 1e6
    ))
}

fn run_inner(a: RunArgs, process_start_ns: u64) -> Result<i32, RuntimeError> {
    // The writable layer is a tmpfs in the guest: it always goes with the VM.
    let _always_removed = a.rm;
    let memory = a.memory.as_deref().map(spec::parse_size).transpose()?;
    let base = RunSpec {
        memory,
        cpus: a.cpus,
        tty: a.tty,
        hostname: a.hostname.clone(),
        seccomp_unconfined: seccomp_unconfined(&a.security_opt)?,
        ..Default::default()
    };
    let (root, spec) = root_and_spec(&a, base)?;
    let opts = RunOptions {
        root,
        spec,
        name: a.name.clone(),
        interactive: a.interactive,
        kernel: a.kernel.clone(),
        agent: a.agent.clone(),
        boot_timeout: Duration::from_secs(boot_timeout(a.boot_timeout)?),
        volumes: a.volumes.clone(),
        seccomp: if a.no_seccomp {
            SeccompMode::Off
        } else {
            SeccompMode::On
        },
        template: !a.no_template && husk_runtime::template::enabled_by_env(),
    };
    let outcome = run::run(&opts)?;
    let st = &outcome.status;
    if st.oom_killed {
        eprintln!("husk: the container was killed: out of memory");
    }
    if a.timing {
        eprintln!("{}", timing_line(&outcome, process_start_ns));
        if let Some(line) = setup_line(&outcome.setup) {
            eprintln!("{line}");
        }
    }
    Ok(st.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::{ExitStatus, Timestamps};
    use husk_runtime::clock::GuestClock;

    fn field(line: &str, key: &str) -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {line}"))
    }

    #[test]
    fn timing_stages_are_on_the_host_clock_and_add_up() {
        const S: u64 = 1_000_000_000;
        let start = husk_vmm::vstate::vcpu::monotonic_ns() - 20 * S;
        // The guest's clock starts 3 s after the first KVM_RUN (1 s after
        // process start); the agent starts 2 s later on that clock.
        let outcome = run::RunOutcome {
            status: ExitStatus {
                exit_code: 0,
                signal: None,
                oom_killed: false,
                output_drained: true,
                timestamps: Timestamps {
                    agent_started_ns: 2 * S,
                    agent_ready_ns: 3 * S,
                    created_ns: Some(5 * S),
                    exec_ns: Some(6 * S),
                    exited_ns: Some(7 * S),
                },
            },
            first_run_ns: Some(start + S),
            guest_clock: GuestClock::from_exchange(start + 8 * S, 4 * S, start + 8 * S + 2_000_000),
            restored: false,
            answered_ns: None,
            setup: Vec::new(),
        };
        let line = timing_line(&outcome, start);
        assert_eq!(field(&line, "first_kvm_run_ms="), 1000.0, "{line}");
        assert_eq!(field(&line, "guest_kernel_ms="), 5001.0, "{line}");
        assert_eq!(field(&line, "agent_ready_ms="), 1000.0, "{line}");
        assert_eq!(field(&line, "create_ms="), 2000.0, "{line}");
        assert_eq!(field(&line, "run_ms="), 1000.0, "{line}");
        assert_eq!(field(&line, "clock_err_ms="), 1.0, "{line}");
        // Exit at guest 7 s = host start + 11.001 s; the line comes ≥ 20 s
        // after start, so teardown holds the rest and the stages add up.
        let teardown = field(&line, "teardown_ms=");
        assert!(teardown >= 8999.0, "{line}");
        let sum: f64 = TIMING_KEYS
            .iter()
            .map(|k| field(&line, &format!("{k}=")))
            .sum();
        assert!((sum - field(&line, "total_ms=")).abs() < 0.5, "{line}");

        // Restored from a template: no kernel stage, the agent's old
        // stamps are ignored, the restore → first answer is "agent ready".
        let restored = run::RunOutcome {
            restored: true,
            answered_ns: Some(start + S + S / 2),
            ..outcome.clone()
        };
        let line = timing_line(&restored, start);
        assert_eq!(field(&line, "guest_kernel_ms="), 0.0, "{line}");
        assert_eq!(field(&line, "agent_ready_ms="), 500.0, "{line}");
        // Created at guest 5 s = host start + 9.001 s.
        assert_eq!(field(&line, "create_ms="), 7501.0, "{line}");
        assert_eq!(field(&line, "exec_ms="), 1000.0, "{line}");
        let sum: f64 = TIMING_KEYS
            .iter()
            .map(|k| field(&line, &format!("{k}=")))
            .sum();
        assert!((sum - field(&line, "total_ms=")).abs() < 0.5, "{line}");
        assert!(line.ends_with("template=restored"), "{line}");

        let unmapped = run::RunOutcome {
            guest_clock: None,
            ..outcome
        };
        let line = timing_line(&unmapped, start);
        assert_eq!(field(&line, "guest_kernel_ms="), 2000.0, "{line}");
        assert!(line.ends_with("guest_clock=unmapped"), "{line}");
    }

    #[test]
    fn setup_steps_become_one_line_of_deltas() {
        let step = |step: &str, ns| husk_proto::SetupStep {
            step: step.into(),
            ns,
        };
        assert_eq!(setup_line(&[]), None);
        let line = setup_line(&[
            step("start", 1_000_000),
            step("cgroup", 3_500_000),
            step("namespaces, fork", 10_000_000),
        ])
        .unwrap();
        assert_eq!(
            line,
            "husk-timing-setup: cgroup=2.5 namespaces__fork=6.5 total_ms=9.0"
        );
    }
}
