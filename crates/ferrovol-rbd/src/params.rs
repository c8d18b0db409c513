//! StorageClass parameters, with ceph-csi's names where they mean the same
//! thing, so a ceph-csi StorageClass works by changing its provisioner.

use std::collections::BTreeMap;

use ferrovol_ceph as ceph;

use crate::error::{self, Result};
use crate::ids;

/// What a StorageClass asks of its volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    pub pool: String,
    pub data_pool: Option<String>,
    /// Feature bits, and their names as given (for the volume context).
    pub features: u64,
    pub feature_names: String,
    pub cluster_id: Option<String>,
    pub image_prefix: String,
    /// A mapper for this class's volumes (the node's choice otherwise).
    pub mounter: Option<String>,
}

/// Keys ceph-csi knows that mean nothing here, with why.
const NOT_SUPPORTED: &[(&str, &str)] = &[
    ("thickProvision", "images are always thin"),
    ("encrypted", "encryption is not supported yet"),
    ("encryptionKMSID", "encryption is not supported yet"),
    ("radosNamespace", "RADOS namespaces are not supported yet"),
    ("journalPool", "ferrovol keeps no journal: names are derived from the request"),
    ("mapOptions", "map options are the node's (--rbd-mapper)"),
    ("unmapOptions", "map options are the node's (--rbd-mapper)"),
];

impl Parameters {
    /// Every parameter that makes the volume what it is, canonical (feature
    /// names as bits): what a retry of the same request must match.
    pub fn fingerprint(&self) -> String {
        format!(
            "pool={};dataPool={};features={:#x};clusterID={};prefix={};mounter={}",
            self.pool,
            self.data_pool.as_deref().unwrap_or(""),
            self.features,
            self.cluster_id.as_deref().unwrap_or(""),
            self.image_prefix,
            self.mounter.as_deref().unwrap_or("")
        )
    }
}

pub fn parse(params: &BTreeMap<String, String>) -> Result<Parameters> {
    let mut out = Parameters {
        pool: String::new(),
        data_pool: None,
        features: ceph::feature_bit("layering").expect("known feature"),
        feature_names: "layering".into(),
        cluster_id: None,
        image_prefix: ids::DEFAULT_IMAGE_PREFIX.into(),
        mounter: None,
    };
    for (key, value) in params {
        match key.as_str() {
            "pool" => {
                ids::check_pool(value)?;
                out.pool = value.clone();
            }
            "dataPool" => {
                ids::check_pool(value)?;
                out.data_pool = Some(value.clone());
            }
            "imageFeatures" => {
                let mut bits = 0;
                for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    bits |= ceph::feature_bit(name).ok_or_else(|| {
                        error::invalid(format!(
                            "imageFeatures: unknown feature {name:?} (known: layering, \
                             exclusive-lock, object-map, fast-diff, deep-flatten, journaling)"
                        ))
                    })?;
                }
                if bits & 1 == 0 {
                    return Err(error::invalid(
                        "imageFeatures must include layering (snapshots and clones need it)",
                    ));
                }
                out.features = bits;
                out.feature_names = value.clone();
            }
            "imageFormat" if value == "2" => {}
            "imageFormat" => {
                return Err(error::invalid(format!(
                    "imageFormat {value:?}: only format 2 exists here"
                )))
            }
            "clusterID" => out.cluster_id = Some(value.clone()),
            "volumeNamePrefix" => {
                if !ids::is_plain_name(value, 32) {
                    return Err(error::invalid(format!(
                        "volumeNamePrefix {value:?}: 1 to 32 letters, digits, '.', '_' or '-'"
                    )));
                }
                out.image_prefix = value.clone();
            }
            "mounter" => {
                out.mounter = Some(
                    match value.as_str() {
                        "rbd" | "krbd" => "krbd",
                        "rbd-nbd" | "nbd" => "nbd",
                        "fuse" | "rbd-fuse" => "fuse",
                        _ => {
                            return Err(error::invalid(format!(
                                "mounter {value:?}: one of rbd, rbd-nbd, fuse"
                            )))
                        }
                    }
                    .into(),
                );
            }
            other => {
                return Err(error::invalid(match NOT_SUPPORTED.iter().find(|(k, _)| *k == other) {
                    Some((_, why)) => format!("parameter {other:?} is not supported: {why}"),
                    None => format!(
                        "unknown parameter {other:?} (known: pool, dataPool, imageFeatures, \
                         imageFormat, clusterID, volumeNamePrefix, mounter)"
                    ),
                }))
            }
        }
    }
    if out.pool.is_empty() {
        return Err(error::invalid("parameter \"pool\" is required (the Ceph pool for images)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn p(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ceph_csi_classes_are_understood() {
        let got = parse(&p(&[
            ("pool", "replicapool"),
            ("clusterID", "rook-ceph"),
            ("imageFeatures", "layering,exclusive-lock"),
            ("imageFormat", "2"),
        ]))
        .unwrap();
        assert_eq!(got.pool, "replicapool");
        assert_eq!(got.features, 1 | 4);
        assert_eq!(got.cluster_id.as_deref(), Some("rook-ceph"));
    }

    #[test]
    fn bad_classes_are_invalid_arguments() {
        for bad in [
            p(&[]),
            p(&[("pool", "a:b")]),
            p(&[("pool", "rbd"), ("imageFeatures", "layering,sparkles")]),
            p(&[("pool", "rbd"), ("imageFeatures", "exclusive-lock")]),
            p(&[("pool", "rbd"), ("thickProvision", "true")]),
            p(&[("pool", "rbd"), ("colour", "blue")]),
            p(&[("pool", "rbd"), ("mounter", "iscsi")]),
        ] {
            assert_eq!(parse(&bad).unwrap_err().code(), Code::InvalidArgument, "{bad:?}");
        }
    }
}
