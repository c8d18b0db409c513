//! Our declarations of Ceph's C structs and constants against Ceph's own
//! headers: a C program compiled against the installed development
//! headers (`librados-dev`, `librbd-dev`, `libcephfs-dev`, which `.ci/run`
//! installs) prints
//! every struct's size and field offsets and every constant, and each must
//! equal what Rust lays out and declares. A wrong declaration would
//! otherwise be found only as memory corruption at run time.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use ferrovol_ceph::ffi;

/// One fact, as both sides name it: (key, Rust's value, the C expression).
type Fact = (String, u64, String);

/// The size and every field offset of a struct of ours and its C twin.
macro_rules! layout {
    ($facts:ident, $rust:ident => $c:literal { $($field:ident),* $(,)? }) => {
        $facts.push((
            format!("size {}", stringify!($rust)),
            size_of::<ffi::$rust>() as u64,
            format!("sizeof({})", $c),
        ));
        $(
            $facts.push((
                format!("offset {}.{}", stringify!($rust), stringify!($field)),
                offset_of!(ffi::$rust, $field) as u64,
                format!("offsetof({}, {})", $c, stringify!($field)),
            ));
        )*
    };
}

/// A constant of ours and the C name it mirrors.
macro_rules! constant {
    ($facts:ident, $value:expr => $c:literal) => {
        $facts.push((
            format!("const {}", stringify!($value)),
            $value as u64,
            format!("(unsigned long long)({})", $c),
        ));
    };
}

fn facts() -> Vec<Fact> {
    let mut f = Vec::new();
    layout!(f, ClusterStat => "struct rados_cluster_stat_t" { kb, kb_used, kb_avail, num_objects });
    layout!(f, ImageSpec => "rbd_image_spec_t" { id, name });
    layout!(f, SnapInfo => "rbd_snap_info_t" { id, size, name });
    layout!(f, ImageInfo => "rbd_image_info_t" {
        size, obj_size, num_objs, order, block_name_prefix, parent_pool, parent_name,
    });
    layout!(f, TrashInfo => "rbd_trash_image_info_t" {
        id, name, source, deletion_time, deferment_end_time,
    });
    layout!(f, GroupInfo => "rbd_group_info_t" { name, pool });
    layout!(f, GroupSnapInfo => "rbd_group_snap_info_t" { name, state });
    layout!(f, SnapGroupNamespace => "rbd_snap_group_namespace_t" {
        group_pool, group_name, group_snap_name,
    });
    layout!(f, LinkedImageSpec => "rbd_linked_image_spec_t" {
        pool_id, pool_name, pool_namespace, image_id, image_name, trash,
    });
    layout!(f, SnapSpec => "rbd_snap_spec_t" { id, namespace_type, name });
    layout!(f, Watcher => "rbd_image_watcher_t" { addr, id, cookie });
    layout!(f, Statx => "struct ceph_statx" {
        stx_mask, stx_blksize, stx_nlink, stx_uid, stx_gid, stx_mode, stx_ino, stx_size,
        stx_blocks, stx_dev, stx_rdev, stx_atime, stx_ctime, stx_mtime, stx_btime, stx_version,
    });
    layout!(f, Dirent => "struct dirent" { d_ino, d_off, d_reclen, d_type, d_name });
    constant!(f, ffi::STATX_BASIC_STATS => "CEPH_STATX_BASIC_STATS");
    constant!(f, ffi::SETATTR_MODE => "CEPH_SETATTR_MODE");
    constant!(f, ffi::SETATTR_UID => "CEPH_SETATTR_UID");
    constant!(f, ffi::SETATTR_GID => "CEPH_SETATTR_GID");
    constant!(f, ffi::SETATTR_MTIME => "CEPH_SETATTR_MTIME");
    constant!(f, ffi::SETATTR_ATIME => "CEPH_SETATTR_ATIME");
    constant!(f, ferrovol_ceph::fs::NOFOLLOW => "AT_SYMLINK_NOFOLLOW");
    constant!(f, ffi::OPTION_FORMAT => "RBD_IMAGE_OPTION_FORMAT");
    constant!(f, ffi::OPTION_FEATURES => "RBD_IMAGE_OPTION_FEATURES");
    constant!(f, ffi::OPTION_DATA_POOL => "RBD_IMAGE_OPTION_DATA_POOL");
    constant!(f, ffi::OPTION_CLONE_FORMAT => "RBD_IMAGE_OPTION_CLONE_FORMAT");
    constant!(f, ffi::SNAP_NAMESPACE_USER => "RBD_SNAP_NAMESPACE_TYPE_USER");
    constant!(f, ffi::SNAP_NAMESPACE_GROUP => "RBD_SNAP_NAMESPACE_TYPE_GROUP");
    constant!(f, ffi::SNAP_NAMESPACE_TRASH => "RBD_SNAP_NAMESPACE_TYPE_TRASH");
    constant!(f, ffi::GROUP_SNAP_STATE_COMPLETE => "RBD_GROUP_SNAP_STATE_COMPLETE");
    constant!(f, ffi::LOCK_MODE_EXCLUSIVE => "RBD_LOCK_MODE_EXCLUSIVE");
    constant!(f, ffi::CREATE_EXCLUSIVE => "LIBRADOS_CREATE_EXCLUSIVE");
    constant!(f, ferrovol_ceph::FEATURE_EXCLUSIVE_LOCK => "RBD_FEATURE_EXCLUSIVE_LOCK");
    for (name, c) in [
        ("layering", "RBD_FEATURE_LAYERING"),
        ("striping", "RBD_FEATURE_STRIPINGV2"),
        ("exclusive-lock", "RBD_FEATURE_EXCLUSIVE_LOCK"),
        ("object-map", "RBD_FEATURE_OBJECT_MAP"),
        ("fast-diff", "RBD_FEATURE_FAST_DIFF"),
        ("deep-flatten", "RBD_FEATURE_DEEP_FLATTEN"),
        ("journaling", "RBD_FEATURE_JOURNALING"),
        ("data-pool", "RBD_FEATURE_DATA_POOL"),
    ] {
        let bit = ferrovol_ceph::feature_bit(name).expect("a feature we name");
        f.push((format!("feature {name}"), bit, format!("(unsigned long long)({c})")));
    }
    f
}

