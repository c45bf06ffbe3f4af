//! credlet's CSI node plugin: pod certificates in ephemeral inline volumes.
//!
//! The kubelet calls `NodePublishVolume`; the [`volumes::VolumeManager`]
//! validates the request ([`attributes`], [`paths`]), mounts a tmpfs at the
//! target ([`fsops`]), generates a key on the node, has an [`issuer::Issuer`]
//! sign a CSR, and writes key, chain and trust bundle atomically. One
//! [`rotation`] timer queue renews every volume; [`state`] records let a
//! restarted agent [`recover`](volumes::VolumeManager::recover) its volumes,
//! and only records this node's agent wrote ([`node_key`]).

pub mod attributes;
pub mod error;
pub mod fsops;
pub mod issuer;
pub mod metrics;
pub mod node_key;
pub mod paths;
pub mod registration;
pub mod remote;
pub mod rotation;
pub mod schedule;
pub mod server;
pub mod state;
pub mod volumes;

pub use error::{Error, InputError};
pub use issuer::{EmbeddedIssuer, Issuer};
pub use remote::{RemoteConfig, RemoteIssuer};
pub use volumes::{VolumeConfig, VolumeManager};
