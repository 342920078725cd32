//! A bundle's config.json, as the OCI runtime reads it at `create`: parsed
//! (size-capped), its root found, the root mode chosen from its
//! annotations, and the spec planned for the guest (bind mounts of host
//! files and directories, namespaces, hooks dropped). The bundle holds an
//! empty `rootfs` dir and a small `file`, which relative bind sources may
//! name. Any input must give a plan or one error, never a panic.
#![no_main]

use std::path::PathBuf;

use husk_runtime::runc::bundle::{guest_spec, load};
use husk_runtime::runc::create::root_mode;
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-fuzz-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("rootfs")).unwrap();
    std::fs::write(d.join("file"), b"nameserver 127.0.0.1\n").unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static DIR: PathBuf = scratch());
    let dir = DIR.with(|d| d.clone());
    std::fs::write(dir.join("config.json"), data).unwrap();
    let Ok(bundle) = load(&dir) else {
        return;
    };
    let _ = root_mode(&bundle.spec);
    for console_socket in [false, true] {
        if let Ok(plan) = guest_spec(&bundle, console_socket) {
            assert!(plan.spec.hooks().is_none(), "hooks reach the guest");
        }
    }
});
