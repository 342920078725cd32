//! The OCI runtime spec for `husk run`'s flags, docker-like defaults.

use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Spec, UserBuilder,
};

use crate::RuntimeError;

/// What `husk run` asks for.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// Command and arguments.
    pub args: Vec<String>,
    /// Extra environment, `K=V`.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: Option<String>,
    /// `UID[:GID]`.
    pub user: Option<String>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Hostname.
    pub hostname: String,
    /// Supplementary groups (from the image's /etc/group).
    pub additional_gids: Vec<u32>,
    /// No seccomp profile (`--security-opt seccomp=unconfined`); else
    /// [`husk_proto::default_seccomp`]'s.
    pub seccomp_unconfined: bool,
}

/// Docker's default capability set.
fn docker_caps() -> Capabilities {
    use Capability::*;
    [
        Chown,
        DacOverride,
        Fowner,
        Fsetid,
        Kill,
        Setgid,
        Setuid,
        Setpcap,
        NetBindService,
        NetRaw,
        SysChroot,
        Mknod,
        AuditWrite,
        Setfcap,
    ]
    .into_iter()
    .collect()
}

/// Parses `UID[:GID]` (numbers only: the image's /etc/passwd is not read).
pub fn parse_user(s: &str) -> Result<(u32, u32), RuntimeError> {
    let bad = || RuntimeError::Invalid(format!("invalid user {s:?}: expected UID[:GID] (numeric)"));
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// Parses a docker-style size: `512m`, `1g`, `1048576`, `64k`.
pub fn parse_size(s: &str) -> Result<u64, RuntimeError> {
    let bad = || RuntimeError::Invalid(format!("invalid size {s:?}: expected e.g. 256m or 1g"));
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(bad)
}

/// Builds the spec.
pub fn build(r: &RunSpec) -> Result<Spec, RuntimeError> {
    if r.args.is_empty() {
        return Err(RuntimeError::Invalid("no command given".into()));
    }
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(r.args.clone()));
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    if r.tty {
        env.push("TERM=xterm".into());
    }
    for e in &r.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(RuntimeError::Invalid(format!(
                "invalid environment variable {e:?}: expected K=V"
            )));
        }
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    env.push(format!("HOSTNAME={}", r.hostname));
    process.set_env(Some(env));
    if let Some(cwd) = &r.cwd {
        if !cwd.starts_with('/') {
            return Err(RuntimeError::Invalid(format!(
                "working directory {cwd:?} must be absolute"
            )));
        }
        process.set_cwd(cwd.into());
    }
    if let Some(u) = &r.user {
        let (uid, gid) = parse_user(u)?;
        let user = UserBuilder::default()
            .uid(uid)
            .gid(gid)
            .additional_gids(r.additional_gids.clone())
            .build()
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        process.set_user(user);
    }
    process.set_terminal(Some(r.tty));
    let caps = docker_caps();
    let mut lc = LinuxCapabilities::default();
    lc.set_bounding(Some(caps.clone()));
    lc.set_effective(Some(caps.clone()));
    lc.set_permitted(Some(caps));
    lc.set_inheritable(None);
    lc.set_ambient(None);
    process.set_capabilities(Some(lc));
    spec.set_process(Some(process));
    spec.set_hostname(Some(r.hostname.clone()));
    // docker run: a writable root (the overlay's upper layer in the guest).
    // oci-spec's default root is read-only.
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut linux = spec.linux().clone().unwrap_or_default();
    // The VM is the isolation boundary for the network: the container
    // shares the guest's network (loopback, and later the VM's NICs).
    if let Some(ns) = linux.namespaces().clone() {
        let kept = ns
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(kept));
    }
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = r.memory {
        let limit =
            i64::try_from(m).map_err(|_| RuntimeError::Invalid("memory limit too large".into()))?;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                // No swap in the guest: limit and memory+swap are the same.
                .swap(limit)
                .build()
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?,
        );
    }
    if let Some(c) = r.cpus {
        if !(c > 0.0 && c <= 1024.0) {
            return Err(RuntimeError::Invalid(format!("invalid --cpus {c}")));
        }
        let period = 100_000u64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((c * period as f64).round() as i64)
                .build()
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?,
        );
    }
    linux.set_resources(Some(
        resources
            .build()
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?,
    ));
    if !r.seccomp_unconfined {
        let profile = husk_proto::default_seccomp::profile()
            .map_err(|e| RuntimeError::Invalid(format!("default seccomp profile: {e}")))?;
        linux.set_seccomp(Some(profile));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::LinuxSeccompAction;

    use super::*;

    #[test]
    fn flags_map_to_the_spec() {
        let s = build(&RunSpec {
            args: vec!["sh".into(), "-c".into(), "id".into()],
            env: vec!["A=1".into(), "PATH=/bin".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:100".into()),
            memory: Some(64 << 20),
            cpus: Some(1.5),
            tty: true,
            hostname: "box".into(),
            additional_gids: vec![10],
            seccomp_unconfined: false,
        })
        .unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap()[2], "id");
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"TERM=xterm".to_string()));
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 100));
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[10][..]));
        assert_eq!(p.terminal(), Some(true));
        let linux = s.linux().as_ref().unwrap();
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(150_000));
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Pid));
        assert_eq!(s.hostname().as_deref(), Some("box"));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(false));
        // husk's default seccomp profile, unless unconfined.
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActAllow);
        let refused = |name: &str| {
            seccomp.syscalls().as_ref().unwrap().iter().any(|r| {
                r.names().iter().any(|n| n == name)
                    && r.action() == LinuxSeccompAction::ScmpActErrno
                    && r.args().is_none()
            })
        };
        for name in [
            "mount",
            "unshare",
            "setns",
            "bpf",
            "keyctl",
            "open_by_handle_at",
        ] {
            assert!(refused(name), "{name}");
        }
        assert!(!refused("read") && !refused("clone"));
        let unconfined = build(&RunSpec {
            args: vec!["true".into()],
            seccomp_unconfined: true,
            ..Default::default()
        })
        .unwrap();
        assert!(unconfined.linux().as_ref().unwrap().seccomp().is_none());
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        let base = RunSpec {
            args: vec!["true".into()],
            ..Default::default()
        };
        assert!(build(&RunSpec {
            args: vec![],
            ..base.clone()
        })
        .is_err());
        assert!(build(&RunSpec {
            env: vec!["NOEQUALS".into()],
            ..base.clone()
        })
        .is_err());
        assert!(build(&RunSpec {
            cwd: Some("rel".into()),
            ..base.clone()
        })
        .is_err());
        assert!(build(&RunSpec {
            user: Some("bob".into()),
            ..base.clone()
        })
        .is_err());
        assert!(build(&RunSpec {
            cpus: Some(0.0),
            ..base
        })
        .is_err());
        assert_eq!(parse_size("256m").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(parse_user("5").unwrap(), (5, 5));
    }
}
