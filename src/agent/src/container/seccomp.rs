//! `linux.seccomp` -> BPF filters, compiled by seccompiler before the fork
//! and installed by the container's process (and each exec'd process)
//! before it execs, as runc does.
//!
//! seccompiler's filters have one action for a match and one for a
//! mismatch, while an OCI profile has a default action and any number of
//! per-rule actions. The profile becomes a stack of filters; the kernel runs
//! every filter and keeps the most restrictive answer (`ALLOW` is the
//! least), so:
//! - the base filter answers `ALLOW` for any syscall some rule matches and
//!   the default action otherwise (left out when the default is `ALLOW`);
//! - one filter per other (action, errno) answers that action for the
//!   rules that have it and `ALLOW` otherwise.
//!
//! A syscall no rule matches gets the default action; one that a rule
//! matches gets that rule's action. Filters are installed one by one, so
//! the one that may refuse seccomp(2) goes last (a profile where two would
//! is refused). Names this architecture does not have
//! (profiles list the 32-bit ones too) are skipped, as libseccomp does.

use std::collections::{BTreeMap, HashMap};
use std::io;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
    LinuxSyscall,
};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

use super::plan::PlanError;
use crate::sys;

/// The kernel's limit on one filter's length.
const BPF_MAXINSNS: usize = 4096;

/// The system call that installs filters.
const SECCOMP: &str = "seccomp";

/// The errno `SCMP_ACT_ERRNO` returns when the profile names none.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// A profile ready to install: filters in installation order, and the
/// `seccomp(2)` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompPlan {
    filters: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

impl SeccompPlan {
    /// Number of filters the profile became.
    pub fn filter_count(&self) -> usize {
        self.filters.len()
    }

    /// Installs every filter on the calling thread. Without no_new_privs the
    /// caller needs CAP_SYS_ADMIN, so the container's process calls this
    /// before it drops capabilities (runc's order).
    pub fn install(&self) -> io::Result<()> {
        self.filters
            .iter()
            .try_for_each(|f| sys::seccomp_set_filter(f, self.flags))
    }
}

/// One action as seccompiler's JSON spells it, or `None` for `ALLOW`.
fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Option<Value>, PlanError> {
    use LinuxSeccompAction::*;
    Ok(Some(match a {
        ScmpActAllow => return Ok(None),
        ScmpActKill | ScmpActKillThread => json!("kill_thread"),
        ScmpActKillProcess => json!("kill_process"),
        ScmpActTrap => json!("trap"),
        ScmpActLog => json!("log"),
        ScmpActErrno => json!({ "errno": errno.unwrap_or(DEFAULT_ERRNO) }),
        ScmpActTrace => json!({ "trace": errno.unwrap_or(0) }),
        ScmpActNotify => {
            return Err(PlanError::Unsupported(
                "seccomp SCMP_ACT_NOTIFY (no listener in the guest)".into(),
            ))
        }
    }))
}

/// The conditions of one rule as seccompiler JSON; several rules when the
/// profile tests one argument twice (libseccomp cannot AND those either:
/// runc adds one rule per condition).
fn conditions(rule: &LinuxSyscall) -> Result<Vec<Vec<Value>>, PlanError> {
    let args = rule.args().as_deref().unwrap_or_default();
    let mut conds = Vec::with_capacity(args.len());
    for a in args {
        if a.index() > 5 {
            return Err(PlanError::Invalid(format!(
                "seccomp argument index {} (0-5)",
                a.index()
            )));
        }
        let (op, val) = match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
            LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
            LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
            LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
            LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
            LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
            // (arg & value) == valueTwo
            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                json!({ "masked_eq": a.value() }),
                a.value_two().unwrap_or(0),
            ),
        };
        conds.push((
            a.index(),
            json!({ "index": a.index(), "type": "qword", "op": op, "val": val }),
        ));
    }
    let mut indices: Vec<usize> = conds.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    indices.dedup();
    Ok(if indices.len() == conds.len() {
        vec![conds.into_iter().map(|(_, c)| c).collect()]
    } else {
        conds.into_iter().map(|(_, c)| vec![c]).collect()
    })
}

/// Rules by syscall name: `None` matches every call of it.
type RuleSet = BTreeMap<String, Option<Vec<Vec<Value>>>>;

fn add_rules(set: &mut RuleSet, name: &str, rules: &[Vec<Value>]) {
    let entry = set
        .entry(name.to_owned())
        .or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), rules.iter().any(Vec::is_empty)) {
        (None, _) => {}
        (Some(_), true) => *entry = None,
        (Some(list), false) => list.extend(rules.iter().cloned()),
    }
}

