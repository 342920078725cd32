//! /dev/kvm: open it, check the capabilities husk needs, and detect the
//! PVM flavour (kvm_pvm) that needs guest-side workarounds.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Errors opening or probing KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm is missing or not accessible.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability husk needs is missing.
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
}

const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "IRQCHIP"),
    (Cap::Ioeventfd, "IOEVENTFD"),
    (Cap::Irqfd, "IRQFD"),
    (Cap::UserMemory, "USER_MEMORY"),
    (Cap::SetTssAddr, "SET_TSS_ADDR"),
    (Cap::Pit2, "PIT2"),
];

/// An open, checked /dev/kvm.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// True when /dev/kvm is served by the kvm_pvm module (no VT-x/SVM; guest
/// kernel code is emulated, see the guest kernel's README).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
