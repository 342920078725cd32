//! `linux.seccomp` -> one BPF filter, compiled by libseccomp (as runc,
//! crun and youki do) before the fork, and installed by the container's
//! process (and each exec'd process) before it execs, as runc does.
//!
//! libseccomp arranges the system call checks as a binary tree
//! (`SCMP_FLTATR_CTL_OPTIMIZE` 2), so a call walks ~log2(n) comparisons
//! instead of one per listed call. On a host that emulates guest kernel
//! code (kvm_pvm) that is seconds: the kernel runs the filter for every
//! filtered call, and when a filter is installed it runs it once for every
//! system call number to find those it may allow without running it (its
//! constant-action cache). With Podman's default profile (472 names) as a
//! linear chain, that cost ~8 s per container start and per exec.
//!
//! What runc does, this does: names this architecture does not have
//! (profiles list the 32-bit ones too) are skipped; a rule whose action is
//! the default one is left out (libseccomp refuses it; the result is the
//! same); conditions on one argument twice become one rule each; when two
//! rules give one call different actions, the first one given holds. Only
//! x86_64 calls are filtered (the guest kernel runs no other ABI); a call
//! through another ABI is killed.

use std::collections::VecDeque;
use std::io::{self, Read, Seek};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
    LinuxSyscall,
};

use super::plan::PlanError;
use crate::sys::{self, SockFilter};

/// The kernel's limit on one filter's length.
const BPF_MAXINSNS: usize = 4096;

/// The errno `SCMP_ACT_ERRNO` returns when the profile names none.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// libseccomp's binary-tree layout of the system call checks.
const OPTIMIZE_BINARY_TREE: u32 = 2;

/// A profile ready to install: the filter (none when it would allow
/// everything) and the `seccomp(2)` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompPlan {
    filter: Option<Vec<SockFilter>>,
    flags: libc::c_ulong,
}

impl SeccompPlan {
    /// Number of filters the profile became (0 or 1).
    pub fn filter_count(&self) -> usize {
        usize::from(self.filter.is_some())
    }

    /// Installs the filter on the calling thread. Without no_new_privs the
    /// caller needs CAP_SYS_ADMIN, so the container's process calls this
    /// before it drops capabilities (runc's order).
    pub fn install(&self) -> io::Result<()> {
        match &self.filter {
            Some(f) => sys::seccomp_set_filter(f, self.flags),
            None => Ok(()),
        }
    }
}

/// One OCI action as libseccomp's.
fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, PlanError> {
    use LinuxSeccompAction::*;
    let errno = |default: u32| {
        i32::try_from(errno.unwrap_or(default))
            .map_err(|_| PlanError::Invalid(format!("seccomp errnoRet {errno:?}")))
    };
    Ok(match a {
        ScmpActAllow => ScmpAction::Allow,
        ScmpActKill | ScmpActKillThread => ScmpAction::KillThread,
        ScmpActKillProcess => ScmpAction::KillProcess,
        ScmpActTrap => ScmpAction::Trap,
        ScmpActLog => ScmpAction::Log,
        ScmpActErrno => ScmpAction::Errno(errno(DEFAULT_ERRNO)?),
        ScmpActTrace => ScmpAction::Trace(
            u16::try_from(errno(0)?)
                .map_err(|_| PlanError::Invalid("seccomp SCMP_ACT_TRACE data over 65535".into()))?,
        ),
        ScmpActNotify => {
            return Err(PlanError::Unsupported(
                "seccomp SCMP_ACT_NOTIFY (no listener in the guest)".into(),
            ))
        }
    })
}

