//! Mount options a capability may carry (`mount_flags`, from a PV's
//! `mountOptions`): an allow-list per filesystem, checked before anything
//! reaches the kernel. A refused option is INVALID_ARGUMENT naming it, so
//! an operator fixes the class instead of reading "Invalid argument (os
//! error 22)". Options that would hand a pod device nodes or setuid
//! binaries (`dev`, `suid`, `exec`: every filesystem volume is mounted
//! `nodev,nosuid`, as the kubelet expects) or could take the node down
//! (`errors=panic`) are refused, and so is anything that changes what is
//! mounted rather than how (`remount`, `move`, `subvol=`).

use crate::error::{self, Result};

/// Options any filesystem takes, as the kernel's generic mount flags.
const GENERIC: &[&str] = &[
    "ro",
    "rw",
    "defaults",
    "bind",
    "nosuid",
    "nodev",
    "noexec",
    "sync",
    "async",
    "dirsync",
    "noatime",
    "nodiratime",
    "relatime",
    "strictatime",
    "lazytime",
    "nolazytime",
];

/// Never: what they would do to the node, for the refusal.
const REFUSED: &[(&str, &str)] = &[
    ("dev", "device nodes on a pod's volume would reach the host's devices"),
    ("suid", "setuid binaries on a pod's volume would run with their owner's rights"),
    ("exec", "volumes are mounted as the kubelet expects; leave exec out (it is the default)"),
    ("remount", "a capability says how to mount, not to change an existing mount"),
    ("move", "a capability says how to mount, not to move an existing mount"),
    ("rbind", "a capability says how to mount, not what"),
];

/// Per filesystem: options without a value, and options with one (the
/// value's shape).
enum Value {
    Number,
    OneOf(&'static [&'static str]),
}

fn fs_options(fs: &str) -> (&'static [&'static str], &'static [(&'static str, Value)]) {
    match fs {
        "ext4" => (
            &[
                "acl",
                "noacl",
                "user_xattr",
                "nouser_xattr",
                "barrier",
                "nobarrier",
                "discard",
                "nodiscard",
                "delalloc",
                "nodelalloc",
                "auto_da_alloc",
                "noauto_da_alloc",
                "journal_checksum",
                "nojournal_checksum",
                "journal_async_commit",
                "block_validity",
                "noblock_validity",
                "init_itable",
                "noinit_itable",
                "i_version",
                "usrquota",
                "grpquota",
                "prjquota",
                "quota",
                "noquota",
                "nombcache",
            ],
            &[
                ("errors", Value::OneOf(&["remount-ro", "continue"])),
                ("data", Value::OneOf(&["ordered", "writeback", "journal"])),
                ("commit", Value::Number),
                ("stripe", Value::Number),
                ("max_batch_time", Value::Number),
                ("min_batch_time", Value::Number),
                ("journal_ioprio", Value::Number),
                ("inode_readahead_blks", Value::Number),
            ],
        ),
        "xfs" => (
            &[
                "nouuid",
                "inode32",
                "inode64",
                "largeio",
                "nolargeio",
                "swalloc",
                "discard",
                "nodiscard",
                "wsync",
                "filestreams",
                "attr2",
                "noattr2",
                "ikeep",
                "noikeep",
                "grpid",
                "nogrpid",
                "bsdgroups",
                "sysvgroups",
                "usrquota",
                "grpquota",
                "prjquota",
                "uquota",
                "gquota",
                "pquota",
                "uqnoenforce",
                "gqnoenforce",
                "pqnoenforce",
                "qnoenforce",
                "noquota",
            ],
            &[
                ("logbufs", Value::Number),
                ("logbsize", Value::Number),
                ("allocsize", Value::Number),
                ("sunit", Value::Number),
                ("swidth", Value::Number),
            ],
        ),
        "btrfs" => (
            &[
                "compress",
                "compress-force",
                "autodefrag",
                "noautodefrag",
                "discard",
                "nodiscard",
                "ssd",
                "nossd",
                "ssd_spread",
                "nossd_spread",
                "datacow",
                "nodatacow",
                "datasum",
                "nodatasum",
                "flushoncommit",
                "noflushoncommit",
                "barrier",
                "nobarrier",
                "acl",
                "noacl",
                "space_cache",
                "nospace_cache",
            ],
            &[
                ("compress", Value::OneOf(&["zlib", "lzo", "zstd", "no"])),
                ("compress-force", Value::OneOf(&["zlib", "lzo", "zstd"])),
                ("discard", Value::OneOf(&["sync", "async"])),
                ("space_cache", Value::OneOf(&["v1", "v2"])),
                ("commit", Value::Number),
                ("thread_pool", Value::Number),
                ("max_inline", Value::Number),
            ],
        ),
        _ => (&[], &[]),
    }
}

