//! Request validation shared by the services: pure functions from wire types
//! to checked values, so every RPC applies the same rules and the rules can be
//! tested (and fuzzed) without a server.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ferrovol_csi as csi;
use ferrovol_csi::volume_capability::access_mode::Mode;

use crate::engine::{AccessType, Features};
use crate::error::{self, Error, Result};

/// CSI caps strings at 128 bytes.
pub const MAX_STRING: usize = 128;

/// Prefix of the keys Kubernetes' sidecars add to parameters for their own
/// use (pvc/pv names, secret references, fstype); never engine parameters.
pub const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// A required name (of a volume, snapshot or group): non-empty, at most 128
/// bytes, and free of the control characters the spec bans.
pub fn name(value: &str, what: &str) -> Result<()> {
    id(value, what)?;
    let banned =
        |c: char| matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F);
    if value.chars().any(banned) {
        return Err(error::invalid(format!("{what} contains control characters")));
    }
    Ok(())
}

/// A required ID field: present and of sane length. Whether it names
/// anything is the engine's question (NOT_FOUND), not a validation one.
pub fn id(value: &str, what: &str) -> Result<()> {
    if value.is_empty() {
        return Err(error::invalid(format!("{what} is required")));
    }
    if value.len() > MAX_STRING {
        return Err(error::invalid(format!(
            "{what} is {} bytes; at most {MAX_STRING}",
            value.len()
        )));
    }
    Ok(())
}

/// CSI's limit on a whole map (parameters, secrets, contexts).
pub const MAX_MAP: usize = 4096;

/// The spec's size limits on a request's maps: a key at most 128 bytes,
/// keys and values at most 4 KiB in all. Nothing of an oversized map is
/// echoed back (its bytes may be a secret).
pub fn maps(maps: &[(&str, &HashMap<String, String>)]) -> Result<()> {
    for (field, map) in maps {
        if let Some(k) = map.keys().find(|k| k.len() > MAX_STRING) {
            return Err(error::invalid(format!(
                "a key of {field} is {} bytes; at most {MAX_STRING}",
                k.len()
            )));
        }
        let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > MAX_MAP {
            return Err(error::invalid(format!(
                "{field} is {total} bytes in all; at most {MAX_MAP}"
            )));
        }
    }
    Ok(())
}

/// Longest path the node service accepts (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// A path the CO gave the node service: absolute, normalized, under the
/// kubelet directory, and still under it once symlinks in the part that
/// exists are resolved. Nothing outside the kubelet directory is ever
/// mounted on, created or removed.
pub fn kubelet_path(raw: &str, what: &str, kubelet_dir: &Path) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(error::invalid(format!("{what} is required")));
    }
    if raw.len() > MAX_PATH || raw.contains('\0') {
        return Err(error::invalid(format!("{what} is not a usable path")));
    }
    let path = PathBuf::from(raw);
    // The string itself is checked, not Path::components(), which drops a
    // "." inside a path (`/var/lib/kubelet/./x` is not normalized).
    if !path.is_absolute() || raw.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(error::invalid(format!(
            "{what} {:?} must be absolute and normalized",
            error::bounded(raw)
        )));
    }
    if !path.starts_with(kubelet_dir) || path == kubelet_dir {
        return Err(error::invalid(format!(
            "{what} {:?} is not inside the kubelet directory {}",
            error::bounded(raw),
            kubelet_dir.display()
        )));
    }
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let resolved = existing
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", error::bounded(raw)), e))?;
    if !resolved.starts_with(kubelet_dir) {
        return Err(error::invalid(format!(
            "{what} {:?} leads outside the kubelet directory through a symlink",
            error::bounded(raw)
        )));
    }
    Ok(path)
}

