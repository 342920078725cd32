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