/// Numbers as mount options write them: digits, an optional k/m/g suffix.
fn is_number(v: &str) -> bool {
    let digits = v.strip_suffix(['k', 'K', 'm', 'M', 'g', 'G']).unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Checks every option of `flags` (each may hold several, comma-separated)
/// for a `fs` volume.
pub fn check(fs: &str, flags: &[String]) -> Result<()> {
    let (plain, valued) = fs_options(fs);
    for opt in flags.iter().flat_map(|f| f.split(',')).map(str::trim).filter(|o| !o.is_empty()) {
        let shown = crate::error::bounded(opt);
        if let Some((_, why)) = REFUSED.iter().find(|(name, _)| *name == opt) {
            return Err(error::invalid(format!("mount option {shown:?} is refused: {why}")));
        }
        if opt == "errors=panic" {
            return Err(error::invalid(format!(
                "mount option {shown:?} is refused: a filesystem error would take the whole \
                 node down; use errors=remount-ro"
            )));
        }
        if GENERIC.contains(&opt) || plain.contains(&opt) {
            continue;
        }
        let known = opt.split_once('=').is_some_and(|(key, value)| {
            // btrfs' compress=zstd:3 carries a level.
            let value = match key {
                "compress" | "compress-force" => value.split(':').next().unwrap_or(value),
                _ => value,
            };
            valued.iter().any(|(k, shape)| {
                *k == key
                    && match shape {
                        Value::Number => is_number(value),
                        Value::OneOf(allowed) => allowed.contains(&value),
                    }
            })
        });
        if !known {
            return Err(error::invalid(format!(
                "mount option {shown:?} is not one ferrovol applies to {fs} volumes (see \
                 docs/architecture.md, \"Mount options\")"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(fs: &str, flags: &[&str]) -> bool {
        check(fs, &flags.iter().map(|s| s.to_string()).collect::<Vec<_>>()).is_ok()
    }

    #[test]
    fn the_allow_list() {
        for bad in ["dev", "suid", "exec", "nosuid,dev", "remount", "errors=panic", "bogus"] {
            assert!(!ok("ext4", &[bad]), "{bad}");
        }
        assert!(ok("ext4", &["noatime,errors=remount-ro", "data=ordered", "commit=30"]));
        // A filesystem without a table of its own (an engine's own, such as
        // a network filesystem) takes the generic options alone.
        assert!(ok("memfs", &["noatime,ro"]));
        assert!(!ok("memfs", &["data=ordered"]));
        assert!(ok("xfs", &["nouuid", "logbsize=256k"]));
        assert!(ok("btrfs", &["compress=zstd:3", "space_cache=v2"]));
        assert!(!ok("xfs", &["data=ordered"]), "ext4's option on xfs");
        assert!(!ok("ext4", &["commit=soon"]));
        let e = check("ext4", &["x".repeat(10_000)]).unwrap_err();
        assert!(e.message().len() < 400, "bounded: {}", e.message().len());
    }
}