/// (required, limit) in bytes; 0 means unset.
pub fn capacity_range(range: Option<&csi::CapacityRange>) -> Result<(u64, u64)> {
    let Some(r) = range else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(error::invalid("capacity_range values must not be negative"));
    }
    let (required, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
    if limit > 0 && required > limit {
        return Err(error::invalid(format!(
            "required_bytes {required} is greater than limit_bytes {limit}"
        )));
    }
    Ok((required, limit))
}

/// Checks one capability against what the engine supports; the error says
/// why it cannot be served.
pub fn capability(cap: &csi::VolumeCapability, features: &Features) -> Result<AccessType> {
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| error::invalid("volume capability needs a known access_mode"))?;
    let access = match &cap.access_type {
        None => {
            return Err(error::invalid("volume capability needs an access_type (mount or block)"))
        }
        Some(csi::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            let Some(fs) = features.filesystem(&m.fs_type) else {
                let names: Vec<&str> = features.filesystems.iter().map(|f| f.name).collect();
                return Err(error::invalid(match names.is_empty() {
                    true => format!(
                        "fs_type {:?} is not supported: this engine's volumes come with their \
                         own filesystem (leave fs_type empty)",
                        error::bounded(&m.fs_type)
                    ),
                    false => format!(
                        "fs_type {:?} is not supported (one of {names:?})",
                        error::bounded(&m.fs_type)
                    ),
                }));
            };
            super::mount_options::check(fs.name, &m.mount_flags)?;
            AccessType::Mount { fs_type: m.fs_type.clone() }
        }
    };
    let supported = features.modes(&access);
    if supported.is_empty() && access == AccessType::Block {
        return Err(error::invalid(
            "this engine has no raw block volumes (its volumes are filesystems: ask for a mount \
             access type)",
        ));
    }
    if !supported.contains(&mode) {
        let names: Vec<&str> = supported.iter().map(|m| m.as_str_name()).collect();
        return Err(error::invalid(format!(
            "access mode {} is not supported for {} volumes by this engine (it supports {})",
            mode.as_str_name(),
            match access {
                AccessType::Block => "raw block",
                AccessType::Mount { .. } => "filesystem",
            },
            names.join(", ")
        )));
    }
    Ok(access)
}

/// Checks a required capability list; answers the first one's access type
/// (what the volume is created for).
pub fn capabilities(caps: &[csi::VolumeCapability], features: &Features) -> Result<AccessType> {
    if caps.is_empty() {
        return Err(error::invalid("volume_capabilities is required"));
    }
    let mut first = None;
    for cap in caps {
        let access = capability(cap, features)?;
        first.get_or_insert(access);
    }
    Ok(first.expect("non-empty"))
}

