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

/// A fresh random ID of this kind.
pub fn mint(kind: Kind) -> String {
    format!("{}{}", kind.prefix(), uuid::Uuid::new_v4().simple())
}

/// True when `s` is exactly an ID of this kind as [`mint`] makes them.
pub fn is_valid(kind: Kind, s: &str) -> bool {
    s.strip_prefix(kind.prefix()).is_some_and(|hex| {
        hex.len() == HEX_LEN
            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_valid_and_distinct() {
        for kind in [Kind::Volume, Kind::Snapshot, Kind::Group] {
            let a = mint(kind);
            assert!(is_valid(kind, &a), "{a}");
            assert_ne!(a, mint(kind));
        }
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let good = mint(Kind::Volume);
        let hostile = [
            String::new(),
            "vol-".into(),
            "../../etc/passwd".into(),
            format!("{good}/../x"),
            format!("{good}\0"),
            format!("/{good}"),
            good.to_uppercase(),
            format!("{good}0"),
            good[..good.len() - 1].to_string(),
            good.replace("vol-", "snap-"),
            "vol-%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f".into(),
            format!("vol-{}", "0".repeat(4096)),
        ];
        for h in &hostile {
            assert!(!is_valid(Kind::Volume, h), "{h:?} must be rejected");
        }
        assert!(!is_valid(Kind::Snapshot, &good));
    }
}
