//! `husk bench profile --container`: where a container's start spends its
//! time in the guest. Runs `husk run --timing` of a command in a busybox
//! root with the guest's instruction pointer sampled (`HUSK_PROFILE`),
//! then splits the samples by the run's own stages (first KVM_RUN, agent
//! ready, created, exec, exit, teardown) and lists the busiest guest
//! functions in each: on kvm_pvm hosts every guest kernel function is
//! emulated, so this is where a container path's cost shows.

use std::path::Path;

use super::profile::{parse_samples, ProfileArgs, Report, Symbols};
use super::startup::HuskRun;
use crate::run::TIMING_KEYS;

/// Runs the profile and prints it.
pub fn profile(
    a: &ProfileArgs,
    kernel: &Path,
    agent: &Path,
    symbols: &Symbols,
) -> Result<i32, String> {
    let tmp = std::env::temp_dir().join(format!("husk-profile-run-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = profile_in(a, kernel, agent, symbols, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn profile_in(
    a: &ProfileArgs,
    kernel: &Path,
    agent: &Path,
    symbols: &Symbols,
    tmp: &Path,
) -> Result<i32, String> {
    let rootfs = super::peers::busybox_tree(tmp, &a.busybox)?;
    let samples_file = tmp.join("samples");
    let args: Vec<&str> = a.cmd.split_whitespace().collect();
    if args.is_empty() {
        return Err("--cmd is empty".into());
    }
    let mut run = HuskRun {
        timeout: a.timeout,
        kernel,
        agent,
        rootfs: &rootfs,
        share: false,
        warm: !a.no_template,
        args: &args,
        profile: None,
    };
    // What a first run builds once (the root image, the template) is not
    // what is profiled.
    run.once()?;
    run.profile = Some((&samples_file, a.hz));
    let timing = run.once()?;
    let (wall, stages, start_ns) = (timing.wall, timing.stages, timing.start_ns);
    let text = std::fs::read_to_string(&samples_file)
        .map_err(|e| format!("no samples ({}): {e}", samples_file.display()))?;
    let samples = parse_samples(&text)?;
    println!(
        "profile of `husk run {}-- {}` ({}): kernel {}, {} Hz, {wall:.2} s wall",
        if a.no_template { "--no-template " } else { "" },
        a.cmd,
        if a.no_template {
            "booted"
        } else {
            "restored from the warm template"
        },
        kernel.display(),
        a.hz
    );
    if let Some(setup) = &timing.setup {
        println!("the agent's steps creating the container (ms each, guest clock):\n{setup}");
    }
    println!("stages from `husk run --timing` (the agent's stamps on the host clock)");
    for (name, window) in TIMING_KEYS.iter().zip(windows(start_ns, &stages)) {
        let inside: Vec<(u64, u64)> = samples
            .iter()
            .copied()
            .filter(|(ns, _)| window.contains(ns))
            .collect();
        let ms = (window.end - window.start) as f64 / 1e6;
        println!("\n== {name}: {ms:.1} ms, {} samples", inside.len());
        if !inside.is_empty() {
            Report::new(&inside, symbols, a.bucket).print_top(a.top);
        }
    }
    Ok(0)
}

/// The stages (ms, in order) as CLOCK_MONOTONIC windows from `start_ns`.
fn windows(start_ns: u64, stages_ms: &[f64]) -> Vec<std::ops::Range<u64>> {
    let mut at = start_ns;
    stages_ms
        .iter()
        .map(|ms| {
            let len = if ms.is_finite() && *ms > 0.0 {
                (ms * 1e6) as u64
            } else {
                0
            };
            let w = at..at + len;
            at += len;
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_become_back_to_back_windows() {
        let w = windows(1_000, &[1.0, f64::NAN, 0.5]);
        assert_eq!(
            w,
            vec![1_000..1_001_000, 1_001_000..1_001_000, 1_001_000..1_501_000]
        );
    }
}
