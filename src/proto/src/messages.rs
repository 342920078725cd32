//! Every message of the protocol. All structs reject unknown fields: host
//! and agent are built together, so an unknown field is a bug or an attack,
//! never an extension to tolerate. (The OCI spec inside `CreateContainer`
//! follows the runtime-spec rule instead: unknown properties are ignored.)

use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

/// The first frame in each direction on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version; both sides must speak the same one.
    pub version: u32,
    /// Program name of the sender, e.g. `husk` or `husk-agent`.
    pub name: String,
    /// Program version of the sender, e.g. `0.1.0`.
    pub name_version: String,
    /// The agent's `CLOCK_BOOTTIME` (ns) when it sent this `Hello`, so the
    /// host can put the agent's [`Timestamps`] on its own clock (the host
    /// sends none). Informational only: used for timing reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ns: Option<u64>,
}

/// One request on the control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    /// Chosen by the host, echoed in the response; responses may arrive in
    /// another order than requests (a `Wait` is answered when the process
    /// exits, other requests are served meanwhile).
    pub id: u64,
    /// What to do.
    pub request: Request,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFrame {
    /// The id of the request this answers.
    pub id: u64,
    /// Success or failure.
    pub result: Outcome,
}

/// A response is a typed success or an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The request succeeded.
    Ok(Response),
    /// The agent could not do it.
    Error(ErrorBody),
}

/// Control requests, host to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Set up a container and its init process up to (not including) exec.
    /// Answered with [`Response::Created`].
    CreateContainer(CreateContainer),
    /// Exec the container's init process. Answered with [`Response::Started`].
    Start(ContainerRef),
    /// Start an extra process in a running container (its namespaces and
    /// cgroup). Answered with [`Response::ExecStarted`].
    Exec(Exec),
    /// Send a signal to a process. Answered with [`Response::Signaled`].
    Signal(Signal),
    /// Answered with [`Response::Exited`] once the process has exited and
    /// its stdout/stderr streams that are attached have been drained.
    Wait(ProcessRef),
    /// Resize a process's terminal. Answered with [`Response::TtyResized`].
    ResizeTty(ResizeTty),
    /// Resource usage of a container's cgroup. Answered with [`Response::Stats`].
    Stats(ContainerRef),
    /// Change a container's cgroup limits (`linux.resources`). Answered
    /// with [`Response::ResourcesUpdated`].
    UpdateResources(UpdateResources),
    /// Configure the guest's network interfaces and routes (before the
    /// container is created). Answered with [`Response::NetworkConfigured`].
    ConfigureNetwork(Network),
    /// Kill every process, sync and reboot the guest (which ends the VM).
    /// Answered with [`Response::ShuttingDown`] before the reboot.
    Shutdown,
    /// For a VM restored from a snapshot: mix host randomness into the
    /// guest's RNG and reseed it now (it would otherwise repeat its
    /// siblings' random numbers), and set the wall clock (the snapshot's
    /// clock went on from the snapshot's time). Answered with
    /// [`Response::Refreshed`].
    Refresh(Refresh),
}

/// Most bytes of entropy one `Refresh` carries.
pub const MAX_ENTROPY: usize = 512;

/// `Refresh` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// Host randomness, at most [`MAX_ENTROPY`] bytes.
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME when the request was sent, ns since the
    /// epoch; the guest's wall clock is set to it.
    pub realtime_ns: u64,
}

/// Successful results, one variant per request kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The container exists; its init waits for `Start`.
    Created(ProcessInfo),
    /// The container's init process was exec'd.
    Started(ProcessInfo),
    /// The extra process was exec'd.
    ExecStarted(ProcessInfo),
    /// The signal was delivered.
    Signaled,
    /// The process exited.
    Exited(ExitStatus),
    /// The terminal was resized.
    TtyResized,
    /// Container resource usage.
    Stats(Stats),
    /// The agent is about to reboot the guest.
    ShuttingDown,
    /// Interfaces and routes are set up.
    NetworkConfigured,
    /// The container's limits are changed.
    ResourcesUpdated,
    /// The guest's RNG was reseeded and its clock set.
    Refreshed,
}

