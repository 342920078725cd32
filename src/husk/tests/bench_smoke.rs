//! `husk bench all --runs 1 --count 2` and `husk bench boot
//! --baseline-kernel`, as a user runs them: they complete against the real
//! peers, write JSON holding every sample (and two PNG charts that
//! decode). Nothing about speed is asserted.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::{boot_timeout, husk, kernel, run_with_timeout};

struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Decodes the whole image; its size.
fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert!(buf.iter().any(|&b| b != 255), "{} is blank", path.display());
    (info.width, info.height)
}

/// Every peer is measured or named as skipped, with a reason.
fn accounted(doc: &Value, list: &str, names: &[&str]) {
    let measured: Vec<&str> = doc[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let skipped = doc["skipped"].as_array().unwrap();
    for n in names {
        let why = skipped
            .iter()
            .find(|s| s["name"] == *n)
            .and_then(|s| s["why"].as_str());
        assert!(
            measured.contains(n) || why.is_some_and(|w| !w.is_empty()),
            "{n} is neither measured nor skipped: {doc}"
        );
    }
}

#[test]
fn bench_all_writes_json_and_charts() {
    let dir =
        Scratch(std::env::temp_dir().join(format!("husk-bench-smoke-{}", std::process::id())));
    let out = dir.0.join("out");
    let mut c = husk();
    c.args(["bench", "all", "--runs", "1", "--count", "2", "--kernel"])
        .arg(kernel())
        .arg("--timeout")
        .arg(boot_timeout().as_secs().to_string())
        .arg("--out")
        .arg(&out);
    // Startup: 4 husk runs + QEMU (and 2 template builds); density: 2 x 4
    // husk containers + 2 QEMU VMs.
    let o = run_with_timeout(c, None, boot_timeout() * 12 + Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}\n{stdout}\n{stderr}", o.status);
    assert!(
        stdout.contains("startup:") && stdout.contains("density:"),
        "{stdout}"
    );

    let s = json(&out.join("startup.json"));
    accounted(
        &s,
        "series",
        &[
            "husk",
            "husk-warm",
            "husk-share",
            "husk-share-warm",
            "husk-console",
            "runc",
            "crun",
            "qemu",
            "agent-native",
        ],
    );
    let series = s["series"].as_array().unwrap();
    for x in series {
        let stages = x["stages"].as_array().unwrap().len();
        let samples = x["samples_ms"].as_array().unwrap();
        assert_eq!(samples.len(), 1, "{x}");
        assert_eq!(samples[0].as_array().unwrap().len(), stages, "{x}");
        assert!(x["totals_s"][0].as_f64().unwrap() > 0.0, "{x}");
    }
    // The warm runs were restored: they have no guest-kernel stage.
    for name in ["husk-warm", "husk-share-warm"] {
        let warm = series.iter().find(|x| x["name"] == name).unwrap();
        assert_eq!(warm["samples_ms"][0][1].as_f64(), Some(0.0), "{warm}");
    }
    let husk = series.iter().find(|x| x["name"] == "husk").unwrap();
    // The stages add up to the total (each stage is measured, none missing).
    let sum: f64 = husk["samples_ms"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().expect("a husk stage is missing"))
        .sum();
    let total_ms = husk["totals_s"][0].as_f64().unwrap() * 1e3;
    assert!(
        sum <= total_ms && sum > total_ms * 0.9,
        "{sum} vs {total_ms}"
    );

    let d = json(&out.join("density.json"));
    accounted(
        &d,
        "curves",
        &[
            "husk",
            "husk-template",
            "husk-share",
            "husk-share-template",
            "runc",
            "crun",
            "qemu",
        ],
    );
    for curve in d["curves"].as_array().unwrap() {
        let points = curve["points"].as_array().unwrap();
        assert_eq!(points.len(), 2, "{curve}");
        assert!(points[1]["pss_mib"].as_f64().unwrap() > 0.0, "{curve}");
        assert!(
            curve["kernel_mib_per_container"].as_f64().is_some(),
            "{curve}"
        );
    }

    assert_eq!(png_size(&out.join("startup.png")), (1200, 700));
    assert_eq!(png_size(&out.join("density.png")), (1200, 700));
    // Nothing is left running: the containers and VMs were stopped.
    for needle in ["husk-density-", "/husk-bench-"] {
        assert_eq!(support::pids_naming(needle), Vec::<i32>::new(), "{needle}");
    }
}

/// `husk bench boot --baseline-kernel`: husk on both kernels and QEMU in
/// one run, the extra words on every guest's command line, and every
/// sample in the JSON. The same kernel serves as both, so nothing about
/// speed is (or could be) asserted.
#[test]
fn bench_boot_against_a_baseline_kernel() {
    let dir = Scratch(std::env::temp_dir().join(format!("husk-bench-boot-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let out = dir.0.join("boot.json");
    let mut c = husk();
    c.args([
        "bench", "boot", "--runs", "1", "--extra", "quiet", "--kernel",
    ])
    .arg(kernel())
    .arg("--baseline-kernel")
    .arg(kernel())
    .arg("--timeout")
    .arg(boot_timeout().as_secs().to_string())
    .arg("--json")
    .arg(&out);
    let o = run_with_timeout(c, None, boot_timeout() * 3 + Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{stdout}", o.status);
    assert!(stdout.contains("new/baseline"), "{stdout}");
    assert!(stdout.contains(" quiet"), "{stdout}");
    let doc = json(&out);
    assert!(
        doc["cmdline"].as_str().unwrap().ends_with(" quiet"),
        "{doc}"
    );
    for series in ["husk", "qemu_microvm", "husk_baseline"] {
        let s = doc[series].as_array().unwrap();
        assert_eq!(s.len(), 1, "{series}: {doc}");
        assert!(s[0]["wall_to_marker_s"].as_f64().unwrap() > 0.0, "{doc}");
        assert!(s[0]["guest_uptime_s"].as_f64().unwrap() > 0.0, "{doc}");
    }
    for series in ["husk", "husk_baseline"] {
        let first = doc[series][0]["start_to_first_kvm_run_us"].as_u64();
        assert!(first.is_some_and(|us| us > 0), "{series}: {doc}");
    }

    // A baseline that is not there: one line, before anything boots.
    let mut c = husk();
    c.args([
        "bench",
        "boot",
        "--baseline-kernel",
        "/nonexistent/vmlinux",
        "--kernel",
    ])
    .arg(kernel());
    let o = run_with_timeout(c, None, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
}
