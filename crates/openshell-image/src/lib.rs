//! OCI images as sandbox root file systems: pull (oci-client), verify every blob against its
//! digest, cache by content under `$OPENSHELL_HOME/images`, and unpack layers safely.
//!
//! ```no_run
//! # async fn f() -> Result<(), openshell_image::ImageError> {
//! let store = openshell_image::Store::open(&openshell_image::Store::default_home())?;
//! let image = store.ensure("127.0.0.1:5000/busybox:1", &Default::default()).await?;
//! // image.rootfs_dir is read-only: copy it (or use it as an overlay lower layer).
//! # Ok(()) }
//! ```
//!
//! See `store` for the cache layout and `unpack` for the unpacking rules.

pub mod auth;
pub mod config;
pub mod error;
pub mod pull;
pub mod store;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod unpack;

pub use auth::{AuthOptions, Credentials};
pub use config::ImageConfig;
pub use error::{ImageError, UnpackError};
pub use pull::{
    normalise_reference, parse_insecure_registry, Observer, PullEvent, PullOptions, PullPolicy,
};
pub use store::{GcReport, PreparedImage, RefRecord, Store};
