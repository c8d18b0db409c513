//! Per-name and per-ID operation locks.
//!
//! The sidecars retry on ABORTED, so a request for an object that already has
//! an operation in flight is refused at once instead of queued: no request
//! ever waits behind another, and independent objects never contend. There
//! is no global lock.
//!
//! A lock is shared (e.g. a source being cloned by several requests at once)
//! or exclusive (e.g. the object being deleted). Acquisition is all or
//! nothing, so two requests can never deadlock on each other's keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{self, Result};

#[derive(Debug)]
enum Hold {
    Exclusive,
    Shared(usize),
}

#[derive(Default, Clone)]
pub struct OpLocks {
    held: Arc<Mutex<HashMap<String, Hold>>>,
}

/// Released when dropped, on every path (success, error, panic, cancel).
#[must_use]
pub struct OpGuard {
    held: Arc<Mutex<HashMap<String, Hold>>>,
    keys: Vec<String>,
}

/// Lock keys, one namespace per kind of object.
pub fn volume_name(name: &str) -> String {
    format!("volume-name/{name}")
}
pub fn volume(id: &str) -> String {
    format!("volume/{id}")
}
pub fn snapshot_name(name: &str) -> String {
    format!("snapshot-name/{name}")
}
pub fn snapshot(id: &str) -> String {
    format!("snapshot/{id}")
}
pub fn group_name(name: &str) -> String {
    format!("group-name/{name}")
}
pub fn group(id: &str) -> String {
    format!("group/{id}")
}

impl OpLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `exclusive` keys exclusively and `shared` keys shared, or
    /// nothing at all: ABORTED naming the busy key.
    pub fn acquire(&self, exclusive: &[String], shared: &[String]) -> Result<OpGuard> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in exclusive {
            if held.contains_key(key) {
                return Err(busy(key));
            }
        }
        for key in shared {
            if matches!(held.get(key), Some(Hold::Exclusive)) || exclusive.contains(key) {
                return Err(busy(key));
            }
        }
        for key in exclusive {
            held.insert(key.clone(), Hold::Exclusive);
        }
        for key in shared {
            match held.get_mut(key) {
                Some(Hold::Shared(n)) => *n += 1,
                _ => {
                    held.insert(key.clone(), Hold::Shared(1));
                }
            }
        }
        let keys = exclusive.iter().chain(shared).cloned().collect();
        Ok(OpGuard { held: self.held.clone(), keys })
    }

    pub fn exclusive(&self, key: String) -> Result<OpGuard> {
        self.acquire(&[key], &[])
    }

    /// Number of keys currently held (for tests and metrics).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn busy(key: &str) -> crate::error::Error {
    error::busy(format!("an operation on {key} is already in progress"))
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            match held.get_mut(key) {
                Some(Hold::Shared(n)) if *n > 1 => *n -= 1,
                _ => {
                    held.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn exclusive_blocks_everything_on_that_key_only() {
        let l = OpLocks::new();
        let g = l.exclusive(volume("a")).unwrap();
        assert_eq!(l.exclusive(volume("a")).err().unwrap().code(), Code::Aborted);
        assert_eq!(l.acquire(&[], &[volume("a")]).err().unwrap().code(), Code::Aborted);
        let _other = l.exclusive(volume("b")).expect("independent keys never contend");
        drop(g);
        let _g = l.exclusive(volume("a")).expect("released on drop");
    }

    #[test]
    fn shared_holders_coexist_and_block_exclusive() {
        let l = OpLocks::new();
        let a = l.acquire(&[volume_name("x")], &[volume("src")]).unwrap();
        let b = l.acquire(&[volume_name("y")], &[volume("src")]).unwrap();
        assert_eq!(l.exclusive(volume("src")).err().unwrap().code(), Code::Aborted);
        drop(a);
        assert!(l.exclusive(volume("src")).is_err(), "still one shared holder");
        drop(b);
        assert_eq!(l.held(), 0);
        let _g = l.exclusive(volume("src")).unwrap();
    }

    #[test]
    fn failed_acquisition_takes_nothing() {
        let l = OpLocks::new();
        let _g = l.exclusive(volume("busy")).unwrap();
        assert!(l.acquire(&[volume("free")], &[volume("busy")]).is_err());
        assert_eq!(l.held(), 1);
        let _g = l.exclusive(volume("free")).expect("not left behind by the failed attempt");
    }
}