/// `CreateContainer` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// Unique within the VM.
    pub container_id: String,
    /// The OCI runtime-spec `config.json`. `root.path` is a host path and is
    /// ignored (the root comes from `rootfs`); `root.readonly` is honoured.
    /// Namespaces with a `path` are host paths and are not joined: the
    /// container shares the guest's namespace of that type.
    pub spec: Box<Spec>,
    /// The device holding the container's root filesystem.
    pub rootfs: Rootfs,
    /// Where the container's writes go.
    #[serde(default)]
    pub scratch: Scratch,
    /// Whether the host will attach a stdin stream; without it the process
    /// reads from `/dev/null`. Ignored for terminals (the pty is the input).
    #[serde(default)]
    pub stdin: bool,
    /// Files the agent writes to [`FILES_DIR`]`/<container_id>/<name>`
    /// before it creates the container; the spec's bind mounts name them
    /// there (how the host's regular files, such as `/etc/hosts`, reach the
    /// container).
    #[serde(default)]
    pub files: Vec<GuestFile>,
    /// Host directories shared through virtio-fs that the agent mounts at
    /// [`SHARES_DIR`]`/<tag>` before it creates the container; the spec's
    /// bind mounts name them there.
    #[serde(default)]
    pub shares: Vec<Share>,
}

/// `UpdateResources` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResources {
    /// The container.
    pub container_id: String,
    /// The new limits; what is absent stays as it is.
    pub resources: Box<oci_spec::runtime::LinuxResources>,
}

/// Where the agent writes a container's [`GuestFile`]s.
pub const FILES_DIR: &str = "/run/husk/files";

/// The guest command-line word of a VM husk builds a warm template from:
/// its agent then does ahead what every restore would otherwise do first.
pub const TEMPLATE_CMDLINE_WORD: &str = "husk.template";

/// Where the agent mounts the VM's virtio-fs shares, one directory per tag.
pub const SHARES_DIR: &str = "/run/husk/shares";

/// A virtio-fs device the agent mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// The device's tag (1 to 36 printable bytes, no `/`).
    pub tag: String,
    /// Mount it read-only (the host's backend enforces it too).
    #[serde(default)]
    pub read_only: bool,
}

/// A file the host hands to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFile {
    /// A plain file name (no `/`, not `.` or `..`).
    pub name: String,
    /// Permission bits.
    pub mode: u32,
    /// The content.
    pub content: Vec<u8>,
}

/// The guest's network: interfaces found by MAC address, then routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// One per virtio-net device.
    pub interfaces: Vec<Interface>,
    /// Routes beyond the ones each address implies.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// MAC address (`aa:bb:cc:dd:ee:ff`) the interface gets.
    pub mac: String,
    /// The address the device has now, when it is not `mac`: a VM restored
    /// from a template has the template's NICs, whose addresses the agent
    /// changes to the container's. None: the device already has `mac`.
    #[serde(default)]
    pub device_mac: Option<String>,
    /// The name the interface gets (at most 15 bytes).
    pub name: String,
    /// MTU; the device's default when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// IPv4 addresses in CIDR form (`172.17.0.2/16`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// An IPv4 route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `default` or a CIDR (`10.1.0.0/16`).
    pub destination: String,
    /// Next hop; absent for a route on the link.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Interface name (as in [`Interface::name`]).
    pub device: String,
}

/// The container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// Guest device, e.g. `/dev/vda`. With fstype `bind`, a guest directory.
    pub device: PathBuf,
    /// Filesystem type, e.g. `ext4`; `bind` bind-mounts a directory.
    pub fstype: String,
    /// `true`: the device is mounted read-only as the lower layer of an
    /// overlay whose upper layer is on the scratch space (many VMs can share
    /// one image). `false`: the device itself is the writable root.
    pub read_only: bool,
    /// The device's size as the host sees it: the agent waits (briefly)
    /// for the guest to see the same, since a VM restored from a template
    /// learns its disk's size from a configuration-change interrupt.
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// Where the overlay's upper and work directories live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Scratch {
    /// A tmpfs in guest memory (the default).
    Tmpfs {
        /// tmpfs size limit; the kernel default (half of RAM) when absent.
        #[serde(default)]
        size_bytes: Option<u64>,
    },
    /// A writable block device, e.g. `/dev/vdb`, formatted by the host.
    Device {
        /// Guest device path.
        device: PathBuf,
        /// Filesystem type, e.g. `ext4`.
        fstype: String,
    },
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::Tmpfs { size_bytes: None }
    }
}

/// Names a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRef {
    /// The container's id.
    pub container_id: String,
}

/// Names a process: a container's init (no `exec_id`) or an exec'd process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRef {
    /// The container's id.
    pub container_id: String,
    /// The exec id; absent for the container's init process.
    #[serde(default)]
    pub exec_id: Option<String>,
}

/// `Exec` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The container to run in.
    pub container_id: String,
    /// Unique within the container.
    pub exec_id: String,
    /// What to run, as in the OCI spec's `process`.
    pub process: Box<Process>,
    /// Whether the host will attach a stdin stream.
    #[serde(default)]
    pub stdin: bool,
}