/// The conditions of one rule; several rules when the profile tests one
/// argument twice (libseccomp cannot AND those: runc adds one rule per
/// condition).
fn conditions(rule: &LinuxSyscall) -> Result<Vec<Vec<ScmpArgCompare>>, PlanError> {
    let args = rule.args().as_deref().unwrap_or_default();
    let mut conds = Vec::with_capacity(args.len());
    for a in args {
        let index = u32::try_from(a.index())
            .ok()
            .filter(|&i| i <= 5)
            .ok_or_else(|| {
                PlanError::Invalid(format!("seccomp argument index {} (0-5)", a.index()))
            })?;
        let (op, datum) = match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, a.value()),
            LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, a.value()),
            LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, a.value()),
            LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, a.value()),
            LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, a.value()),
            LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, a.value()),
            // (arg & value) == valueTwo
            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                ScmpCompareOp::MaskedEqual(a.value()),
                a.value_two().unwrap_or(0),
            ),
        };
        conds.push((index, ScmpArgCompare::new(index, op, datum)));
    }
    let mut indices: Vec<u32> = conds.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    indices.dedup();
    Ok(if indices.len() == conds.len() {
        vec![conds.into_iter().map(|(_, c)| c).collect()]
    } else {
        conds.into_iter().map(|(_, c)| vec![c]).collect()
    })
}

/// libseccomp's errors, one line.
fn scmp(what: &str) -> impl Fn(libseccomp::error::SeccompError) -> PlanError + '_ {
    move |e| PlanError::Invalid(format!("seccomp profile: {what}: {e}"))
}

/// How many compiled profiles the agent keeps.
const CACHED_PROFILES: usize = 4;

/// Compiled profiles, the last used first. Compiling one is tens of ms
/// where guest kernel code is emulated (libseccomp's allocations fault
/// pages in), and a guest sees the same few again and again: `husk run`'s
/// default in every container (compiled ahead in a warm template, see
/// [`compile_ahead`]), a pod's containers, Docker's and Podman's default.
pub struct PlanCache {
    entries: Mutex<VecDeque<(LinuxSeccomp, Arc<SeccompPlan>)>>,
    capacity: usize,
}

