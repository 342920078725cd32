//! Containers in micro-VMs, host side: a sandbox is one VM whose PID 1 is
//! husk's guest agent; `husk run` creates one container in it.

pub mod clock;
pub mod image;
pub mod net;
pub mod paths;
pub mod relay;
pub mod run;
pub mod run_vm;
pub mod runc;
pub mod sandbox;
pub mod shares;
pub mod spec;
pub mod template;
pub mod uds;

/// Seconds a guest may take to boot and its agent to answer: the flag,
/// else $HUSK_BOOT_TIMEOUT, else 30 s (ample on VT-x hosts, where a guest
/// boots in well under a second).
pub fn boot_timeout(flag: Option<u64>) -> Result<u64, RuntimeError> {
    match (flag, std::env::var("HUSK_BOOT_TIMEOUT")) {
        (Some(s), _) => Ok(s),
        (None, Ok(v)) => v.trim().parse().map_err(|_| {
            RuntimeError::Invalid(format!("invalid HUSK_BOOT_TIMEOUT {v:?}: expected seconds"))
        }),
        (None, Err(_)) => Ok(30),
    }
}

/// Whether the environment turns a default-on feature off: `var` is
/// `off`, `0`, `false` or `no` (`HUSK_TEMPLATE`, `HUSK_JAIL`).
pub fn env_off(var: &str) -> bool {
    matches!(
        std::env::var(var).as_deref(),
        Ok("off" | "0" | "false" | "no")
    )
}

/// Errors of the host side of a container. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The guest agent binary is missing.
    #[error("guest agent not found at {0}: build it with tools/build-agent (or set HUSK_AGENT)")]
    NoAgent(String),
    /// A file husk needs could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The rootfs could not be turned into an image.
    #[error(transparent)]
    Image(#[from] husk_image::ext4::Ext4Error),
    /// An OCI image could not be pulled or used.
    #[error(transparent)]
    Oci(#[from] husk_image::oci::OciError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] husk_vmm::builder::BuildError),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {0} s (set HUSK_BOOT_TIMEOUT to wait longer)")]
    AgentTimeout(u64),
    /// The VM stopped before the agent answered.
    #[error("the VM stopped before its agent answered: {0}")]
    VmStopped(String),
    /// The agent refused a request or the protocol failed.
    #[error("guest agent: {0}")]
    Agent(#[from] husk_proto::ProtoError),
    /// Talking to a running container's agent failed at `step`; the guest
    /// console's last line follows when the failure was the connection's.
    #[error("{step}: {source}{console}")]
    AgentStep {
        /// What husk was doing.
        step: &'static str,
        /// What failed.
        source: Box<RuntimeError>,
        /// ` (guest console: ...)`, or empty.
        console: String,
    },
    /// A stdio stream was rejected.
    #[error("guest agent refused the {0} stream: {1}")]
    StreamRejected(String, String),
    /// No container with this id.
    #[error("container does not exist")]
    NotFound(String),
    /// Invalid user input.
    #[error("{0}")]
    Invalid(String),
    /// A signal for the container came before it started (see
    /// `Session::create`): the VM was stopped and the container not started.
    #[error(
        "interrupted by {} before the container started",
        crate::runc::lifecycle::signal_name(*.0).unwrap_or_else(|| format!("signal {}", .0))
    )]
    Interrupted(i32),
}
