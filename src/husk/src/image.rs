//! Image commands: `husk pull`, `husk images`, `husk rmi`, `husk image
//! prune|inspect|ls|pull|rm`, `husk login`, `husk logout`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use husk_image::oci::pull::{self, PullOptions};
use husk_image::oci::registry::RegistryOptions;
use husk_image::oci::{auth, ImageRef, OciError, Store};

/// Exit status of a failed image command (as docker's).
pub const IMAGE_FAILURE: i32 = 125;

// How to reach registries (shared by pull and run).
#[derive(Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Verify TLS certificates and require HTTPS (false: also try plain
    /// HTTP; registries on localhost/127.0.0.0/8 always may).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub tls_verify: bool,
    /// Credentials file (docker config.json format) [default: $REGISTRY_AUTH_FILE,
    /// else $HUSK_ROOT/auth.json, then ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

// `husk pull`.
#[derive(Args)]
pub struct PullArgs {
    /// Image: NAME[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE.
    reference: String,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

// `husk images`.
#[derive(Args)]
pub struct ImagesArgs {
    /// Output: table or json.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
    /// Only references.
    #[arg(short, long)]
    quiet: bool,
}

// `husk rmi`.
#[derive(Args)]
pub struct RmiArgs {
    /// Images (references or manifest digests).
    #[arg(required = true)]
    references: Vec<String>,
    /// Remove even when a running container uses the image.
    #[arg(short, long)]
    force: bool,
}

/// `husk image ...`.
#[derive(Subcommand)]
#[command(defer = true)]
pub enum ImageCommand {
    /// Pull an image (as `husk pull`).
    Pull(PullArgs),
    /// List images (as `husk images`).
    #[command(alias = "list")]
    Ls(ImagesArgs),
    /// Remove images (as `husk rmi`).
    Rm(RmiArgs),
    /// Delete unreferenced blobs, disks and leftovers; with -a, also every
    /// image no running container uses.
    Prune {
        /// Remove all unused images too.
        #[arg(short, long)]
        all: bool,
    },
    /// Print an image's config (JSON).
    Inspect {
        /// Image.
        reference: String,
    },
}

// `husk login`.
#[derive(Args)]
pub struct LoginArgs {
    /// Registry host, e.g. localhost:5000 or docker.io.
    registry: String,
    /// User name (asked for on a terminal when missing).
    #[arg(short, long)]
    username: Option<String>,
    /// Password (prefer --password-stdin).
    #[arg(short, long)]
    password: Option<String>,
    /// Read the password from stdin.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    registry_args: RegistryArgs,
}

// `husk logout`.
#[derive(Args)]
pub struct LogoutArgs {
    /// Registry host.
    registry: String,
    /// Credentials file.
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
}

fn root() -> PathBuf {
    husk_vmm::builder::husk_root()
}

/// The store under husk's root.
pub fn store() -> Result<Store, OciError> {
    Store::open(&root())
}

/// Pull options for a reference.
pub fn pull_options(r: &ImageRef, a: &RegistryArgs, quiet: bool) -> Result<PullOptions, OciError> {
    let auth = match r.registry() {
        Some(reg) => {
            let key = match r {
                ImageRef::Registry(reference) => reference.registry().to_string(),
                _ => reg.to_string(),
            };
            let file = auth::auth_file(a.authfile.as_deref(), &root());
            auth::lookup(&file, a.authfile.is_none(), &key)?
        }
        None => auth::RegistryAuth::Anonymous,
    };
    Ok(PullOptions {
        registry: RegistryOptions {
            tls_verify: a.tls_verify,
            auth,
        },
        quiet,
    })
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("husk: {e}");
    IMAGE_FAILURE
}

/// `husk pull`.
pub fn cmd_pull(a: PullArgs) -> i32 {
    let run = || -> Result<(), OciError> {
        let r = ImageRef::parse(&a.reference)?;
        let opts = pull_options(&r, &a.registry, a.quiet)?;
        let rec = pull::pull(&store()?, &r, &opts)?;
        if !a.quiet {
            println!("Digest: {}", rec.manifest_digest);
        }
        println!("{}", rec.reference);
        Ok(())
    };
    run().map(|()| 0).unwrap_or_else(fail)
}

fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + units[u]
    }
}

/// `husk images`.
pub fn cmd_images(a: ImagesArgs) -> i32 {
    let run = || -> Result<(), OciError> {
        let s = store()?;
        let images = {
            let _l = s.lock(false)?;
            s.images()?
        };
        if a.quiet {
            images.iter().for_each(|i| println!("{}", i.reference));
        } else if a.format == "json" {
            let v = serde_json::to_string_pretty(&images)
                .map_err(|e| OciError::Invalid("store", e.to_string()))?;
            println!("{v}");
        } else {
            let w = images
                .iter()
                .map(|i| i.reference.len())
                .max()
                .unwrap_or(0)
                .max(9);
            println!(
                "{:w$}  {:19}  {:>9}  CREATED",
                "REFERENCE", "DIGEST", "SIZE"
            );
            for i in &images {
                println!(
                    "{:w$}  {:19}  {:>9}  {}",
                    i.reference,
                    &i.manifest_digest[..19.min(i.manifest_digest.len())],
                    human(i.size),
                    i.created.as_deref().unwrap_or("-")
                );
            }
        }
        Ok(())
    };
    run().map(|()| 0).unwrap_or_else(fail)
}

