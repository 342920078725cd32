//! OCI spec -> setup plan. Everything here is pure: it validates the spec
//! and precomputes what the forked child will do, so that the child does
//! as little as possible besides system calls.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use oci_spec::runtime::{
    Capability, LinuxDevice, LinuxDeviceType, LinuxNamespaceType, PosixRlimitType, Process, Spec,
};

use super::caps::{cap_number, CapSets};
use super::cgroup::{device_rules, DeviceRule};
use super::mounts::{parse_mount_options, propagation_flag, MountOptions};
use super::seccomp::{plan_seccomp_cached, SeccompPlan};

/// A spec the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A required field is missing or a field has an invalid value.
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// A feature the agent does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

fn invalid(msg: impl Into<String>) -> PlanError {
    PlanError::Invalid(msg.into())
}

/// The search path used when the process's environment has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything about one process: the container's init or an exec.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    /// argv.
    pub args: Vec<CString>,
    /// argv[0] as given, for error messages.
    pub arg0: String,
    /// Paths to try with `execve`, in order (PATH lookup).
    pub exec_candidates: Vec<CString>,
    /// Whether argv[0] named a path (contains '/').
    pub arg0_is_path: bool,
    /// The environment.
    pub env: Vec<CString>,
    /// Working directory inside the container.
    pub cwd: PathBuf,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// umask, if set.
    pub umask: Option<u32>,
    /// (resource, soft, hard).
    pub rlimits: Vec<(libc::c_int, u64, u64)>,
    /// Capability sets; `None` leaves the kernel's defaults (runc does too).
    pub caps: Option<CapSets>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// Whether the process gets a pty.
    pub terminal: bool,
    /// Initial terminal size (rows, cols).
    pub console_size: Option<(u16, u16)>,
    /// Written to `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
    /// The container's `linux.seccomp`, compiled (execs get the init's).
    pub seccomp: Option<Arc<SeccompPlan>>,
}

impl ProcessPlan {
    /// Adds the platform's glibc tunables (`GLIBC_TUNABLES` syntax, `:`
    /// separated) to the process's environment: appended to its own
    /// `GLIBC_TUNABLES`, unless that already sets one of the same names
    /// (the process's choice stands).
    ///
    /// On kvm_pvm a guest's user mode runs in the host's XCR0 while the
    /// guest kernel can save only x87/SSE state at a context switch (see
    /// `PVM_CMDLINE` in husk's VMM): glibc must not pick its AVX code
    /// there, or processes corrupt each other's vector registers.
    pub fn add_glibc_tunables(&mut self, tunables: &str) {
        const KEY: &[u8] = b"GLIBC_TUNABLES=";
        let names = |list: &str| -> Vec<String> {
            list.split(':')
                .filter_map(|t| t.split_once('=').map(|(n, _)| n.to_owned()))
                .collect()
        };
        match self.env.iter().position(|e| e.as_bytes().starts_with(KEY)) {
            None => {
                if let Ok(e) = CString::new(format!("GLIBC_TUNABLES={tunables}")) {
                    self.env.push(e);
                }
            }
            Some(i) => {
                let own =
                    String::from_utf8_lossy(&self.env[i].as_bytes()[KEY.len()..]).into_owned();
                let own_names = names(&own);
                let added: Vec<&str> = tunables
                    .split(':')
                    .filter(|t| {
                        t.split_once('=')
                            .is_some_and(|(n, _)| !own_names.iter().any(|o| o == n))
                    })
                    .collect();
                if added.is_empty() {
                    return;
                }
                let joined = if own.is_empty() {
                    added.join(":")
                } else {
                    format!("{own}:{}", added.join(":"))
                };
                if let Ok(e) = CString::new(format!("GLIBC_TUNABLES={joined}")) {
                    self.env[i] = e;
                }
            }
        }
    }
}

/// One OCI mount, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Source (device, path or pseudo name).
    pub source: Option<PathBuf>,
    /// Filesystem type (`None` for bind mounts).
    pub fstype: Option<String>,
    /// Parsed options.
    pub options: MountOptions,
}

impl MountPlan {
    /// Whether this is a bind mount.
    pub fn is_bind(&self) -> bool {
        self.options.bind || self.fstype.as_deref() == Some("bind")
    }
}

/// A device node to create in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    pub kind: u32,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Everything about a new container besides its process.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    /// `CLONE_NEW*` flags of the namespaces to create.
    pub clone_flags: libc::c_int,
    /// Namespace types the spec asked to join by path (host paths, which do
    /// not exist in the guest): the container shares the guest's.
    pub shared_namespaces: Vec<String>,
    /// Hostname (needs a UTS namespace).
    pub hostname: Option<String>,
    /// Domain name (needs a UTS namespace).
    pub domainname: Option<String>,
    /// OCI mounts, in order.
    pub mounts: Vec<MountPlan>,
    /// Extra device nodes (`linux.devices`).
    pub devices: Vec<DevicePlan>,
    /// The device cgroup's rules.
    pub device_rules: Vec<DeviceRule>,
    /// Paths masked from the container.
    pub masked_paths: Vec<PathBuf>,
    /// Paths made read-only.
    pub readonly_paths: Vec<PathBuf>,
    /// `root.readonly`.
    pub root_readonly: bool,
    /// `linux.rootfsPropagation` as mount flags.
    pub root_propagation: Option<u64>,
    /// (path under /proc/sys, value).
    pub sysctls: Vec<(PathBuf, String)>,
    /// The init process.
    pub process: ProcessPlan,
}