fn filter_json(set: &RuleSet, mismatch: &Value, matched: &Value) -> Value {
    let mut rules = Vec::new();
    for (name, conds) in set {
        match conds {
            None => rules.push(json!({ "syscall": name })),
            Some(list) => rules.extend(
                list.iter()
                    .map(|args| json!({ "syscall": name, "args": args })),
            ),
        }
    }
    json!({ "mismatch_action": mismatch, "match_action": matched, "filter": rules })
}

/// Whether seccompiler knows `name` on this architecture.
fn known(name: &str, cache: &mut HashMap<String, bool>) -> bool {
    if let Some(&k) = cache.get(name) {
        return k;
    }
    let probe = json!({ "p": { "mismatch_action": "allow", "match_action": "trap",
        "filter": [{ "syscall": name }] } });
    let k = seccompiler::compile_from_json(probe.to_string().as_bytes(), arch()).is_ok();
    cache.insert(name.to_owned(), k);
    k
}

fn arch() -> TargetArch {
    TargetArch::x86_64
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

    // Every rule goes to the base filter; the non-ALLOW ones also to their
    // action's filter (keyed by the action's JSON text).
    let mut any_rule = RuleSet::new();
    let mut by_action: BTreeMap<String, (Value, RuleSet)> = BTreeMap::new();
    let mut names = HashMap::new();
    for rule in s.syscalls().as_deref().unwrap_or_default() {
        let act = action(rule.action(), rule.errno_ret())?;
        let conds = conditions(rule)?;
        for name in rule.names() {
            if !known(name, &mut names) {
                continue;
            }
            add_rules(&mut any_rule, name, &conds);
            if let Some(a) = &act {
                let (_, set) = by_action
                    .entry(a.to_string())
                    .or_insert_with(|| (a.clone(), RuleSet::new()));
                add_rules(set, name, &conds);
            }
        }
    }

    // Each filter installed after the first goes through the ones already
    // installed, so a filter that may refuse seccomp(2) itself must be the
    // last one: the base filter unless a rule allows seccomp outright, an
    // action filter if it has a seccomp rule (LOG lets it through).
    let allow = json!("allow");
    let mut doc = serde_json::Map::new();
    let (mut order, mut blocking) = (Vec::new(), Vec::new());
    if let Some(d) = &default {
        // With no rules at all this is the default alone (an empty rule map
        // is a valid filter: the architecture check, then `d`).
        doc.insert("0-base".to_owned(), filter_json(&any_rule, d, &allow));
        let blocks = !matches!(any_rule.get(SECCOMP), Some(None));
        (if blocks { &mut blocking } else { &mut order }).push("0-base".to_owned());
    }
    for (i, (act, set)) in by_action.values().enumerate() {
        let name = format!("{}-action", i + 1);
        doc.insert(name.clone(), filter_json(set, &allow, act));
        let blocks = set.contains_key(SECCOMP) && *act != json!("log");
        (if blocks { &mut blocking } else { &mut order }).push(name);
    }
    if blocking.len() > 1 {
        return Err(PlanError::Unsupported(
            "a seccomp profile that refuses seccomp(2) under more than one action".into(),
        ));
    }
    order.append(&mut blocking);
    let mut compiled =
        seccompiler::compile_from_json(Value::Object(doc).to_string().as_bytes(), arch())
            .map_err(|e| PlanError::Invalid(format!("seccomp profile: {e}")))?;
    let filters: Vec<BpfProgram> = order
        .iter()
        .map(|n| compiled.remove(n).unwrap_or_default())
        .collect();
    if let Some(f) = filters.iter().find(|f| f.len() > BPF_MAXINSNS) {
        return Err(PlanError::Unsupported(format!(
            "a seccomp profile this large ({} BPF instructions in one filter, at most {BPF_MAXINSNS})",
            f.len()
        )));
    }
    Ok(SeccompPlan { filters, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_profile_becomes_one_filter_per_action() {
        let p = plan_seccomp(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "clock_gettime64"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
                {"names": ["getgid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
                {"names": ["uname"], "action": "SCMP_ACT_LOG"},
            ],
        })))
        .unwrap();
        // base + errno 95 + log
        assert_eq!(p.filter_count(), 3);
        let allow_all = plan_seccomp(&profile(json!({"defaultAction": "SCMP_ACT_ALLOW"}))).unwrap();
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
                // The default refuses seccomp(2) and so may the KILL rule.
                json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["seccomp"],
                    "action": "SCMP_ACT_KILL", "args": [{"index": 0, "value": 9, "op": "SCMP_CMP_EQ"}]}]}),
                "more than one action",
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
}
