//! `husk pull`, `images`, `rmi`, `image prune|inspect`, `login` against a
//! real registry (Debian's docker-registry on 127.0.0.1: anonymous,
//! htpasswd basic auth, and bearer tokens from a test token server), OCI
//! layouts and archives made by umoci and skopeo, and hostile input. No
//! VM: these check the store.

mod image_support;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use image_support::*;
use support::husk;

fn husk_in(root: &Path, args: &[&str]) -> Output {
    husk()
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("REGISTRY_AUTH_FILE")
        .env("HOME", root)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit 125 with a single line on stderr containing `needle`.
fn fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}

fn inspect(reference: &str) -> serde_json::Value {
    let out = sh(Command::new("skopeo").args(["inspect", "--tls-verify=false", reference]));
    serde_json::from_str(&out).unwrap()
}

fn record(root: &Path, name: &str) -> serde_json::Value {
    let out = ok(&husk_in(root, &["images", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| r["reference"] == name)
        .unwrap_or_else(|| panic!("{name} not in {out}"))
        .clone()
}

fn assert_matches_skopeo(rec: &serde_json::Value, skopeo: &serde_json::Value) {
    assert_eq!(rec["manifest_digest"], skopeo["Digest"]);
    assert_eq!(rec["layers"], skopeo["Layers"]);
}

#[test]
fn registry_pulls_anonymous_basic_and_bearer() {
    let dir = tmpdir("registry");
    let (root, storage, layout) = (dir.join("root"), dir.join("storage"), dir.join("layout"));
    test_image(&layout, "v1");
    let plain = Registry::start(&dir, &storage, Auth::None);
    let src = format!("oci:{}:v1", layout.display());
    let name = format!("{}/test/busybox:v1", plain.addr);
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &src,
        &format!("docker://{name}"),
    ]));

    // Anonymous, by tag then by digest.
    let out = ok(&husk_in(&root, &["pull", "-q", &name]));
    assert_eq!(out.trim(), name);
    let skopeo = inspect(&format!("docker://{name}"));
    let rec = record(&root, &name);
    assert_matches_skopeo(&rec, &skopeo);
    let by_digest = format!(
        "{}/test/busybox@{}",
        plain.addr,
        skopeo["Digest"].as_str().unwrap()
    );
    ok(&husk_in(&root, &["pull", "-q", &by_digest]));
    assert_eq!(
        record(&root, &by_digest)["manifest_digest"],
        skopeo["Digest"]
    );
    let disks = root.join("oci/disks");
    assert_eq!(
        std::fs::read_dir(&disks)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "ext4")
            .count(),
        1,
        "one disk per image config"
    );

    // An index with two platforms: linux/amd64 is chosen.
    let arm = layout_image(&layout, "arm", "arm64", &[raw_tar(&[("a", b"arm")])]);
    let amd = skopeo_manifest_desc(&layout, "v1");
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            with_platform(arm, "arm64"),
            with_platform(amd.clone(), "amd64"),
        ],
    });
    let idx = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    let mut tagged = idx.clone();
    tagged["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "multi"});
    let index_json = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_json).unwrap()).unwrap();
    top["manifests"].as_array_mut().unwrap().push(tagged);
    std::fs::write(&index_json, top.to_string()).unwrap();
    let multi = format!("{}/test/busybox:multi", plain.addr);
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{multi}"),
    ]));
    ok(&husk_in(&root, &["pull", "-q", &multi]));
    // What the registry serves (skopeo may re-serialize when it copies).
    let raw = sh(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{multi}"),
    ]));
    let served: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let amd64 = served["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap();
    let rec = record(&root, &multi);
    assert_eq!(rec["manifest_digest"], amd64["digest"]);
    assert_eq!(
        rec["index_digest"].as_str().unwrap(),
        digest(raw.as_bytes())
    );
    assert_eq!(served["manifests"].as_array().unwrap().len(), 2);
    // An index without linux/amd64.
    let arm_only = format!("{}/test/busybox:arm", plain.addr);
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:arm", layout.display()),
        &format!("docker://{arm_only}"),
    ]));
    fails(&husk_in(&root, &["pull", "-q", &arm_only]), "linux/arm64");
    fails(
        &husk_in(
            &root,
            &["pull", "-q", &format!("{}/test/busybox:nope", plain.addr)],
        ),
        "not found",
    );
    fails(
        &husk_in(
            &root,
            &["pull", "-q", &format!("{}/test/busybox:v1", "127.0.0.1:1")],
        ),
        "cannot reach",
    );

    // htpasswd basic auth on the same storage.
    let basic = Registry::start(
        &dir,
        &storage,
        Auth::Basic {
            user: "alice",
            password: "wonder",
        },
    );
    let bname = format!("{}/test/busybox:v1", basic.addr);
    fails(&husk_in(&root, &["pull", "-q", &bname]), "401");
    let login = |reg: &str, pw: &str| {
        husk()
            .arg("--root")
            .arg(&root)
            .args(["login", "-u", "alice", "--password-stdin", reg])
            .env("HOME", &root)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(pw.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap()
    };
    fails(&login(&basic.addr, "wrong"), "invalid username or password");
    assert!(
        !root.join("auth.json").exists(),
        "nothing stored on a refused login"
    );
    ok(&login(&basic.addr, "wonder\n"));
    ok(&husk_in(&root, &["pull", "-q", &bname]));
    assert_matches_skopeo(&record(&root, &bname), &skopeo);

    // Bearer tokens.
    let tokens = TokenServer::start(&dir, "bob", "builder");
    let bearer = Registry::start(&dir, &storage, Auth::Token(&tokens));
    let tname = format!("{}/test/busybox:v1", bearer.addr);
    fails(&husk_in(&root, &["pull", "-q", &tname]), "401");
    let authfile = dir.join("creds.json");
    std::fs::write(
        &authfile,
        serde_json::json!({"auths": {bearer.addr.clone(): {"auth": "Ym9iOmJ1aWxkZXI="}}})
            .to_string(),
    )
    .unwrap();
    ok(&husk_in(
        &root,
        &[
            "pull",
            "-q",
            "--authfile",
            authfile.to_str().unwrap(),
            &tname,
        ],
    ));
    assert!(
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "a token was used"
    );
    assert_matches_skopeo(&record(&root, &tname), &skopeo);

    // rmi keeps what other images share; the last one frees everything.
    ok(&husk_in(&root, &["rmi", &name]));
    assert!(disks.read_dir().unwrap().count() > 0);
    let out = ok(&husk_in(&root, &["images", "-q"]));
    for r in out.lines() {
        ok(&husk_in(&root, &["rmi", r]));
    }
    assert_eq!(tree(&root.join("oci/blobs")), vec![]);
    assert_eq!(tree(&disks), vec![]);
    fails(&husk_in(&root, &["rmi", &name]), "not in the store");
    drop((plain, basic, bearer, tokens));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn with_platform(mut desc: serde_json::Value, arch: &str) -> serde_json::Value {
    desc.as_object_mut().unwrap().remove("annotations");
    desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
    desc
}

/// The descriptor of tag `tag` in a layout's index.json.
fn skopeo_manifest_desc(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()
        .clone()
}

#[test]
fn local_layouts_and_archives() {
    let dir = tmpdir("local");
    let (root, layout) = (dir.join("root"), dir.join("layout"));
    test_image(&layout, "v1");
    let oci = format!("oci:{}:v1", layout.display());
    ok(&husk_in(&root, &["pull", "-q", &oci]));
    let skopeo = inspect(&oci);
    assert_matches_skopeo(&record(&root, &oci), &skopeo);

    let archive = dir.join("image.oci.tar");
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        &oci,
        &format!("oci-archive:{}:v1", archive.display()),
    ]));
    let oa = format!("oci-archive:{}:v1", archive.display());
    ok(&husk_in(&root, &["pull", "-q", &oa]));
    assert_matches_skopeo(&record(&root, &oa), &skopeo);

    let docker = dir.join("image.docker.tar");
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        &oci,
        &format!("docker-archive:{}:test/busybox:v1", docker.display()),
    ]));
    let da = format!("docker-archive:{}", docker.display());
    ok(&husk_in(&root, &["pull", "-q", &da]));
    // docker-archive layers are the uncompressed tars; husk synthesizes its
    // own manifest, so only the layer digests are comparable.
    assert_eq!(record(&root, &da)["layers"], inspect(&da)["Layers"]);

    // All three are one image config: one disk.
    let disks: Vec<_> = tree(&root.join("oci/disks"))
        .into_iter()
        .filter(|(n, _)| n.ends_with(".ext4"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    let cfg = ok(&husk_in(&root, &["image", "inspect", &oci]));
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["config"]["WorkingDir"], "/srv");
    fails(
        &husk_in(
            &root,
            &["pull", "-q", &format!("oci:{}:nope", layout.display())],
        ),
        "not found",
    );
    fails(
        &husk_in(&root, &["pull", "-q", "oci-archive:/nonexistent.tar"]),
        "nonexistent",
    );
    fails(
        &husk_in(&root, &["image", "inspect", "never-pulled"]),
        "not in the store",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_and_corrupt_images_leave_the_store_unchanged() {
    let dir = tmpdir("hostile");
    let (root, layout) = (dir.join("root"), dir.join("layout"));
    test_image(&layout, "good");
    ok(&husk_in(
        &root,
        &["pull", "-q", &format!("oci:{}:good", layout.display())],
    ));
    let before = tree(&root);
    let evil = layout_image(&layout, "dotdot", "amd64", &[raw_tar(&[("../x", b"x")])]);
    layout_image(&layout, "abs", "amd64", &[raw_tar(&[("/etc/x", b"x")])]);
    layout_image(
        &layout,
        "through",
        "amd64",
        &[
            raw_tar(&[("etc/", b""), ("evil->/etc", b"")]),
            raw_tar(&[("evil/passwd", b"owned")]),
        ],
    );
    let layer = |tag: &str| {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                layout.join("blobs/sha256").join(
                    &skopeo_manifest_desc(&layout, tag)["digest"]
                        .as_str()
                        .unwrap()[7..],
                ),
            )
            .unwrap(),
        )
        .unwrap();
        m["layers"].as_array().unwrap().last().unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (tag, path) in [
        ("dotdot", "../x"),
        ("abs", "/etc/x"),
        ("through", "evil/passwd"),
    ] {
        let o = husk_in(
            &root,
            &["pull", "-q", &format!("oci:{}:{tag}", layout.display())],
        );
        fails(
            &o,
            &format!("layer {}: refused entry \"{path}\"", layer(tag)),
        );
        assert_eq!(tree(&root), before, "store unchanged after {tag}");
    }
    assert!(!Path::new("/etc/x").exists());
    let _ = evil;

    // A corrupted blob in the source is reported; the store is unchanged.
    let bad = layout_image(
        &layout,
        "corrupt",
        "amd64",
        &[raw_tar(&[("f", b"payload")])],
    );
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(&bad["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(&m["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    fails(
        &husk_in(
            &root,
            &["pull", "-q", &format!("oci:{}:corrupt", layout.display())],
        ),
        "digest mismatch",
    );
    assert_eq!(tree(&root), before);

    // A corrupted blob in the store is detected and fetched again.
    let good = format!("oci:{}:good", layout.display());
    let rec = record(&root, &good);
    let stored = root
        .join("oci/blobs/sha256")
        .join(&rec["layers"][0].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();
    ok(&husk_in(&root, &["pull", "-q", &good]));
    assert_eq!(tree(&root), before);
    assert_eq!(
        digest(&std::fs::read(&stored).unwrap()),
        rec["layers"][0].as_str().unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_killed_pull_leaves_nothing_half_written() {
    let dir = tmpdir("kill");
    let (root, layout, storage) = (dir.join("root"), dir.join("layout"), dir.join("storage"));
    test_image(&layout, "v1");
    let registry = Registry::start(&dir, &storage, Auth::None);
    let name = format!("{}/test/busybox:v1", registry.addr);
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{name}"),
    ]));
    let proxy = SlowProxy::start(&registry.addr);
    let slow = format!("{}/test/busybox:v1", proxy.addr);
    let mut child = husk()
        .arg("--root")
        .arg(&root)
        .args(["pull", "-q", &slow])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once part of a layer is on disk.
    let tmp = root.join("oci/tmp");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let partial = std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > 64 * 1024).unwrap_or(false))
            })
            .unwrap_or(false);
        if partial {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pull finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "no partial download appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        tree(&tmp).iter().any(|(_, n)| *n > 0),
        "the kill left a partial file"
    );
    ok(&husk_in(&root, &["pull", "-q", &name]));
    assert_eq!(tree(&tmp), vec![], "the next pull removed it");
    assert_matches_skopeo(&record(&root, &name), &inspect(&format!("docker://{name}")));
    drop((proxy, registry));
    std::fs::remove_dir_all(&dir).unwrap();
}
