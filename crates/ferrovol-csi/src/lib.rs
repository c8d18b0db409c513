//! CSI v1.12 wire types, clients and server traits, and what the driver and
//! the tools must agree on without depending on each other.
//!
//! The types are generated at build time from `proto/csi.proto`; the crate
//! exists so that the (slow to compile) generated code is built once and
//! shared by the driver, its tools and the tests. Beside them:
//! - [`endpoint`]: CSI endpoint addresses, the default socket, connecting;
//! - [`units`]: sizes, durations and times as people write them;
//! - [`build`]: the version the binary was stamped with.

#![forbid(unsafe_code)]

pub mod build;
pub mod codec;
pub mod endpoint;
pub mod units;

/// The generated code, which clippy's lints are not for.
#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("csi.v1");
}

pub mod v1 {
    pub use crate::generated::*;
}

pub use v1::*;

/// What a volume is beyond the CSI message (its name, creation time,
/// access type and parameters), in a binary response header of ferrovol's
/// own on CreateVolume, ControllerGetVolume and ListVolumes: for people and
/// tools that list volumes (`ferrovol ctl`) and for the relay, which answers
/// what its nodes said without loss. Never in the volume context, which
/// Kubernetes copies into every PV's volumeAttributes. Other drivers send no
/// such header, and a client that does not know it ignores it.
pub mod facts {
    use std::collections::HashMap;

    /// The header (binary: its name ends in `-bin`).
    pub const HEADER: &str = "ferrovol-volume-facts-bin";

    /// The most bytes of facts one response carries (as sent, base64):
    /// well under the header block HTTP/2 peers accept (16 KiB by
    /// default). A listing page whose facts do not fit carries its first
    /// volumes' only; ask for pages of [`PAGE`] to have them all.
    pub const BUDGET: usize = 8 << 10;

    /// A ListVolumes page size whose facts fit the budget for volumes with
    /// names and parameters of ordinary length.
    pub const PAGE: i32 = 32;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VolumeFact {
        #[prost(string, tag = "1")]
        pub volume_id: String,
        /// The CO's name for it (CreateVolume's `name`).
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(int64, tag = "3")]
        pub created_unix_nanos: i64,
        /// Raw block rather than a filesystem.
        #[prost(bool, tag = "4")]
        pub block: bool,
        #[prost(string, tag = "5")]
        pub fs_type: String,
        #[prost(map = "string, string", tag = "6")]
        pub parameters: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VolumeFacts {
        #[prost(message, repeated, tag = "1")]
        pub volumes: Vec<VolumeFact>,
    }

    /// The header carrying `facts`.
    pub fn to_metadata(facts: Vec<VolumeFact>) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        let bytes = prost::Message::encode_to_vec(&VolumeFacts { volumes: facts });
        map.insert_bin(HEADER, tonic::metadata::MetadataValue::from_bytes(&bytes));
        map
    }

    /// The facts a response carried, by volume ID (none from a driver that
    /// sends no header, or a garbled one).
    pub fn from_metadata(map: &tonic::metadata::MetadataMap) -> HashMap<String, VolumeFact> {
        let Some(value) = map.get_bin(HEADER) else { return HashMap::new() };
        let Ok(bytes) = value.to_bytes() else { return HashMap::new() };
        let Ok(facts) = <VolumeFacts as prost::Message>::decode(bytes.as_ref()) else {
            return HashMap::new();
        };
        facts.volumes.into_iter().map(|f| (f.volume_id.clone(), f)).collect()
    }
}
