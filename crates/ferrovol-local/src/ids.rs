//! Opaque object IDs: a kind prefix and 128 random bits in hex.
//!
//! IDs become file names in the local engine, so parsing is strict: only the
//! exact form we mint is accepted, which rules out `..`, `/`, NUL, and
//! anything over-long before a path is ever built from an ID.

/// The kinds of objects an engine mints IDs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Volume,
    Snapshot,
    Group,
}

impl Kind {
    /// What the object is called in messages.
    pub const fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Group => "group snapshot",
        }
    }

    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "vol-",
            Kind::Snapshot => "snap-",
            Kind::Group => "group-",
        }
    }
}

const HEX_LEN: usize = 32;

/// Separates an ID's random part from the tag of the node that minted it.
pub const NODE_SEPARATOR: char = '@';

/// The prefix of a group snapshot whose members live on several nodes: the
/// relay names each node's part of the group with the same ID, so every
/// member reports the one group it belongs to.
const SHARED_GROUP_PREFIX: &str = "xgroup-";

/// Longest node name carried as itself in IDs; longer ones are hashed so an
/// ID stays within CSI's 128 bytes.
const MAX_PLAIN_TAG: usize = 63;

/// How IDs name the node a volume lives on: the node ID itself when it is a
/// short lowercase DNS label-like name (what Kubernetes node names are),
/// else `_` and 16 hex digits of its FNV-1a hash (`_` never appears in a
/// plain tag, so the two forms cannot collide). The relay routes a call by
/// this tag without asking any node.
pub fn node_tag(node_id: &str) -> String {
    if is_plain_tag(node_id) {
        return node_id.to_string();
    }
    format!("_{:016x}", fnv1a(node_id.bytes()))
}

/// The 64-bit FNV-1a hash: stable across builds and platforms, for names
/// that must map to the same tag or node everywhere (not for secrecy).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes
        .into_iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn is_plain_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PLAIN_TAG
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("..")
}

fn is_tag(s: &str) -> bool {
    is_plain_tag(s)
        || s.strip_prefix('_').is_some_and(|h| h.len() == 16 && h.bytes().all(is_lower_hex))
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_hex_id(rest: &str) -> bool {
    rest.len() == HEX_LEN && rest.bytes().all(is_lower_hex)
}

/// A fresh random ID of this kind, tagged with the node that mints it.
pub fn mint(kind: Kind, tag: &str) -> String {
    debug_assert!(is_tag(tag), "{tag:?} is not a node tag");
    format!("{}{}{NODE_SEPARATOR}{tag}", kind.prefix(), uuid::Uuid::new_v4().simple())
}

/// The ID of a group snapshot shared by several nodes, derived from the
/// CO's name so that a retried request finds the same group everywhere.
pub fn shared_group(name: &str) -> String {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
    format!("{SHARED_GROUP_PREFIX}{}", id.simple())
}

/// True when `s` is a group ID as [`shared_group`] makes them: one group
/// spread over several nodes.
pub fn is_shared_group(s: &str) -> bool {
    s.strip_prefix(SHARED_GROUP_PREFIX).is_some_and(is_hex_id)
}

/// True when `s` is exactly an ID of this kind as [`mint`] makes them (or
/// as it made them before IDs carried a node tag), or, for groups, as
/// [`shared_group`] makes them.
pub fn is_valid(kind: Kind, s: &str) -> bool {
    if kind == Kind::Group && is_shared_group(s) {
        return true;
    }
    let Some(rest) = s.strip_prefix(kind.prefix()) else { return false };
    match rest.split_once(NODE_SEPARATOR) {
        None => is_hex_id(rest),
        Some((hex, tag)) => is_hex_id(hex) && is_tag(tag),
    }
}

/// The node tag a valid ID carries: None for IDs minted before tags (and
/// for shared groups, which live on several nodes).
pub fn tag_of(id: &str) -> Option<&str> {
    id.split_once(NODE_SEPARATOR).map(|(_, tag)| tag).filter(|t| is_tag(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_valid_and_distinct() {
        for kind in [Kind::Volume, Kind::Snapshot, Kind::Group] {
            let a = mint(kind, "node-1");
            assert!(is_valid(kind, &a), "{a}");
            assert_ne!(a, mint(kind, "node-1"));
            assert_eq!(tag_of(&a), Some("node-1"));
            // IDs minted before tags stay valid.
            let untagged = a.split_once(NODE_SEPARATOR).unwrap().0;
            assert!(is_valid(kind, untagged), "{untagged}");
            assert_eq!(tag_of(untagged), None);
        }
        let shared = shared_group("groupsnapshot-1");
        assert!(is_valid(Kind::Group, &shared));
        assert_eq!(shared, shared_group("groupsnapshot-1"));
        assert_ne!(shared, shared_group("groupsnapshot-2"));
        assert!(!is_valid(Kind::Volume, &shared));
    }

    #[test]
    fn node_tags_fit_and_never_collide_across_forms() {
        assert_eq!(node_tag("worker-1.example.com"), "worker-1.example.com");
        for odd in ["Worker", "a".repeat(64).as_str(), "n/x", "", "a..b", "-a", "a_b"] {
            let t = node_tag(odd);
            assert!(t.starts_with('_') && t.len() == 17, "{odd:?} -> {t}");
            assert!(is_valid(Kind::Volume, &mint(Kind::Volume, &t)));
        }
        assert_ne!(node_tag("Worker"), node_tag("worker2"));
        let longest = mint(Kind::Group, &"a".repeat(MAX_PLAIN_TAG));
        assert!(longest.len() <= 128, "{}", longest.len());
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let good = mint(Kind::Volume, "n1");
        let bare = good.split_once(NODE_SEPARATOR).unwrap().0;
        let hostile = [
            String::new(),
            "vol-".into(),
            "../../etc/passwd".into(),
            format!("{good}/../x"),
            format!("{good}\0"),
            format!("/{good}"),
            good.to_uppercase(),
            format!("{bare}0"),
            bare[..bare.len() - 1].to_string(),
            good.replace("vol-", "snap-"),
            format!("{good}/x"),
            format!("{good}@n2"),
            good.replace("@n1", "@"),
            good.replace("@n1", "@../x"),
            good.replace("@n1", "@N1"),
            good.replace("@n1", "@_123"),
            "vol-%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f".into(),
            format!("vol-{}", "0".repeat(4096)),
        ];
        for h in &hostile {
            assert!(!is_valid(Kind::Volume, h), "{h:?} must be rejected");
        }
        assert!(!is_valid(Kind::Snapshot, &good));
    }
}