/// `Signal` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    /// The container's id.
    pub container_id: String,
    /// The exec id; absent for the container's init process.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Linux signal number (e.g. 15 for SIGTERM).
    pub signal: i32,
}

/// `ResizeTty` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeTty {
    /// The container's id.
    pub container_id: String,
    /// The exec id; absent for the container's init process.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A process the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    /// Its pid in the guest's (the agent's) pid namespace.
    pub pid: i32,
    /// Agent timestamps so far.
    pub timestamps: Timestamps,
    /// How the process's setup went, step by step (create and exec; the
    /// first step is `start`, when the request arrived).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<SetupStep>,
}

/// One setup step and when it ended, `CLOCK_BOOTTIME` ns in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupStep {
    /// What was done.
    pub step: String,
    /// When it ended.
    pub ns: u64,
}

/// Agent-side timestamps, nanoseconds of `CLOCK_BOOTTIME` in the guest
/// (time since the guest kernel started), so the host can split startup
/// into kernel boot, agent start, container setup and exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamps {
    /// The agent's `main` started.
    pub agent_started_ns: u64,
    /// The agent listened on its ports.
    pub agent_ready_ns: u64,
    /// The container (or exec'd process) was set up, ready to exec.
    #[serde(default)]
    pub created_ns: Option<u64>,
    /// The process's `execve` succeeded (or failed, with 126/127).
    #[serde(default)]
    pub exec_ns: Option<u64>,
    /// The process exited.
    #[serde(default)]
    pub exited_ns: Option<u64>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Shell-style status: the exit code, or 128+N when killed by signal N
    /// (137 when OOM-killed); 127/126 when the program could not be exec'd.
    pub exit_code: i32,
    /// The signal that killed it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The container's cgroup recorded an OOM kill while it ran.
    pub oom_killed: bool,
    /// Every attached output stream of the process had reached its end
    /// when the status was sent: the host can wait for their last bytes.
    /// False when something (a background process) still held them after
    /// the agent's drain timeout.
    #[serde(default)]
    pub output_drained: bool,
    /// Agent timestamps, complete.
    pub timestamps: Timestamps,
}

/// Resource usage of a container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Current memory usage.
    pub memory_usage_bytes: u64,
    /// Peak memory usage, when the kernel reports it.
    #[serde(default)]
    pub memory_max_usage_bytes: Option<u64>,
    /// The memory limit, absent when unlimited.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used by all processes of the container.
    pub cpu_usage_ns: u64,
    /// Number of processes, when the pids controller is present.
    #[serde(default)]
    pub pids_current: Option<u64>,
    /// OOM kills recorded in the cgroup.
    pub oom_kills: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Machine-readable class.
    pub code: ErrorCode,
    /// One human-readable line.
    pub message: String,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

/// Classes of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or contradictory request (bad spec, bad signal number).
    InvalidRequest,
    /// No such container or process.
    NotFound,
    /// The id is already in use.
    AlreadyExists,
    /// Not possible in the current state (e.g. `Start` twice).
    InvalidState,
    /// A feature the agent does not implement (e.g. user namespaces).
    Unsupported,
    /// Setting up the container failed (mount, cgroup, namespace...).
    SetupFailed,
    /// Anything else on the agent's side.
    Internal,
}

/// First frame on a stdio connection; raw bytes follow in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamHello {
    /// Protocol version; must equal the agent's.
    pub version: u32,
    /// The container's id.
    pub container_id: String,
    /// The exec id; absent for the container's init process.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Which stream this connection carries.
    pub stream: StreamKind,
    /// For a container's init process (no `exec_id`): how long the agent
    /// may wait for the container to exist, in ms, so that the host can
    /// open its streams while the container is still being created. The
    /// agent answers once a create of the container ended (attached if it
    /// succeeded), or when the wait is over; 0 answers at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The stdio streams of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Host to process. The host half-closes (shutdown write) for EOF.
    Stdin,
    /// Process to host; the agent half-closes at EOF.
    Stdout,
    /// Process to host; the agent half-closes at EOF.
    Stderr,
    /// Both directions of the process's terminal (`process.terminal`).
    Pty,
}

/// The agent's answer to a [`StreamHello`]; raw bytes follow `Attached`,
/// the agent closes the connection after `Rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamReply {
    /// The stream is connected to the process.
    Attached,
    /// It is not (unknown process, stream already attached, no terminal...).
    Rejected(ErrorBody),
}
