//! Helpers for image tests: a real registry (Debian's docker-registry on
//! 127.0.0.1, stopped by PID), a bearer-token server, a slow proxy, and
//! hand-written OCI layouts.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

/// A fresh directory under the temp dir.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// How a registry authenticates.
pub enum Auth<'a> {
    /// Anonymous.
    None,
    /// htpasswd basic auth.
    Basic { user: &'a str, password: &'a str },
    /// Bearer tokens from `token`.
    Token(&'a TokenServer),
}

/// Debian's docker-registry serving `storage` on 127.0.0.1.
pub struct Registry {
    child: Child,
    /// host:port.
    pub addr: String,
}

impl Registry {
    /// Starts a registry; several may share one storage directory.
    pub fn start(dir: &Path, storage: &Path, auth: Auth) -> Self {
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        match auth {
            Auth::None => {}
            Auth::Basic { user, password } => {
                let htpasswd = dir.join(format!("htpasswd-{port}"));
                let line = sh(Command::new("htpasswd").args(["-Bbn", user, password]));
                std::fs::write(&htpasswd, line).unwrap();
                cfg += &format!(
                    "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                    htpasswd.display()
                );
            }
            Auth::Token(t) => {
                cfg += &format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    t.port,
                    TokenServer::SERVICE,
                    TokenServer::ISSUER,
                    t.cert.display()
                );
            }
        }
        let cfg_path = dir.join(format!("registry-{port}.yml"));
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (tools/install-deps installs it)");
        wait_for_port(port);
        Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bearer-token server for docker-registry's `token` auth: it checks
/// basic credentials and issues RS256 JWTs (signed with `openssl`) whose
/// x5c header carries a self-signed certificate the registry trusts.
pub struct TokenServer {
    port: u16,
    cert: PathBuf,
    stop: Arc<AtomicBool>,
    /// Token requests served (with valid credentials).
    pub issued: Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenServer {
    const SERVICE: &'static str = "husk-test-registry";
    const ISSUER: &'static str = "husk-test-issuer";

    /// Starts the server; `user`/`password` are the only valid credentials.
    pub fn start(dir: &Path, user: &str, password: &str) -> Self {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        sh(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=husk-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (s, n) = (stop.clone(), issued.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        serve_token(conn, &expected, &key, &x5c, &n);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            cert,
            stop,
            issued,
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn serve_token(
    conn: TcpStream,
    expected_auth: &str,
    key: &Path,
    x5c: &str,
    issued: &std::sync::atomic::AtomicUsize,
) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    let _ = r.read_line(&mut request);
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") && v.trim() == expected_auth {
                authorized = true;
            }
        }
    }
    // GET /token?scope=repository:NAME:pull&service=...
    let scope = request
        .split(['?', '&', ' '])
        .find_map(|p| p.strip_prefix("scope="))
        .map(|s| s.replace("%3A", ":").replace("%2F", "/"))
        .unwrap_or_default();
    let mut w = conn;
    if !authorized {
        let _ = w.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    let repo = scope.split(':').nth(1).unwrap_or("").to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TokenServer::ISSUER, "sub": "tester", "aud": TokenServer::SERVICE,
        "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", issued.load(Ordering::SeqCst)),
        "access": [{"type": "repository", "name": repo, "actions": ["pull"]}],
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let mut sig = Vec::new();
    openssl
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut sig)
        .unwrap();
    openssl.wait().unwrap();
    let token = format!("{signing_input}.{}", b64url(&sig));
    issued.fetch_add(1, Ordering::SeqCst);
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 600}).to_string();
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A TCP proxy to `target` that sends each 16 KiB from the server after a
/// pause, so a download takes long enough to be interrupted.
pub struct SlowProxy {
    /// host:port to connect to.
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    /// Starts the proxy.
    pub fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, target) = (stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c1, mut s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut s1);
                });
                let (mut c2, mut s2) = (client, server);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = s2.read(&mut buf) {
                        if n == 0 || c2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(30));
                    }
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self { addr, stop }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `sha256:<hex>`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Writes a blob into an OCI layout; returns its descriptor.
pub fn put_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let d = digest(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&d[7..]), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
}

/// Writes an OCI layout holding one image made of `layers` (uncompressed
/// tars), tagged `tag`, for `arch`; returns the manifest descriptor.
pub fn layout_image(layout: &Path, tag: &str, arch: &str, layers: &[Vec<u8>]) -> serde_json::Value {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| put_blob(layout, "application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cfg = put_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg, "layers": descs,
    });
    let mut desc = put_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(desc.clone());
    std::fs::write(&index_path, index.to_string()).unwrap();
    desc
}

/// A tar with one file per (name, data), names written raw (so hostile
/// ones too); a name ending in '/' is a directory, "name->target" a symlink.
pub fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        let (name, kind, link) = if let Some((n, t)) = name.split_once("->") {
            (n, tar::EntryType::Symlink, Some(t))
        } else if name.ends_with('/') {
            (*name, tar::EntryType::Directory, None)
        } else {
            (*name, tar::EntryType::Regular, None)
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(if kind == tar::EntryType::Regular {
            data.len() as u64
        } else {
            0
        });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        let body: &[u8] = if kind == tar::EntryType::Regular {
            data
        } else {
            &[]
        };
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

/// Every file under `dir` (relative path, size), sorted: a store snapshot.
pub fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, m.len()));
            }
        }
    }
    out.sort();
    out
}

/// Builds the busybox test image (tools/make-test-image) into `layout`.
pub fn test_image(layout: &Path, tag: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/make-test-image");
    sh(Command::new(script).arg(layout).arg(tag));
}
