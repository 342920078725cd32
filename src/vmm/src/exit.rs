//! Why a VM stopped, and the process exit code each reason maps to.

use std::fmt;

/// Exit codes of `husk vm` (documented in the README).
pub mod code {
    /// The guest shut down or rebooted (i8042 reset, KVM system event).
    pub const GUEST_SHUTDOWN: i32 = 0;
    /// husk's own error (bad config, missing kernel, KVM setup failure).
    pub const HUSK_ERROR: i32 = 1;
    /// Command-line usage error (from the argument parser).
    pub const USAGE: i32 = 2;
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    pub const TRIPLE_FAULT: i32 = 3;
    /// KVM reported an internal or emulation error, or failed to enter the guest.
    pub const KVM_INTERNAL: i32 = 4;
    /// The guest made the VM exit in a way husk does not handle.
    pub const UNEXPECTED_EXIT: i32 = 5;
    /// The VMM was asked to stop by a signal (SIGINT/SIGTERM/SIGHUP).
    pub const KILLED: i32 = 6;
}

/// The reason a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 pulse, KVM reset event).
    GuestReset,
    /// The guest powered off (KVM shutdown system event) or halted for good.
    GuestShutdown,
    /// A vCPU triple-faulted.
    TripleFault {
        /// vCPU index.
        vcpu: u8,
    },
    /// KVM_EXIT_INTERNAL_ERROR: usually an instruction KVM cannot emulate.
    InternalError {
        /// vCPU index.
        vcpu: u8,
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
        /// Guest RIP at the failure.
        rip: u64,
        /// Up to 16 bytes at RIP, when they could be read.
        insn: Vec<u8>,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// Any other exit husk does not handle.
    Unexpected {
        /// vCPU index.
        vcpu: u8,
        /// Description of the exit.
        what: String,
    },
    /// A KVM_RUN failure or other VMM-side error.
    VmmError(String),
    /// The VMM was told to stop by a signal.
    Killed(i32),
    /// Stopped through the control socket.
    Stopped,
}

impl VmExit {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestShutdown | VmExit::Stopped => code::GUEST_SHUTDOWN,
            VmExit::TripleFault { .. } => code::TRIPLE_FAULT,
            VmExit::InternalError { .. } | VmExit::FailEntry { .. } => code::KVM_INTERNAL,
            VmExit::Unexpected { .. } => code::UNEXPECTED_EXIT,
            VmExit::VmmError(_) => code::HUSK_ERROR,
            VmExit::Killed(_) => code::KILLED,
        }
    }

    /// True for the normal end of a guest.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == code::GUEST_SHUTDOWN
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset"),
            VmExit::GuestShutdown => write!(f, "guest shutdown"),
            VmExit::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            VmExit::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
            } => {
                write!(
                    f,
                    "KVM internal error on vCPU {vcpu}: exit reason KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{}, RIP {rip:#x}",
                    if *suberror == 1 { " (emulation failure)" } else { "" }
                )?;
                if !insn.is_empty() {
                    write!(f, ", bytes at RIP:")?;
                    for b in insn {
                        write!(f, " {b:02x}")?;
                    }
                }
                Ok(())
            }
            VmExit::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM_EXIT_FAIL_ENTRY on vCPU {vcpu}: hardware reason {reason:#x}"
                )
            }
            VmExit::Unexpected { vcpu, what } => {
                write!(f, "unexpected VM exit on vCPU {vcpu}: {what}")
            }
            VmExit::VmmError(e) => write!(f, "{e}"),
            VmExit::Killed(sig) => write!(f, "stopped by signal {sig}"),
            VmExit::Stopped => write!(f, "stopped through the API socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_per_class() {
        let all = [
            VmExit::GuestReset.exit_code(),
            VmExit::TripleFault { vcpu: 0 }.exit_code(),
            VmExit::InternalError {
                vcpu: 0,
                suberror: 1,
                rip: 0,
                insn: vec![],
            }
            .exit_code(),
            VmExit::Unexpected {
                vcpu: 0,
                what: String::new(),
            }
            .exit_code(),
            VmExit::VmmError(String::new()).exit_code(),
            VmExit::Killed(15).exit_code(),
        ];
        let mut sorted = all.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
        assert_eq!(VmExit::GuestShutdown.exit_code(), code::GUEST_SHUTDOWN);
    }

    #[test]
    fn internal_error_line_has_reason_suberror_rip_and_bytes() {
        let e = VmExit::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            insn: vec![0x0f, 0xae, 0x2f],
        };
        let s = e.to_string();
        assert!(s.contains("KVM_EXIT_INTERNAL_ERROR"));
        assert!(s.contains("suberror 1"));
        assert!(s.contains("RIP 0xffffffff81000000"));
        assert!(s.contains("0f ae 2f"));
        assert!(!s.contains('\n'));
    }
}
