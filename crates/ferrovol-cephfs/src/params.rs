//! StorageClass parameters with the names ceph-csi's CephFS class uses, so
//! such a class works by changing its provisioner. Every key is checked:
//! one ceph-csi knows that we do not support, or one nobody knows, is
//! INVALID_ARGUMENT naming it.

use std::collections::BTreeMap;

use crate::error::{self, Result};
use crate::ids;

/// What a StorageClass asks of its volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    pub fs: String,
    pub group: String,
    /// The data pool the volume's files go to (None: the file system's).
    pub pool: Option<String>,
    pub prefix: String,
    pub mounter: Option<Mounter>,
    pub fuse_options: String,
    pub kernel_options: String,
    pub cluster_id: String,
    pub backing_snapshot: bool,
}

/// The client a node mounts a volume with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mounter {
    Fuse,
    Kernel,
}

impl Mounter {
    pub fn name(self) -> &'static str {
        match self {
            Mounter::Fuse => "fuse",
            Mounter::Kernel => "kernel",
        }
    }

    pub fn parse(s: &str) -> Option<Mounter> {
        match s {
            "fuse" => Some(Mounter::Fuse),
            "kernel" => Some(Mounter::Kernel),
            _ => None,
        }
    }
}

/// The group ceph-csi puts its subvolumes in, and so do we by default.
pub const DEFAULT_GROUP: &str = "csi";
/// ceph-csi's prefix of subvolume names.
pub const DEFAULT_PREFIX: &str = "csi-vol-";

/// Keys ceph-csi knows that mean nothing here (yet), with why.
const NOT_SUPPORTED: &[(&str, &str)] = &[
    ("encrypted", "encryption is not supported yet"),
    ("encryptionKMSID", "encryption is not supported yet"),
    ("encryptionType", "encryption is not supported yet"),
    ("fscryptKMSID", "encryption is not supported yet"),
    ("radosNamespace", "ferrovol keeps no journal: names are derived from the request"),
    ("journalPool", "ferrovol keeps no journal: names are derived from the request"),
];

impl Parameters {
    /// Every parameter that makes the volume what it is: what a retry of
    /// the same request must match.
    pub fn fingerprint(&self) -> String {
        format!(
            "fsName={};subvolumeGroup={};pool={};prefix={};mounter={};fuse={};kernel={};\
             clusterID={};backingSnapshot={}",
            self.fs,
            self.group,
            self.pool.as_deref().unwrap_or(""),
            self.prefix,
            self.mounter.map(Mounter::name).unwrap_or(""),
            self.fuse_options,
            self.kernel_options,
            self.cluster_id,
            self.backing_snapshot
        )
    }
}

/// Mount options as a node passes them on (comma-separated words of a
/// small alphabet: nothing that could be read as another option or a path
/// outside the option).
pub(crate) fn mount_options(key: &str, value: &str) -> Result<String> {
    let ok = value.len() <= 256
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_=,.-".contains(&b));
    if !ok {
        return Err(error::invalid(format!(
            "parameter {key} must be comma-separated options of [A-Za-z0-9_=.-], at most 256 \
             characters"
        )));
    }
    Ok(value.to_string())
}

pub fn parse(params: &BTreeMap<String, String>) -> Result<Parameters> {
    let mut out = Parameters {
        fs: String::new(),
        group: DEFAULT_GROUP.into(),
        pool: None,
        prefix: DEFAULT_PREFIX.into(),
        mounter: None,
        fuse_options: String::new(),
        kernel_options: String::new(),
        cluster_id: String::new(),
        backing_snapshot: false,
    };
    for (key, value) in params {
        let v = value.as_str();
        match key.as_str() {
            "fsName" => out.fs = ids::check_id_part("fsName", v)?.into(),
            "subvolumeGroup" => out.group = ids::check_id_part("subvolumeGroup", v)?.into(),
            "pool" => out.pool = Some(ids::check_name("pool", v)?.into()),
            "volumeNamePrefix" => out.prefix = ids::check_prefix(v)?.into(),
            "mounter" => {
                out.mounter = Some(Mounter::parse(v).ok_or_else(|| {
                    error::invalid(format!(
                        "parameter mounter is {:?}: fuse or kernel",
                        error::bounded(v)
                    ))
                })?)
            }
            "fuseMountOptions" => out.fuse_options = mount_options(key, v)?,
            "kernelMountOptions" => out.kernel_options = mount_options(key, v)?,
            "clusterID" => out.cluster_id = ids::check_name("clusterID", v)?.into(),
            "backingSnapshot" => {
                out.backing_snapshot = match v {
                    "true" => true,
                    "false" | "" => false,
                    _ => {
                        return Err(error::invalid(format!(
                            "parameter backingSnapshot is {:?}: true or false",
                            error::bounded(v)
                        )))
                    }
                }
            }
            other => {
                let why = NOT_SUPPORTED.iter().find(|(k, _)| *k == other).map(|(_, w)| *w);
                return Err(error::invalid(match why {
                    Some(why) => format!("parameter {other} is not supported: {why}"),
                    None => format!("unknown parameter {:?}", error::bounded(other)),
                }));
            }
        }
    }
    if out.fs.is_empty() {
        return Err(error::invalid("parameter fsName is required (the CephFS file system)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_ceph_csi_class_parses() {
        let p = parse(&of(&[
            ("clusterID", "rook-ceph"),
            ("fsName", "myfs"),
            ("pool", "myfs-replicated"),
            ("mounter", "fuse"),
            ("fuseMountOptions", "debug"),
            ("kernelMountOptions", "readdir_max_bytes=1048576,norbytes"),
            ("subvolumeGroup", "csi"),
            ("volumeNamePrefix", "foo-bar-"),
        ]))
        .unwrap();
        assert_eq!(p.fs, "myfs");
        assert_eq!(p.pool.as_deref(), Some("myfs-replicated"));
        assert_eq!(p.mounter, Some(Mounter::Fuse));
        assert_eq!(p.prefix, "foo-bar-");
        let defaults = parse(&of(&[("fsName", "myfs")])).unwrap();
        assert_eq!((defaults.group.as_str(), defaults.prefix.as_str()), ("csi", "csi-vol-"));
        assert_ne!(p.fingerprint(), defaults.fingerprint());
    }

    #[test]
    fn bad_and_unknown_keys_are_named() {
        for (pairs, needle) in [
            (vec![], "fsName is required"),
            (vec![("fsName", "a"), ("encrypted", "true")], "encrypted is not supported"),
            (vec![("fsName", "a"), ("imageFeatures", "layering")], "imageFeatures"),
            (vec![("fsName", "a"), ("mounter", "nfs")], "fuse or kernel"),
            (vec![("fsName", "a:b")], "fsName"),
            (vec![("fsName", "a"), ("fuseMountOptions", "x /etc")], "fuseMountOptions"),
            (vec![("fsName", "a"), ("backingSnapshot", "yes")], "backingSnapshot"),
        ] {
            let e = parse(&of(&pairs)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(e.message().contains(needle), "{pairs:?}: {e}");
        }
    }
}
