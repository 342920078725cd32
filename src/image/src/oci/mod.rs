//! OCI images: references, sources (a registry, an OCI layout or archive, a
//! docker-archive), the content-addressed store, layer application and the
//! read-only guest disk built from an image.

pub mod auth;
pub mod disk;
pub mod layer;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod sources;
pub mod store;

pub use reference::ImageRef;
pub use store::{ImageRecord, Store};

/// Errors of the image store and of pulls. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference cannot be parsed.
    #[error("invalid image reference {0:?}: {1}")]
    BadReference(String, String),
    /// A digest is not `sha256:` + 64 hex digits.
    #[error("unsupported or malformed digest {0:?}")]
    BadDigest(String),
    /// The store could not be read or written.
    #[error("image store {0}: {1}")]
    Store(String, #[source] std::io::Error),
    /// A store file is not what husk wrote.
    #[error("image store {0} is corrupted: {1}")]
    Corrupt(String, String),
    /// The image is not in the store.
    #[error("image {0} is not in the store (husk pull it first)")]
    NotInStore(String),
    /// A running container uses the image.
    #[error("image {0} is in use by a running container (use -f to remove it anyway)")]
    InUse(String),
    /// A blob's content does not hash to its digest.
    #[error("digest mismatch for {0}: content hashes to {1}")]
    DigestMismatch(String, String),
    /// A blob's size is not its descriptor's.
    #[error("size mismatch for {0}: expected {1} bytes, got {2}")]
    SizeMismatch(String, u64, u64),
    /// A manifest or config is larger than husk accepts.
    #[error("{0} is larger than {1} bytes")]
    TooLarge(String, u64),
    /// A manifest, index or config is malformed.
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
    /// A media type husk cannot use.
    #[error("unsupported media type {0:?}")]
    MediaType(String),
    /// An index without a linux/amd64 image.
    #[error("{0}: no linux/amd64 image in the index (found: {1})")]
    NoPlatform(String, String),
    /// A tag or digest the source does not have.
    #[error("{0}: not found ({1})")]
    NotFound(String, String),
    /// The registry refused or failed.
    #[error("{0}: {1}")]
    Registry(String, String),
    /// Reading a local source failed.
    #[error("{0}: {1}")]
    Source(String, #[source] std::io::Error),
    /// A layer is malformed or hostile.
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    /// Building the guest disk failed.
    #[error(transparent)]
    Disk(#[from] crate::ext4::Ext4Error),
    /// Credentials could not be read or saved.
    #[error("credentials {0}: {1}")]
    Auth(String, String),
}

/// Manifests, indexes and configs larger than this are refused.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;