/// Engine parameters: the CO's own keys removed.
pub fn engine_parameters(parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter(|(k, _)| !k.starts_with(CO_PARAMETER_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A request's secrets, for the engine only.
pub fn secrets(secrets: &HashMap<String, String>) -> crate::engine::Secrets {
    secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Wire topology segments as the engine's map.
pub fn topology(t: &csi::Topology) -> crate::engine::Topology {
    t.segments.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A listing's page size: 0 means "as many as you like".
pub fn max_entries(value: i32) -> Result<usize> {
    match value {
        n if n < 0 => Err(error::invalid("max_entries must not be negative")),
        // "No limit" and limits past a reply's worth: one reply's worth and
        // a next_token (the spec lets a plugin return fewer). An entry is a
        // few hundred bytes, so a page stays far below the 4 MiB every
        // gRPC client accepts by default, and a listing never holds the
        // whole set in memory.
        0 => Ok(MAX_PAGE),
        n => Ok((n as usize).min(MAX_PAGE)),
    }
}

/// The most entries one ListVolumes or ListSnapshots reply holds.
pub const MAX_PAGE: usize = 4096;

/// Whether a requested topology segment set describes where we are.
pub fn topology_matches(ours: &BTreeMap<String, String>, theirs: &HashMap<String, String>) -> bool {
    theirs.iter().all(|(k, v)| ours.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, AccessType as Wire, BlockVolume, MountVolume};
    use tonic::Code;

    fn cap(mode: Mode, access: Option<Wire>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str) -> Option<Wire> {
        Some(Wire::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    fn single_node() -> Features {
        use crate::engine::Filesystem;
        Features {
            expansion: crate::engine::ExpansionSite::Node,
            node_expansion: true,
            clones: true,
            filesystems: ["ext4", "xfs", "btrfs"]
                .map(|name| Filesystem { name, minimum_size: 1 << 20 })
                .to_vec(),
            mount_modes: Features::single_node_modes(),
            block_modes: Features::single_node_modes(),
        }
    }

    #[test]
    fn paths_with_dot_components_are_not_normalized() {
        let dir = std::env::temp_dir().canonicalize().unwrap();
        for raw in ["/./stg", "/a/./stg", "/a/../stg", "/a/stg/."] {
            let raw = format!("{}{raw}", dir.display());
            let e = kubelet_path(&raw, "staging_target_path", &dir).unwrap_err();
            assert!(e.message().contains("normalized"), "{raw}: {e:?}");
        }
    }

    #[test]
    fn single_node_modes_and_known_filesystems_pass() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            for fs in ["", "ext4", "xfs", "btrfs"] {
                capability(&cap(mode, mount(fs)), &single_node()).unwrap();
            }
            assert_eq!(
                capability(&cap(mode, Some(Wire::Block(BlockVolume {}))), &single_node()).unwrap(),
                AccessType::Block
            );
        }
    }

    #[test]
    fn bad_capabilities_are_invalid_argument() {
        let bad = [
            cap(Mode::MultiNodeMultiWriter, mount("ext4")),
            cap(Mode::MultiNodeReaderOnly, mount("")),
            cap(Mode::Unknown, mount("ext4")),
            cap(Mode::SingleNodeWriter, None),
            cap(Mode::SingleNodeWriter, mount("ntfs")),
            csi::VolumeCapability { access_mode: None, access_type: mount("") },
            csi::VolumeCapability {
                access_mode: Some(AccessMode { mode: 99 }),
                access_type: mount(""),
            },
        ];
        for c in &bad {
            assert_eq!(
                capability(c, &single_node()).unwrap_err().code(),
                Code::InvalidArgument,
                "{c:?}"
            );
        }
        assert_eq!(capabilities(&[], &single_node()).unwrap_err().code(), Code::InvalidArgument);
        // An engine that shares raw block volumes across nodes, not
        // filesystems (as Ceph RBD does).
        let mut shared = single_node();
        shared.block_modes.push(Mode::MultiNodeMultiWriter);
        let block = cap(Mode::MultiNodeMultiWriter, Some(Wire::Block(BlockVolume {})));
        capability(&block, &shared).expect("multi-node block");
        let e = capability(&cap(Mode::MultiNodeMultiWriter, mount("")), &shared).unwrap_err();
        assert!(e.message().contains("filesystem"), "{e}");
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| csi::CapacityRange { required_bytes: req, limit_bytes: lim };
        assert_eq!(capacity_range(None).unwrap(), (0, 0));
        assert_eq!(capacity_range(Some(&r(10, 20))).unwrap(), (10, 20));
        for bad in [r(-1, 0), r(0, -1), r(30, 20)] {
            assert_eq!(capacity_range(Some(&bad)).unwrap_err().code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn names() {
        name("pvc-0b6c1f1e-1234", "name").unwrap();
        name("ünïcödé ok", "name").unwrap();
        for bad in ["", "a\u{0}b", "a\u{7}", "\u{85}", &"x".repeat(129)] {
            assert_eq!(name(bad, "name").unwrap_err().code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn co_keys_are_not_engine_parameters() {
        let p = HashMap::from([
            ("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string()),
            ("provisioning".to_string(), "thick".to_string()),
        ]);
        assert_eq!(
            engine_parameters(&p),
            BTreeMap::from([("provisioning".to_string(), "thick".to_string())])
        );
    }
}
