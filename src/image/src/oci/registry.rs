//! A registry as an image source, through `oci-client` (the OCI
//! distribution client of the ORAS project): anonymous pulls, HTTP basic
//! auth, and the bearer-token flow when the registry answers 401 with
//! `WWW-Authenticate: Bearer`. husk drives it from a current-thread tokio
//! runtime and checks every digest itself.

use std::io::Write;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    OciDescriptor, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
pub use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::sources::Source;
use super::OciError;

/// Manifest types husk asks for (the registry picks one).
const ACCEPT: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Verify TLS certificates and insist on HTTPS. When false (and always
    /// for localhost/127.0.0.0/8/::1, as docker does), HTTPS is tried
    /// without verification and plain HTTP is the fallback.
    pub tls_verify: bool,
    /// Credentials; Anonymous if none.
    pub auth: RegistryAuth,
}

/// Whether a registry host is on this machine.
pub fn is_local(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A registry reference as a source.
pub struct RegistrySource {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    opts: RegistryOptions,
    /// Plain HTTP may be tried when HTTPS fails.
    insecure: bool,
}

impl RegistrySource {
    /// A source for `reference`.
    pub fn new(reference: Reference, opts: RegistryOptions) -> Result<Self, OciError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OciError::Source("tokio runtime".into(), e))?;
        let insecure = !opts.tls_verify || is_local(reference.resolve_registry());
        let client = Self::client(insecure, ClientProtocol::Https);
        Ok(Self {
            rt,
            client,
            reference,
            opts,
            insecure,
        })
    }

    fn client(insecure: bool, protocol: ClientProtocol) -> Client {
        Client::new(ClientConfig {
            protocol,
            accept_invalid_certificates: insecure,
            accept_invalid_hostnames: insecure,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            ..Default::default()
        })
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    fn raw_manifest(&mut self, r: &Reference) -> Result<Vec<u8>, OciDistributionError> {
        let (client, auth) = (&self.client, &self.opts.auth);
        self.rt
            .block_on(client.pull_manifest_raw(r, auth, &ACCEPT))
            .map(|(b, _)| b.to_vec())
    }

    /// Turns a client error into one line for the user.
    fn error(&self, e: OciDistributionError) -> OciError {
        let name = self.name();
        match e {
            OciDistributionError::UnauthorizedError { .. } => OciError::Registry(
                name,
                "unauthorized (HTTP 401): log in with `husk login` or pass --authfile".into(),
            ),
            OciDistributionError::AuthenticationFailure(why) => {
                OciError::Registry(name, format!("authentication failed: {}", why.trim()))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let what: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect();
                let missing = envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                    )
                });
                if missing {
                    OciError::NotFound(name, what.join("; "))
                } else {
                    OciError::Registry(name, format!("registry refused: {}", what.join("; ")))
                }
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let first = message.lines().next().unwrap_or("").trim().to_string();
                if code == 404 {
                    OciError::NotFound(name, "HTTP 404".into())
                } else {
                    OciError::Registry(name, format!("registry answered HTTP {code} {first}"))
                }
            }
            OciDistributionError::RequestError(e) => {
                OciError::Registry(name, format!("cannot reach the registry: {e}"))
            }
            OciDistributionError::DigestError(e) => {
                OciError::Registry(name, format!("digest check failed: {e}"))
            }
            other => OciError::Registry(name, other.to_string()),
        }
    }
}

impl Source for RegistrySource {
    fn top(&mut self) -> Result<Vec<u8>, OciError> {
        let r = self.reference.clone();
        match self.raw_manifest(&r) {
            Ok(b) => Ok(b),
            Err(OciDistributionError::RequestError(e)) if self.insecure => {
                tracing::info!("{}: HTTPS failed ({e}); trying plain HTTP", self.name());
                let registry = r.resolve_registry().to_string();
                self.client = Self::client(true, ClientProtocol::HttpsExcept(vec![registry]));
                self.raw_manifest(&r).map_err(|e| self.error(e))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, OciError> {
        let r = self.reference.clone_with_digest(digest.to_string());
        self.raw_manifest(&r).map_err(|e| self.error(e))
    }

    fn blob(
        &mut self,
        digest: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        let desc = OciDescriptor {
            digest: digest.to_string(),
            ..Default::default()
        };
        let (client, r) = (&self.client, &self.reference);
        let result: Result<(), OciDistributionError> = self.rt.block_on(async {
            let mut s = client.pull_blob_stream(r, &desc).await?;
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                out.write_all(&chunk)?;
                progress(chunk.len() as u64);
            }
            Ok(())
        });
        result.map_err(|e| match e {
            // Our own writer refused (size) or the disk failed.
            OciDistributionError::IoError(io) => OciError::Source(digest.to_string(), io),
            e => self.error(e),
        })
    }
}

/// Checks credentials against a registry before `husk login` stores them.
/// oci-client has no bare `GET /v2/`, so husk asks for a manifest of a
/// repository that need not exist: bad credentials fail the token request
/// (bearer registries) or get 401 (basic); anything else means the
/// registry accepted them.
pub fn verify_login(
    registry: &str,
    user: &str,
    password: &str,
    tls_verify: bool,
) -> Result<(), OciError> {
    let r: Reference = format!("{registry}/husk-login-check:latest")
        .parse()
        .map_err(|e: oci_client::ParseError| {
            OciError::BadReference(registry.into(), e.to_string())
        })?;
    let opts = RegistryOptions {
        tls_verify,
        auth: RegistryAuth::Basic(user.into(), password.into()),
    };
    let mut src = RegistrySource::new(r, opts)?;
    match src.top() {
        Ok(_) | Err(OciError::NotFound(..)) => Ok(()),
        Err(OciError::Registry(_, why))
            if why.contains("401") || why.contains("authentication failed") =>
        {
            Err(OciError::Auth(
                registry.into(),
                "login refused: invalid username or password".into(),
            ))
        }
        Err(OciError::Registry(_, why)) if why.contains("Denied") => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_registries() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_local(h), "{h}");
        }
        for h in [
            "index.docker.io",
            "10.0.0.1:5000",
            "example.com:443",
            "localhost.evil.com",
        ] {
            assert!(!is_local(h), "{h}");
        }
    }
}
