//! `husk run IMAGE`: the image config's Entrypoint, Cmd, Env, WorkingDir
//! and User under docker run's override rules.

use husk_image::oci::disk::ResolvedUser;
use oci_spec::image::Config;

use crate::spec::RunSpec;
use crate::RuntimeError;

/// What the user gave on the command line, next to the image's config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--entrypoint` (Some("") clears the image's).
    pub entrypoint: Option<String>,
    /// CMD after the image name.
    pub command: Vec<String>,
    /// `--env-file` lines then `-e` values, in that order.
    pub env: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
}

/// Fills `spec`'s args, env, cwd and user from the image config and the
/// overrides. `resolve` turns a `USER[:GROUP]` into ids using the image's
/// /etc/passwd and /etc/group.
pub fn apply(
    spec: &mut RunSpec,
    config: Option<&Config>,
    o: &Overrides,
    resolve: impl Fn(&str) -> Result<ResolvedUser, RuntimeError>,
) -> Result<(), RuntimeError> {
    let empty = Config::default();
    let c = config.unwrap_or(&empty);
    let image_entry = c.entrypoint().clone().unwrap_or_default();
    let image_cmd = c.cmd().clone().unwrap_or_default();
    let (entry, cmd) = match &o.entrypoint {
        // docker: --entrypoint also drops the image's Cmd.
        Some(e) if e.is_empty() => (Vec::new(), o.command.clone()),
        Some(e) => (vec![e.clone()], o.command.clone()),
        None if o.command.is_empty() => (image_entry, image_cmd),
        None => (image_entry, o.command.clone()),
    };
    spec.args = entry.into_iter().chain(cmd).collect();
    if spec.args.is_empty() {
        return Err(RuntimeError::Invalid(
            "no command specified: the image has no Entrypoint or Cmd; give one after the image"
                .into(),
        ));
    }
    let user_spec = o
        .user
        .clone()
        .or_else(|| c.user().clone().filter(|u| !u.is_empty()));
    let user = user_spec.as_deref().map(&resolve).transpose()?;
    let mut env: Vec<String> = c.env().clone().unwrap_or_default();
    env.extend(o.env.iter().cloned());
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = match &user {
            Some(u) => u
                .home
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "/".into()),
            None => "/root".into(),
        };
        env.push(format!("HOME={home}"));
    }
    spec.env = env;
    spec.cwd = o
        .workdir
        .clone()
        .or_else(|| c.working_dir().clone().filter(|w| !w.is_empty()));
    if let Some(u) = user {
        spec.user = Some(format!("{}:{}", u.uid, u.gid));
        spec.additional_gids = u.additional_gids;
    }
    Ok(())
}

/// Reads an `--env-file`: `K=V` lines; `K` alone takes the value from
/// husk's environment (dropped when unset); blank lines and `#` comments
/// are skipped.
pub fn read_env_file(path: &std::path::Path) -> Result<Vec<String>, RuntimeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RuntimeError::Io(path.display().to_string(), e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some(("", _)) => {
                return Err(RuntimeError::Invalid(format!(
                    "{}:{}: variable name is empty",
                    path.display(),
                    n + 1
                )))
            }
            Some(_) => out.push(line.to_string()),
            None => {
                if let Ok(v) = std::env::var(line.trim_end()) {
                    out.push(format!("{}={v}", line.trim_end()));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        serde_json::from_str(
            r#"{"Entrypoint":["/entry"],"Cmd":["serve","--port","80"],
                "Env":["PATH=/app/bin:/bin","MODE=prod"],"WorkingDir":"/srv","User":"app"}"#,
        )
        .unwrap()
    }

    fn resolve(u: &str) -> Result<ResolvedUser, RuntimeError> {
        match u {
            "app" => Ok(ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10],
                home: Some("/home/app".into()),
            }),
            "0" => Ok(ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
                home: Some("/root".into()),
            }),
            other => Err(RuntimeError::Invalid(format!(
                "unable to find user {other}"
            ))),
        }
    }

    fn run(o: Overrides) -> Result<RunSpec, RuntimeError> {
        let mut s = RunSpec::default();
        apply(&mut s, Some(&config()), &o, resolve).map(|()| s)
    }

    #[test]
    fn image_config_applies() {
        let s = run(Overrides::default()).unwrap();
        assert_eq!(s.args, ["/entry", "serve", "--port", "80"]);
        assert_eq!(s.cwd.as_deref(), Some("/srv"));
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        assert_eq!(s.additional_gids, [10]);
        assert!(s.env.contains(&"MODE=prod".to_string()));
        assert!(s.env.contains(&"HOME=/home/app".to_string()));
    }

    #[test]
    fn flags_override_like_docker_run() {
        let s = run(Overrides {
            command: vec!["once".into()],
            env: vec!["MODE=dev".into()],
            workdir: Some("/tmp".into()),
            user: Some("0".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.args,
            ["/entry", "once"],
            "CMD replaces Cmd, keeps Entrypoint"
        );
        assert_eq!(
            s.env.iter().rfind(|e| e.starts_with("MODE=")).unwrap(),
            "MODE=dev"
        );
        assert_eq!(s.cwd.as_deref(), Some("/tmp"));
        assert_eq!(s.user.as_deref(), Some("0:0"));
        let s = run(Overrides {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.args, ["/bin/sh"], "--entrypoint drops the image's Cmd");
        let s = run(Overrides {
            entrypoint: Some(String::new()),
            command: vec!["ls".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.args, ["ls"]);
        assert!(run(Overrides {
            entrypoint: Some(String::new()),
            ..Default::default()
        })
        .is_err());
        assert!(run(Overrides {
            user: Some("ghost".into()),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn env_files() {
        let p = std::env::temp_dir().join(format!("husk-envfile-{}", std::process::id()));
        std::fs::write(&p, "# comment\n\nA=1\nB=x=y\nHUSK_SURELY_UNSET_VAR\nPATH\n").unwrap();
        let env = read_env_file(&p).unwrap();
        assert_eq!(env[..2], ["A=1".to_string(), "B=x=y".to_string()]);
        assert!(env[2].starts_with("PATH="));
        assert_eq!(env.len(), 3);
        std::fs::write(&p, "=oops\n").unwrap();
        assert!(read_env_file(&p).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