impl ContainerPlan {
    /// Whether `/dev` is bind-mounted from the guest (then it is left as is).
    pub fn dev_is_bind(&self) -> bool {
        self.mounts
            .iter()
            .any(|m| m.destination == Path::new("/dev") && m.is_bind())
    }

    /// Whether the spec mounts something at `dest`.
    pub fn mounts_at(&self, dest: &str) -> bool {
        self.mounts.iter().any(|m| m.destination == Path::new(dest))
    }
}

/// Builds the plan for a new container. `cap_last_cap` is the highest
/// capability number the running kernel knows.
pub fn plan_container(spec: &Spec, cap_last_cap: u32) -> Result<ContainerPlan, PlanError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process is required"))?;
    let linux = spec.linux().as_ref();

    let mut clone_flags = libc::CLONE_NEWNS;
    let mut shared_namespaces = Vec::new();
    let mut seen = HashSet::new();
    for ns in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        if !seen.insert(ns.typ()) {
            return Err(invalid(format!("namespace {} listed twice", ns.typ())));
        }
        let flag = match ns.typ() {
            LinuxNamespaceType::User => {
                return Err(PlanError::Unsupported("user namespaces".into()));
            }
            LinuxNamespaceType::Time => {
                return Err(PlanError::Unsupported("time namespaces".into()));
            }
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        };
        if ns.path().is_some() {
            if flag != libc::CLONE_NEWNS {
                shared_namespaces.push(ns.typ().to_string());
            }
            continue;
        }
        clone_flags |= flag;
    }

    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    let domainname = spec.domainname().clone().filter(|h| !h.is_empty());
    if (hostname.is_some() || domainname.is_some()) && clone_flags & libc::CLONE_NEWUTS == 0 {
        return Err(invalid("hostname needs a new uts namespace"));
    }

    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().clone();
        if !destination.is_absolute() {
            return Err(invalid(format!(
                "mount destination {} is not absolute",
                destination.display()
            )));
        }
        let options = parse_mount_options(m.options().as_deref().unwrap_or_default())
            .map_err(PlanError::Invalid)?;
        mounts.push(MountPlan {
            destination: normalize(&destination),
            source: m.source().clone(),
            fstype: m.typ().clone().filter(|t| !t.is_empty() && t != "none"),
            options,
        });
    }

    let devices: Vec<DevicePlan> = linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
        .map(plan_device)
        .collect::<Result<_, _>>()?;

    let device_rules = device_rules(
        linux
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().as_deref())
            .unwrap_or_default(),
        &devices,
    )
    .map_err(PlanError::Invalid)?;

    let root_propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => None,
        Some(p) => Some(
            propagation_flag(p)
                .ok_or_else(|| invalid(format!("unknown rootfsPropagation {p:?}")))?,
        ),
    };

    let mut sysctls = Vec::new();
    for (key, value) in linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        sysctls.push((sysctl_path(key)?, value.clone()));
    }
    sysctls.sort();

    let paths = |v: Option<&Vec<String>>| -> Vec<PathBuf> {
        v.into_iter().flatten().map(PathBuf::from).collect()
    };

    Ok(ContainerPlan {
        clone_flags,
        shared_namespaces,
        hostname,
        domainname,
        mounts,
        devices,
        device_rules,
        masked_paths: paths(linux.and_then(|l| l.masked_paths().as_ref())),
        readonly_paths: paths(linux.and_then(|l| l.readonly_paths().as_ref())),
        root_readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        root_propagation,
        sysctls,
        process: ProcessPlan {
            seccomp: match linux.and_then(|l| l.seccomp().as_ref()) {
                Some(s) => Some(plan_seccomp_cached(s)?),
                None => None,
            },
            ..plan_process(process, cap_last_cap)?
        },
    })
}