impl PlanCache {
    /// An empty cache of `capacity` profiles.
    pub const fn new(capacity: usize) -> Self {
        PlanCache {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<(LinuxSeccomp, Arc<SeccompPlan>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`plan_seccomp`], answered from the cache when `s` is one of its
    /// profiles (compared whole); failures are not kept.
    pub fn plan(&self, s: &LinuxSeccomp) -> Result<Arc<SeccompPlan>, PlanError> {
        {
            let mut c = self.entries();
            if let Some(i) = c.iter().position(|(profile, _)| profile == s) {
                let hit = c.remove(i).expect("index from position");
                let plan = Arc::clone(&hit.1);
                c.push_front(hit);
                return Ok(plan);
            }
        }
        let plan = Arc::new(plan_seccomp(s)?);
        let mut c = self.entries();
        c.push_front((s.clone(), Arc::clone(&plan)));
        c.truncate(self.capacity);
        Ok(plan)
    }
}

static CACHE: PlanCache = PlanCache::new(CACHED_PROFILES);

/// [`plan_seccomp`] through the agent's [`PlanCache`].
pub fn plan_seccomp_cached(s: &LinuxSeccomp) -> Result<Arc<SeccompPlan>, PlanError> {
    CACHE.plan(s)
}

/// Compiles `s` into the cache now, before a create asks for it (the
/// guest agent does this for `husk run`'s default profile before it is
/// ready, so that warm templates hold the result).
pub fn compile_ahead(s: &LinuxSeccomp) -> Result<(), PlanError> {
    plan_seccomp_cached(s).map(drop)
}

/// Compiles `linux.seccomp`.
pub fn plan_seccomp(s: &LinuxSeccomp) -> Result<SeccompPlan, PlanError> {
    if let Some(archs) = s.architectures() {
        let ours = [Arch::ScmpArchNative, Arch::ScmpArchX86_64];
        if !archs.is_empty() && !archs.iter().any(|a| ours.contains(a)) {
            return Err(PlanError::Unsupported(
                "a seccomp profile without x86_64 among its architectures".into(),
            ));
        }
    }
    if s.listener_path().is_some() {
        return Err(PlanError::Unsupported("seccomp listenerPath".into()));
    }
    let mut flags = 0;
    for f in s.flags().as_deref().unwrap_or_default() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // One thread at install time: nothing to synchronise; and
            // WAIT_KILLABLE_RECV is about SCMP_ACT_NOTIFY, refused above.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    let default = action(s.default_action(), s.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(scmp("init"))?;
    ctx.set_ctl_optimize(OPTIMIZE_BINARY_TREE)
        .map_err(scmp("binary tree"))?;
    let mut rules = 0;
    for rule in s.syscalls().as_deref().unwrap_or_default() {
        let act = action(rule.action(), rule.errno_ret())?;
        let conds = conditions(rule)?;
        if act == default {
            continue;
        }
        for name in rule.names() {
            let Ok(nr) = ScmpSyscall::from_name(name) else {
                continue;
            };
            for c in &conds {
                ctx.add_rule_conditional(act, nr, c)
                    .map_err(|e| PlanError::Invalid(format!("seccomp rule for {name}: {e}")))?;
                rules += 1;
            }
        }
    }
    if rules == 0 && matches!(default, ScmpAction::Allow) {
        return Ok(SeccompPlan {
            filter: None,
            flags,
        });
    }
    let filter = export(&ctx)?;
    if filter.len() > BPF_MAXINSNS {
        return Err(PlanError::Unsupported(format!(
            "a seccomp profile this large ({} BPF instructions, at most {BPF_MAXINSNS})",
            filter.len()
        )));
    }
    Ok(SeccompPlan {
        filter: Some(filter),
        flags,
    })
}

/// The filter's BPF program, exported through a memfd (libseccomp 2.5
/// writes it to a descriptor).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<SockFilter>, PlanError> {
    let io = |e: io::Error| PlanError::Invalid(format!("seccomp profile: export: {e}"));
    // SAFETY: a plain system call with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"husk-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    ctx.export_bpf(&file).map_err(scmp("export"))?;
    let mut bytes = Vec::new();
    file.rewind().map_err(io)?;
    file.read_to_end(&mut bytes).map_err(io)?;
    SockFilter::parse(&bytes)
        .ok_or_else(|| PlanError::Invalid("seccomp profile: export: a partial instruction".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn profile(v: Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    /// Runs `check` in a forked child with `plan` installed (after
    /// no_new_privs, so no capability is needed); its exit code.
    fn in_child(plan: &SeccompPlan, check: fn() -> i32) -> i32 {
        // SAFETY: the child makes raw system calls only and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match sys::set_no_new_privs().and_then(|()| plan.install()) {
                Err(e) => 100 + e.raw_os_error().unwrap_or(0),
                Ok(()) => check(),
            };
            // SAFETY: ends the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// A raw system call with two integer arguments: its value, or minus
    /// its errno.
    fn errno_or_value(nr: libc::c_long, a: i64, b: i64) -> i64 {
        // SAFETY: the calls the tests make take integers only.
        let rc = unsafe { libc::syscall(nr, a, b) };
        if rc < 0 {
            -i64::from(io::Error::last_os_error().raw_os_error().unwrap_or(1))
        } else {
            rc
        }
    }

    /// A profile refusing `name` with EPERM.
    fn refusing(name: &str) -> LinuxSeccomp {
        profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": [name], "action": "SCMP_ACT_ERRNO"}]
        }))
    }

    #[test]
    fn the_cache_answers_a_profile_seen_again_and_keeps_the_last_ones() {
        let cache = PlanCache::new(2);
        let a = cache.plan(&refusing("mkdir")).unwrap();
        // The same profile, deserialized again: the same compiled plan.
        let again = cache.plan(&refusing("mkdir")).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let b = cache.plan(&refusing("rmdir")).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_ne!(a.filter, b.filter);
        // A third profile evicts the least recently used one, "mkdir".
        assert!(Arc::ptr_eq(&b, &cache.plan(&refusing("rmdir")).unwrap()));
        cache.plan(&refusing("chdir")).unwrap();
        let a2 = cache.plan(&refusing("mkdir")).unwrap();
        assert!(!Arc::ptr_eq(&a, &a2), "evicted, compiled again");
        assert_eq!(a.filter, a2.filter);
        // A failing profile is not kept, and fails again.
        let bad = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        }));
        assert!(cache.plan(&bad).is_err());
        assert!(cache.plan(&bad).is_err());
        assert_eq!(cache.entries().len(), 2);
    }

    #[test]
    fn husk_runs_default_profile_compiles() {
        let p = husk_proto::default_seccomp::profile().unwrap();
        compile_ahead(&p).unwrap();
        let plan = plan_seccomp_cached(&p).unwrap();
        assert_eq!(plan.filter_count(), 1);
    }

    #[test]
    fn a_profile_becomes_one_filter() {
        let p = plan_seccomp(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "clock_gettime64"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
                {"names": ["getgid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
                {"names": ["uname"], "action": "SCMP_ACT_LOG"},
                // the default action: left out
                {"names": ["getpid"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["no_such_call"], "action": "SCMP_ACT_ALLOW"},
            ],
        })))
        .unwrap();
        assert_eq!(p.filter_count(), 1);
        let allow_all = plan_seccomp(&profile(json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]})))
        .unwrap();
        assert_eq!(allow_all.filter_count(), 0);
    }

    #[test]
    fn profiles_the_guest_cannot_honour_are_refused() {
        for (p, want) in [
            (
                json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
                "SCMP_ACT_NOTIFY",
            ),
            (
                json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_AARCH64"]}),
                "x86_64",
            ),
            (
                json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                    "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}),
                "index 6",
            ),
        ] {
            let e = plan_seccomp(&profile(p)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    /// Runs a classic BPF seccomp program on (nr, args) as the kernel
    /// would: its return value and the number of instructions it ran.
    fn run_bpf(prog: &[SockFilter], nr: u32, args: [u64; 6]) -> (u32, usize) {
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => 0xc000_003e, // AUDIT_ARCH_X86_64
                8 | 12 => 0,
                16..=63 if off % 4 == 0 => {
                    let a = args[(off as usize - 16) / 8];
                    if off % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                _ => panic!("load at {off}"),
            }
        };
        let (mut acc, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = prog[pc];
            steps += 1;
            pc += 1;
            let jump = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match i.code {
                0x20 => acc = word(i.k),            // ld [k]
                0x54 => acc &= i.k,                 // and #k
                0x05 => pc += i.k as usize,         // ja
                0x15 => pc += jump(acc == i.k),     // jeq
                0x25 => pc += jump(acc > i.k),      // jgt
                0x35 => pc += jump(acc >= i.k),     // jge
                0x45 => pc += jump(acc & i.k != 0), // jset
                0x06 => return (i.k, steps),        // ret #k
                c => panic!("BPF opcode {c:#x} at {}", pc - 1),
            }
        }
    }

    #[test]
    fn a_long_allow_list_is_a_tree_with_the_same_answers() {
        // Every x86_64 call but five, plus an argument rule: what Docker's
        // and Podman's default profiles look like.
        let refused = ["ptrace", "mount", "reboot", "kexec_load", "init_module"];
        let names: Vec<String> = (0..460)
            .filter_map(|nr| ScmpSyscall::from(nr).get_name().ok())
            .filter(|n| !refused.contains(&n.as_str()) && n != "personality")
            .collect();
        assert!(names.len() > 300, "{}", names.len());
        let p = plan_seccomp(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": names, "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            ],
        })))
        .unwrap();
        let prog = p.filter.as_deref().unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let mut longest = 0;
        for nr in 0..460u32 {
            let name = ScmpSyscall::from(nr as i32).get_name().unwrap_or_default();
            let (ret, steps) = run_bpf(prog, nr, [0; 6]);
            longest = longest.max(steps);
            let want = if names.contains(&name) { allow } else { eperm };
            assert_eq!(ret, want, "{name} ({nr})");
        }
        let personality = libc::SYS_personality as u32;
        assert_eq!(run_bpf(prog, personality, [8, 0, 0, 0, 0, 0]).0, allow);
        assert_eq!(run_bpf(prog, personality, [9, 0, 0, 0, 0, 0]).0, eperm);
        assert_eq!(
            run_bpf(prog, personality, [8 | 1 << 32, 0, 0, 0, 0, 0]).0,
            eperm
        );
        // A linear chain walks up to two instructions per listed call (~700).
        assert!(longest < 40, "{longest} instructions on the longest path");
    }

    #[test]
    fn two_actions_that_refuse_seccomp_are_one_filter() {
        // The default refuses seccomp(2), and so does a KILL rule: stacked
        // filters could not be installed in any order; one filter can.
        let p = plan_seccomp(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["exit", "exit_group", "getppid"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["seccomp"], "action": "SCMP_ACT_KILL",
                 "args": [{"index": 0, "value": 9, "op": "SCMP_CMP_EQ"}]},
            ],
        })))
        .unwrap();
        let code = in_child(&p, || {
            let ok = errno_or_value(libc::SYS_getppid, 0, 0) > 0
                && errno_or_value(libc::SYS_seccomp, 1, 0) == -libc::EPERM as i64;
            i32::from(!ok)
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn default_deny_rules_and_argument_conditions_hold() {
        let p = plan_seccomp(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": libc::EPERM,
            "syscalls": [
                {"names": ["exit", "exit_group", "getppid", "rt_sigreturn"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EOPNOTSUPP},
                // kill only with signal 0
                {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
                // umask only when (mask & 0o077) == 0o022
                {"names": ["umask"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0o077, "valueTwo": 0o022, "op": "SCMP_CMP_MASKED_EQ"}]},
                // an unconditional rule wins over a conditional one for the same call
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 7, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
            ],
        })))
        .unwrap();
        let code = in_child(&p, || {
            let parent = errno_or_value(libc::SYS_getppid, 0, 0);
            let checks = [
                parent > 0,
                errno_or_value(libc::SYS_getgid, 0, 0) == -libc::EPERM as i64,
                errno_or_value(libc::SYS_getuid, 0, 0) == -libc::EOPNOTSUPP as i64,
                errno_or_value(libc::SYS_kill, parent, 0) == 0,
                errno_or_value(libc::SYS_kill, parent, libc::SIGCONT as i64) == -libc::EPERM as i64,
                errno_or_value(libc::SYS_umask, 0o022, 0) >= 0,
                errno_or_value(libc::SYS_umask, 0o027, 0) == -libc::EPERM as i64,
                errno_or_value(libc::SYS_getpid, 1, 0) > 0,
            ];
            checks.iter().position(|ok| !ok).map_or(0, |i| i as i32 + 1)
        });
        assert_eq!(code, 0, "check {code} failed (100 + errno: install failed)");
    }

    #[test]
    fn of_two_rules_for_one_call_the_first_holds_as_under_runc() {
        for (first, second, want) in [
            ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", 0),
            ("SCMP_ACT_ERRNO", "SCMP_ACT_ALLOW", 95),
        ] {
            let p = plan_seccomp(&profile(json!({
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                    {"names": ["exit", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["getuid"], "action": first, "errnoRet": 95},
                    {"names": ["getuid"], "action": second, "errnoRet": 95},
                ],
            })))
            .unwrap();
            let code = in_child(&p, || {
                let e = -errno_or_value(libc::SYS_getuid, 0, 0);
                i32::try_from(e.max(0)).unwrap_or(99)
            });
            assert_eq!(code, want, "{first} then {second}");
        }
    }
}
