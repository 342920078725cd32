//! husk-agent: PID 1 of a husk guest (see the library docs).
//!
//! ```text
//! husk-agent              as PID 1: set up the guest, serve vsock ports 1024/1025
//! husk-agent --unix DIR   debug server on DIR/control.sock and DIR/stdio.sock
//! husk-agent --version
//! ```

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use husk_agent::agent::{Agent, AgentConfig};
use husk_agent::container::seccomp;
use husk_agent::init;
use husk_agent::log;
use husk_agent::reaper::{ProcessTable, ReapMode};
use husk_agent::server::{serve_control_forever, serve_stdio_forever};
use husk_agent::sys;
use husk_agent::vsock::VsockListener;
use husk_proto::{CONTROL_PORT, STDIO_PORT};

fn main() {
    let started_ns = sys::boottime_ns();
    // As PID 1, argv holds whatever the kernel did not understand on its
    // command line: ignore it.
    if sys::getpid() == 1 {
        pid1(started_ns);
    }
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("--version"), None) => println!("husk-agent {}", env!("CARGO_PKG_VERSION")),
        (Some("--unix"), Some(dir)) if args.len() == 3 => {
            debug_server(PathBuf::from(dir), started_ns)
        }
        _ => {
            eprintln!(
                "usage: husk-agent (as PID 1) | husk-agent --unix DIR | husk-agent --version"
            );
            std::process::exit(2);
        }
    }
}

/// If PID 1 exits the kernel panics; end the VM cleanly instead.
fn fatal(msg: &str) -> ! {
    log!("fatal: {msg}");
    if sys::getpid() != 1 {
        std::process::exit(1);
    }
    sys::sync();
    let e = sys::reboot();
    log!("reboot failed: {e}");
    loop {
        thread::park();
    }
}

fn pid1(started_ns: u64) -> ! {
    std::panic::set_hook(Box::new(|info| fatal(&format!("panic: {info}"))));
    // Before any thread exists, so that every thread inherits the mask and
    // the reaper alone receives SIGCHLD.
    if let Err(e) = sys::block_signals(&[libc::SIGCHLD]) {
        fatal(&format!("block SIGCHLD: {e}"));
    }
    if let Err(e) = init::init_system() {
        fatal(&e.to_string());
    }
    // The agent's own code is dense and most of it runs in a container's
    // create, which on kvm_pvm hosts faults it in page by page (the guest
    // kernel reads 32 KiB around such a fault there): one read of the
    // whole binary now is cheaper, and a warm template then holds it.
    if let Err(e) = std::fs::File::open("/proc/self/exe").and_then(|f| sys::read_ahead_all(&f)) {
        log!("reading the agent binary ahead: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let opts = init::parse_cmdline(&cmdline);
    if opts.template {
        // Mapped now, the agent's code costs a restore no page faults (the
        // create path is most of it); a cold boot would pay ~0.8 s for it
        // where guest kernel code is emulated, more than it saves there.
        match init::map_own_binary() {
            Ok(bytes) => log!("template: {} KiB of the agent mapped", bytes / 1024),
            Err(e) => log!("template: mapping the agent binary: {e}"),
        }
    }
    let table =
        ProcessTable::start(ReapMode::All).unwrap_or_else(|e| fatal(&format!("reaper: {e}")));
    let cfg = AgentConfig {
        staging_dir: PathBuf::from("/run/husk"),
        reboot_on_exit: true,
        drain_timeout: opts.drain_timeout,
        // The kernel hands command-line words it does not know to init as
        // environment: this one only husk puts there.
        glibc_tunables: std::env::var("GLIBC_TUNABLES")
            .ok()
            .filter(|t| !t.is_empty()),
        spare_cgroup: true,
        ..AgentConfig::default()
    };
    let agent = Agent::new(cfg, table, started_ns, Agent::reboot_hook());
    // `husk run`'s containers bring this profile: compiled now, it is in
    // every warm template.
    let ahead = husk_proto::default_seccomp::profile()
        .map_err(|e| e.to_string())
        .and_then(|p| seccomp::compile_ahead(&p).map_err(|e| e.to_string()));
    if let Err(e) = ahead {
        log!("default seccomp profile: {e}");
    }
    let control = VsockListener::bind(CONTROL_PORT)
        .unwrap_or_else(|e| fatal(&format!("vsock port {CONTROL_PORT}: {e}")));
    let stdio = VsockListener::bind(STDIO_PORT)
        .unwrap_or_else(|e| fatal(&format!("vsock port {STDIO_PORT}: {e}")));
    agent.set_ready();
    let now = sys::boottime_ns();
    log!(
        "ready on vsock ports {CONTROL_PORT} (control) and {STDIO_PORT} (stdio): {} ms after boot, {} ms in the agent",
        now / 1_000_000,
        now.saturating_sub(started_ns) / 1_000_000
    );
    serve(agent, control, stdio)
}

fn debug_server(dir: PathBuf, started_ns: u64) {
    let bind = |name: &str| {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        UnixListener::bind(&path).unwrap_or_else(|e| {
            eprintln!("husk-agent: {}: {e}", path.display());
            std::process::exit(1);
        })
    };
    let control = bind("control.sock");
    let stdio = bind("stdio.sock");
    let table = ProcessTable::start(ReapMode::Tracked).unwrap_or_else(|e| {
        eprintln!("husk-agent: reaper: {e}");
        std::process::exit(1);
    });
    let cfg = AgentConfig {
        staging_dir: dir.join("run"),
        ..AgentConfig::default()
    };
    let agent = Agent::new(cfg, table, started_ns, Box::new(|| std::process::exit(0)));
    agent.set_ready();
    log!("serving on {}", dir.display());
    serve(agent, control, stdio)
}

fn serve<C, S>(agent: Arc<Agent>, control: C, stdio: S) -> !
where
    C: husk_agent::transport::Listener,
    S: husk_agent::transport::Listener,
{
    let a = Arc::clone(&agent);
    let spawned = thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || serve_stdio_forever(a, stdio));
    if let Err(e) = spawned {
        fatal(&format!("stdio thread: {e}"));
    }
    serve_control_forever(agent, control);
    fatal("control server stopped")
}
