//! `husk vm --config FILE`: the JSON VM config, parsed and validated. Any
//! input must give a config or one error, never a panic; a config that
//! passes must also give a consistent device count.
#![no_main]

use husk_vmm::config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = VmConfig::from_json(text) {
        assert_eq!(
            cfg.virtio_device_count(),
            cfg.disks.len() + cfg.net.len() + usize::from(cfg.vsock.is_some()) + cfg.fs.len()
        );
        let _ = cfg.validate();
    }
});