/// Compiles and runs the C side; None when the headers are not installed.
fn c_side(facts: &[Fact]) -> Option<BTreeMap<String, u64>> {
    if !Path::new("/usr/include/rbd/librbd.h").exists() {
        assert!(
            std::env::var_os("FERROVOL_REQUIRE_CEPH").is_none(),
            "FERROVOL_REQUIRE_CEPH is set but Ceph's headers are not installed \
             (librados-dev librbd-dev)"
        );
        eprintln!("skipped: no Ceph development headers (apt install librados-dev librbd-dev)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut program = String::from(
        "#define _FILE_OFFSET_BITS 64\n#include <stddef.h>\n#include <stdio.h>\n\
         #include <dirent.h>\n#include <rados/librados.h>\n\
         #include <rbd/librbd.h>\n#include <rbd/features.h>\n#include <cephfs/libcephfs.h>\n\
         int main(void) {\n",
    );
    for (key, _, expr) in facts {
        program.push_str(&format!(
            "  printf(\"%s=%llu\\n\", \"{key}\", (unsigned long long)({expr}));\n"
        ));
    }
    program.push_str("  return 0;\n}\n");
    let (source, binary) = (dir.path().join("abi.c"), dir.path().join("abi"));
    std::fs::write(&source, program).unwrap();
    let built = Command::new("cc").arg("-o").arg(&binary).arg(&source).output().expect("cc");
    assert!(built.status.success(), "compiling: {}", String::from_utf8_lossy(&built.stderr));
    let ran = Command::new(&binary).output().unwrap();
    assert!(ran.status.success());
    Some(
        String::from_utf8(ran.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect(),
    )
}

#[test]
fn declarations_match_ceph_s_headers() {
    let facts = facts();
    let Some(c) = c_side(&facts) else { return };
    let wrong: Vec<String> = facts
        .iter()
        .filter(|(key, ours, _)| c.get(key) != Some(ours))
        .map(|(key, ours, _)| format!("{key}: ours {ours}, Ceph's {:?}", c.get(key)))
        .collect();
    assert!(
        wrong.is_empty(),
        "declarations that differ from Ceph's headers:\n{}",
        wrong.join("\n")
    );
    eprintln!("{} sizes, offsets and constants match Ceph's headers", facts.len());
}
