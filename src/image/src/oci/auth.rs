//! Registry credentials in a docker-style `config.json` / containers
//! `auth.json` (`{"auths": {"REGISTRY": {"auth": base64("user:pass")}}}`).
//!
//! Which file: `--authfile`, else `$REGISTRY_AUTH_FILE`, else husk's own
//! `<root>/auth.json`; when reading, `~/.docker/config.json` is the last
//! resort, so credentials from `docker login` work too.

use std::path::{Path, PathBuf};

use base64::Engine;
pub use oci_client::secrets::RegistryAuth;
use serde_json::{json, Map, Value};

use super::OciError;

/// The file `husk login` writes and pulls read first.
pub fn auth_file(explicit: Option<&Path>, root: &Path) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("REGISTRY_AUTH_FILE").map(PathBuf::from))
        .unwrap_or_else(|| root.join("auth.json"))
}

/// Keys a registry may be stored under (docker writes URLs for Docker Hub).
fn keys(registry: &str) -> Vec<String> {
    let mut k = vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("https://{registry}/v1/"),
        format!("http://{registry}"),
    ];
    if registry == "docker.io" || registry == "index.docker.io" {
        k.extend([
            "docker.io".into(),
            "index.docker.io".into(),
            "https://index.docker.io/v1/".into(),
        ]);
    }
    k
}

fn read_json(p: &Path) -> Result<Option<Value>, OciError> {
    match std::fs::read(p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| OciError::Auth(p.display().to_string(), format!("not JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OciError::Auth(p.display().to_string(), e.to_string())),
    }
}

/// Credentials for `registry` from `file`, or (when `fallback`) docker's
/// own config; Anonymous when none are stored.
pub fn lookup(file: &Path, fallback: bool, registry: &str) -> Result<RegistryAuth, OciError> {
    let mut files = vec![file.to_path_buf()];
    if fallback {
        if let Some(home) = std::env::var_os("HOME") {
            files.push(PathBuf::from(home).join(".docker/config.json"));
        }
    }
    for f in files {
        let Some(v) = read_json(&f)? else { continue };
        for k in keys(registry) {
            let Some(entry) = v.pointer(&format!(
                "/auths/{}",
                k.replace('~', "~0").replace('/', "~1")
            )) else {
                continue;
            };
            let bad = |why: &str| OciError::Auth(f.display().to_string(), format!("{k}: {why}"));
            let Some(b64) = entry.get("auth").and_then(Value::as_str) else {
                continue;
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| bad("auth is not base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("auth is not UTF-8"))?;
            let (user, pass) = text
                .split_once(':')
                .ok_or_else(|| bad("auth is not user:password"))?;
            return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn write_json(file: &Path, v: &Value) -> Result<(), OciError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| OciError::Auth(file.display().to_string(), e.to_string());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| err(e.into()))?;
    let r = f
        .write_all(&bytes)
        .and_then(|()| std::fs::rename(&tmp, file));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(err)
}

/// Stores credentials for `registry` in `file` (mode 0600), keeping
/// whatever else the file holds.
pub fn store(file: &Path, registry: &str, user: &str, password: &str) -> Result<(), OciError> {
    let mut v = read_json(file)?.unwrap_or_else(|| json!({}));
    let obj = v
        .as_object_mut()
        .ok_or_else(|| OciError::Auth(file.display().to_string(), "not a JSON object".into()))?;
    let auths = obj
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let auths = auths.as_object_mut().ok_or_else(|| {
        OciError::Auth(file.display().to_string(), "auths is not an object".into())
    })?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    auths.insert(registry.to_string(), json!({ "auth": b64 }));
    write_json(file, &v)
}

/// Removes credentials for `registry`; false when there were none.
pub fn remove(file: &Path, registry: &str) -> Result<bool, OciError> {
    let Some(mut v) = read_json(file)? else {
        return Ok(false);
    };
    let mut removed = false;
    if let Some(auths) = v.get_mut("auths").and_then(Value::as_object_mut) {
        for k in keys(registry) {
            removed |= auths.remove(&k).is_some();
        }
    }
    if removed {
        write_json(file, &v)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_lookup_remove() {
        let d = std::env::temp_dir().join(format!("husk-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let f = d.join("auth.json");
        assert!(matches!(
            lookup(&f, false, "localhost:5000").unwrap(),
            RegistryAuth::Anonymous
        ));
        store(&f, "localhost:5000", "alice", "s:cret").unwrap();
        store(&f, "other", "bob", "x").unwrap();
        match lookup(&f, false, "localhost:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s:cret")),
            other => panic!("{other:?}"),
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Docker Hub under docker's URL key.
        std::fs::write(
            &f,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            lookup(&f, false, "index.docker.io").unwrap(),
            RegistryAuth::Basic(..)
        ));
        assert!(remove(&f, "docker.io").unwrap());
        assert!(!remove(&f, "docker.io").unwrap());
        std::fs::write(&f, r#"{"auths":{"r":{"auth":"!!"}}}"#).unwrap();
        assert!(lookup(&f, false, "r").is_err());
        std::fs::write(&f, "nope").unwrap();
        assert!(lookup(&f, false, "r").is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