/// The stored name for what the user typed: as typed, else normalized.
fn stored_name(s: &Store, typed: &str) -> Result<String, OciError> {
    if s.find(typed)?.is_some() {
        return Ok(typed.to_string());
    }
    Ok(ImageRef::parse(typed)
        .map(|r| r.to_string())
        .unwrap_or_else(|_| typed.to_string()))
}

/// `husk rmi`.
pub fn cmd_rmi(a: RmiArgs) -> i32 {
    let mut status = 0;
    for r in &a.references {
        let result = (|| -> Result<_, OciError> {
            let s = store()?;
            let lock = s.lock(true)?;
            let name = stored_name(&s, r)?;
            s.remove(&lock, &name, a.force)
        })();
        match result {
            Ok(rec) => println!(
                "Untagged: {}\nDeleted: {}",
                rec.reference, rec.manifest_digest
            ),
            Err(e) => status = fail(e),
        }
    }
    status
}

/// `husk image ...`.
pub fn cmd_image(c: ImageCommand) -> i32 {
    match c {
        ImageCommand::Pull(a) => cmd_pull(a),
        ImageCommand::Ls(a) => cmd_images(a),
        ImageCommand::Rm(a) => cmd_rmi(a),
        ImageCommand::Prune { all } => {
            let run = || -> Result<u64, OciError> {
                let s = store()?;
                let lock = s.lock(true)?;
                if all {
                    for rec in s.images()? {
                        match s.remove(&lock, &rec.reference, false) {
                            Ok(_) => println!("Deleted: {}", rec.reference),
                            Err(OciError::InUse(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                s.gc(&lock)
            };
            match run() {
                Ok(freed) => {
                    println!("Total reclaimed space: {}", human(freed));
                    0
                }
                Err(e) => fail(e),
            }
        }
        ImageCommand::Inspect { reference } => {
            let run = || -> Result<(), OciError> {
                let s = store()?;
                let _l = s.lock(false)?;
                let name = stored_name(&s, &reference)?;
                let rec = s
                    .find(&name)?
                    .ok_or_else(|| OciError::NotInStore(reference.clone()))?;
                let cfg = pull::config(&s, &rec)?;
                let v = serde_json::to_string_pretty(&cfg)
                    .map_err(|e| OciError::Invalid("image config", e.to_string()))?;
                println!("{v}");
                Ok(())
            };
            run().map(|()| 0).unwrap_or_else(fail)
        }
    }
}

fn prompt(what: &str) -> Option<String> {
    use std::io::Write;
    eprint!("{what}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    Some(line.trim_end_matches(['\r', '\n']).to_string())
}

/// `husk login`.
pub fn cmd_login(a: LoginArgs) -> i32 {
    let run = || -> Result<(), OciError> {
        let bad = |why: &str| OciError::Auth(a.registry.clone(), why.to_string());
        let interactive = std::io::stdin().is_terminal();
        let user = match &a.username {
            Some(u) => u.clone(),
            None if interactive => prompt("Username").ok_or_else(|| bad("no user name"))?,
            None => return Err(bad("--username is required")),
        };
        let password = if a.password_stdin {
            let mut p = String::new();
            std::io::stdin()
                .read_to_string(&mut p)
                .map_err(|e| bad(&e.to_string()))?;
            p.trim_end_matches(['\r', '\n']).to_string()
        } else if let Some(p) = &a.password {
            p.clone()
        } else if interactive {
            prompt("Password").ok_or_else(|| bad("no password"))?
        } else {
            return Err(bad("--password or --password-stdin is required"));
        };
        if user.is_empty() || password.is_empty() {
            return Err(bad("user name and password must not be empty"));
        }
        husk_image::oci::registry::verify_login(
            &a.registry,
            &user,
            &password,
            a.registry_args.tls_verify,
        )?;
        let file = auth::auth_file(a.registry_args.authfile.as_deref(), &root());
        auth::store(&file, &a.registry, &user, &password)?;
        println!("Login Succeeded");
        Ok(())
    };
    run().map(|()| 0).unwrap_or_else(fail)
}

/// `husk logout`.
pub fn cmd_logout(a: LogoutArgs) -> i32 {
    let file = auth::auth_file(a.authfile.as_deref(), &root());
    match auth::remove(&file, &a.registry) {
        Ok(true) => {
            println!("Removed login credentials for {}", a.registry);
            0
        }
        Ok(false) => fail(format!("not logged in to {}", a.registry)),
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1_234_567), "1.235MB");
        assert_eq!(human(4_000_000_000), "4GB");
    }
}