/// Builds the plan for one process.
pub fn plan_process(process: &Process, cap_last_cap: u32) -> Result<ProcessPlan, PlanError> {
    let args = process.args().as_deref().unwrap_or_default();
    let arg0 = args
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("process.args must not be empty"))?
        .clone();
    let args = args
        .iter()
        .map(|a| c_string(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env_strings = process.env().clone().unwrap_or_default();
    for e in &env_strings {
        if !e.contains('=') || e.starts_with('=') {
            return Err(invalid(format!("environment entry {e:?} is not KEY=VALUE")));
        }
    }
    let env = env_strings
        .iter()
        .map(|e| c_string(e))
        .collect::<Result<_, _>>()?;
    let arg0_is_path = arg0.contains('/');
    let exec_candidates = exec_candidates(&arg0, &env_strings)
        .iter()
        .map(|p| c_string(&p.to_string_lossy()))
        .collect::<Result<_, _>>()?;

    let cwd = process.cwd().clone();
    if !cwd.is_absolute() {
        return Err(invalid(format!(
            "process.cwd {} is not absolute",
            cwd.display()
        )));
    }

    let user = process.user();
    let mut rlimits = Vec::new();
    for r in process.rlimits().iter().flatten() {
        if r.soft() > r.hard() {
            return Err(invalid(format!(
                "rlimit {}: soft limit above hard limit",
                r.typ()
            )));
        }
        rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
    }

    let caps = match process.capabilities() {
        None => None,
        Some(c) => {
            let set = |s: &Option<HashSet<Capability>>| -> Result<u64, PlanError> {
                cap_mask(s.iter().flatten(), cap_last_cap)
            };
            Some(CapSets {
                bounding: set(c.bounding())?,
                effective: set(c.effective())?,
                permitted: set(c.permitted())?,
                inheritable: set(c.inheritable())?,
                ambient: set(c.ambient())?,
                last_cap: cap_last_cap,
            })
        }
    };

    let console_size = process
        .console_size()
        .map(|b| (clamp_u16(b.height()), clamp_u16(b.width())));

    Ok(ProcessPlan {
        args,
        arg0,
        exec_candidates,
        arg0_is_path,
        env,
        cwd: normalize(&cwd),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        rlimits,
        caps,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        terminal: process.terminal().unwrap_or(false),
        console_size,
        oom_score_adj: process.oom_score_adj(),
        seccomp: None,
    })
}

fn clamp_u16(v: u64) -> u16 {
    v.min(u64::from(u16::MAX)) as u16
}

fn c_string(s: &str) -> Result<CString, PlanError> {
    CString::new(s).map_err(|_| invalid(format!("{s:?} contains a NUL byte")))
}

/// A capability bitmask from names; a capability the running kernel does
/// not know is an error (the spec asks for something we cannot give).
fn cap_mask<'a>(
    caps: impl Iterator<Item = &'a Capability>,
    cap_last_cap: u32,
) -> Result<u64, PlanError> {
    let mut mask = 0u64;
    for cap in caps {
        let name = cap.to_string();
        let n = cap_number(&name)
            .ok_or_else(|| PlanError::Unsupported(format!("capability CAP_{name}")))?;
        if n > cap_last_cap {
            return Err(PlanError::Unsupported(format!(
                "capability CAP_{name} (the guest kernel stops at {cap_last_cap})"
            )));
        }
        mask |= 1 << n;
    }
    Ok(mask)
}

/// The `RLIMIT_*` number of an OCI rlimit type.
pub fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

fn plan_device(d: &LinuxDevice) -> Result<DevicePlan, PlanError> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
        LinuxDeviceType::B => libc::S_IFBLK,
        LinuxDeviceType::P => libc::S_IFIFO,
        LinuxDeviceType::A => return Err(invalid("device type 'a' is only for cgroup rules")),
    };
    let path = d.path().clone();
    if !path.starts_with("/dev/") {
        return Err(invalid(format!(
            "device {} is not under /dev",
            path.display()
        )));
    }
    Ok(DevicePlan {
        path: normalize(&path),
        kind,
        major: d.major() as u32,
        minor: d.minor() as u32,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// `net.ipv4.ip_forward` -> `net/ipv4/ip_forward`, refusing escapes.
pub fn sysctl_path(key: &str) -> Result<PathBuf, PlanError> {
    if key.is_empty() || key.contains("..") || key.starts_with(['/', '.']) {
        return Err(invalid(format!("bad sysctl name {key:?}")));
    }
    Ok(PathBuf::from(key.replace('.', "/")))
}

/// Lexically normalizes an absolute path (drops `.`, resolves `..` without
/// going above `/`).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The paths `execvp` would try for `arg0` with environment `env`.
pub fn exec_candidates(arg0: &str, env: &[String]) -> Vec<PathBuf> {
    if arg0.contains('/') {
        return vec![PathBuf::from(arg0)];
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            Path::new(dir).join(arg0)
        })
        .collect()
}

/// Exit code and message when `execve` failed with `errno` for every
/// candidate: 127 for "not found", 126 for "found but cannot run".
pub fn exec_failure(arg0: &str, arg0_is_path: bool, errno: i32) -> (i32, String) {
    let not_found = errno == libc::ENOENT || errno == libc::ENOTDIR;
    if not_found && !arg0_is_path {
        return (
            127,
            format!("exec: \"{arg0}\": executable file not found in $PATH"),
        );
    }
    let reason = std::io::Error::from_raw_os_error(errno);
    let code = if not_found { 127 } else { 126 };
    (
        code,
        format!("exec: \"{arg0}\": {}", strip_os_error(&reason)),
    )
}

/// "No such file or directory (os error 2)" -> "no such file or directory".
fn strip_os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s).to_owned();
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

/// Shell-style exit status of a `waitpid` status: (code, signal).
pub fn exit_code_from_wait(status: i32) -> (i32, Option<i32>) {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (libc::WEXITSTATUS(status), None)
    }
}
