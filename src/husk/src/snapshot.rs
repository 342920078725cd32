//! `husk snapshot create` and `husk ctl`: clients of a VM's control socket
//! (`husk vm --api-sock PATH`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use husk_vmm::api::{self, Request, Response};
use husk_vmm::snapshot;

/// Time a snapshot may take to write (guest RAM goes to disk).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Time any other request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
#[command(defer = true)]
pub enum SnapshotCommand {
    /// Write a snapshot of a VM into a new directory (state.json + memory).
    /// A running VM is paused for it and then resumed; a paused one stays paused.
    Create(CreateArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's control socket (`husk vm --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Directory to create for the snapshot (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
pub struct CtlArgs {
    /// The VM's control socket (`husk vm --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// What to ask.
    action: CtlAction,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CtlAction {
    /// Take the vCPUs out of the guest (acknowledged).
    Pause,
    /// Let them run again.
    Resume,
    /// Print running or paused.
    Status,
    /// End the VM.
    Stop,
}

fn ask(args_sock: &std::path::Path, req: Request) -> Result<Response, String> {
    let resp = api::request(args_sock, req, &[], REQUEST_TIMEOUT).map_err(|e| e.to_string())?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(resp.error.unwrap_or_else(|| "the VMM refused".into()))
    }
}

pub fn cmd_ctl(args: CtlArgs) -> Result<i32, String> {
    let req = match args.action {
        CtlAction::Pause => Request::Pause,
        CtlAction::Resume => Request::Resume,
        CtlAction::Status => Request::Status,
        CtlAction::Stop => Request::Stop,
    };
    let resp = ask(&args.api_sock, req)?;
    if let Some(state) = resp.state {
        println!("{state}");
    }
    Ok(0)
}

pub fn cmd_snapshot(cmd: SnapshotCommand) -> Result<i32, String> {
    let SnapshotCommand::Create(args) = cmd;
    let was_paused = ask(&args.api_sock, Request::Status)?.state.as_deref() == Some("paused");
    if !was_paused {
        ask(&args.api_sock, Request::Pause)?;
    }
    let result = create(&args);
    if !was_paused {
        if let Err(e) = ask(&args.api_sock, Request::Resume) {
            eprintln!("husk: the VM stays paused: {e}");
        }
    }
    let written = result?;
    eprintln!(
        "snapshot written to {} ({} MiB of memory data)",
        args.out.display(),
        written >> 20
    );
    Ok(0)
}

/// Creates the directory and its files, has the VMM fill them; removes
/// the directory on any failure.
fn create(args: &CreateArgs) -> Result<u64, String> {
    let (state, memory) = snapshot::create_files(&args.out).map_err(|e| e.to_string())?;
    let resp = api::request(
        &args.api_sock,
        Request::Snapshot,
        &[&state, &memory],
        SNAPSHOT_TIMEOUT,
    );
    let outcome = match resp {
        Ok(r) if r.ok => Ok(r.memory_bytes_written.unwrap_or(0)),
        Ok(r) => Err(r.error.unwrap_or_else(|| "the VMM refused".into())),
        Err(e) => Err(e.to_string()),
    };
    if outcome.is_err() {
        let _ = std::fs::remove_dir_all(&args.out);
    }
    outcome
}

#[derive(Subcommand)]
#[command(defer = true)]
pub enum TemplateCommand {
    /// List the warm templates (`husk run` restores them instead of booting).
    Ls,
    /// Remove templates by key, or all of them.
    Rm(TemplateRmArgs),
    /// Remove every stale template (made for another husk, kernel or agent
    /// than the default ones now; any VM shape is kept), and what builds
    /// whose process died left.
    Prune,
}

#[derive(Args)]
pub struct TemplateRmArgs {
    /// Template keys (from `husk template ls`).
    keys: Vec<String>,
    /// Remove every template.
    #[arg(long, conflicts_with = "keys")]
    all: bool,
}

pub fn cmd_template(cmd: TemplateCommand) -> Result<i32, String> {
    use husk_runtime::template;
    let list = template::list().map_err(|e| e.to_string())?;
    match cmd {
        TemplateCommand::Ls => {
            let current = current_key_text().ok();
            println!(
                "{:<34} {:>8} {:>10}  {:<12} {:<8} SHAPE",
                "KEY", "MEMORY", "ON DISK", "CREATED", "STATE"
            );
            for t in list {
                let age = t.created.elapsed().map_or(0, |d| d.as_secs());
                let state = match &current {
                    Some(c) if t.is_current(c) => "current",
                    Some(_) => "stale",
                    None => "-",
                };
                println!(
                    "{:<34} {:>5} MiB {:>6} MiB  {:<12} {:<8} {}",
                    t.key,
                    t.mem_mib,
                    t.disk_bytes >> 20,
                    format!("{} ago", human_age(age)),
                    state,
                    t.made_for.as_ref().map_or("?", |m| m.shape.as_str())
                );
            }
        }
        TemplateCommand::Rm(a) => {
            if !a.all && a.keys.is_empty() {
                return Err("give template keys, or --all".into());
            }
            let keys: Vec<String> = if a.all {
                list.into_iter().map(|t| t.key).collect()
            } else {
                a.keys
            };
            for k in keys {
                template::remove(&k).map_err(|e| e.to_string())?;
                println!("{k}");
            }
        }
        TemplateCommand::Prune => {
            let current = current_key_text().map_err(|e| e.to_string())?;
            for t in list.into_iter().filter(|t| !t.is_current(&current)) {
                template::remove(&t.key).map_err(|e| e.to_string())?;
                println!("{}", t.key);
            }
            for p in template::sweep_stale_builds() {
                println!("{}", p.display());
            }
        }
    }
    Ok(0)
}

/// What `husk run`'s template is keyed by with its defaults (its build
/// part is every current template's).
fn current_key_text() -> Result<husk_runtime::template::KeyText, husk_runtime::RuntimeError> {
    use husk_runtime::{paths, run, sandbox::SandboxConfig};
    let agent = paths::agent_binary(None)?;
    husk_runtime::template::key_text(&SandboxConfig {
        kernel: None,
        agent_disk: paths::agent_disk(&agent)?,
        rootfs_image: None,
        mem_mib: run::vm_mem_mib(None),
        vcpus: run::vcpus_for(None),
        run_dir: PathBuf::new(),
        network: Default::default(),
        shares: Vec::new(),
        seccomp: Default::default(),
        template: true,
        boot_timeout: Duration::from_secs(0),
        jail_id: None,
    })
}

fn human_age(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86400),
    }
}
