//! CephFS subvolumes through the manager's volumes module (the API behind
//! `ceph fs subvolume …`): the commands go over librados' manager-command
//! call as JSON, so subvolumes made here are the ones `ceph fs subvolume
//! ls`, the dashboard and ceph-csi see. No `unsafe` here: it is all
//! [`Cluster::mgr_command`].

use std::fmt::Write as _;

use crate::{CephError, Cluster, Result};

/// The subvolumes of one file system.
#[derive(Clone)]
pub struct Subvolumes {
    cluster: Cluster,
    fs: String,
}

/// What `fs subvolume info` says of a subvolume (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeInfo {
    /// Its data directory inside the file system.
    pub path: String,
    /// The quota (`ceph.quota.max_bytes`); None when unlimited.
    pub bytes_quota: Option<u64>,
    pub bytes_used: u64,
    pub data_pool: String,
    /// `complete`, `pending` or `in-progress` (a clone), `snapshot-retained`
    /// (removed, kept for its snapshots).
    pub state: String,
    pub created_at: String,
}

/// How a new subvolume is made.
#[derive(Debug, Clone, Default)]
pub struct NewSubvolume<'a> {
    /// Its quota in bytes (0: none).
    pub size: u64,
    /// The data pool its files' objects go to (None: the file system's).
    pub pool_layout: Option<&'a str>,
    /// Its root's mode, octal as Ceph takes it ("0777"); None: Ceph's.
    pub mode: Option<&'a str>,
}

/// A JSON string literal of `s`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One manager command: its prefix and arguments, as JSON.
struct Command(String);

impl Command {
    fn new(prefix: &str, fs: &str) -> Command {
        Command(format!(
            "{{\"prefix\":{},\"vol_name\":{},\"format\":\"json\"",
            quoted(prefix),
            quoted(fs)
        ))
    }

    fn arg(mut self, key: &str, value: &str) -> Command {
        let _ = write!(self.0, ",{}:{}", quoted(key), quoted(value));
        self
    }

    fn raw(mut self, key: &str, json: &str) -> Command {
        let _ = write!(self.0, ",{}:{json}", quoted(key));
        self
    }

    fn json(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn parse(what: &str, out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).map_err(|e| CephError {
        op: format!("{what}: the manager's answer is not JSON ({e}): {out:.200}"),
        errno: libc::EIO,
    })
}

impl Subvolumes {
    pub fn new(cluster: Cluster, fs: &str) -> Subvolumes {
        Subvolumes { cluster, fs: fs.to_string() }
    }

    pub fn fs(&self) -> &str {
        &self.fs
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn run(&self, command: Command) -> Result<String> {
        self.cluster.mgr_command(&command.json())
    }

    /// Makes a subvolume group; one that exists is fine.
    pub fn create_group(&self, group: &str) -> Result<()> {
        self.run(Command::new("fs subvolumegroup create", &self.fs).arg("group_name", group))
            .map(drop)
    }

    /// Removes an empty subvolume group; a missing one is fine.
    pub fn remove_group(&self, group: &str) -> Result<()> {
        match self.run(Command::new("fs subvolumegroup rm", &self.fs).arg("group_name", group)) {
            Err(e) if e.is(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Makes a subvolume. Ceph answers success for one that exists (and
    /// applies the size again): callers that care compare first.
    pub fn create(&self, group: &str, name: &str, new: &NewSubvolume<'_>) -> Result<()> {
        let mut c = Command::new("fs subvolume create", &self.fs)
            .arg("sub_name", name)
            .arg("group_name", group);
        if new.size > 0 {
            c = c.raw("size", &new.size.to_string());
        }
        if let Some(pool) = new.pool_layout {
            c = c.arg("pool_layout", pool);
        }
        if let Some(mode) = new.mode {
            c = c.arg("mode", mode);
        }
        self.run(c).map(drop)
    }

    /// The subvolume's data directory inside the file system.
    pub fn path(&self, group: &str, name: &str) -> Result<String> {
        let out = self.run(
            Command::new("fs subvolume getpath", &self.fs)
                .arg("sub_name", name)
                .arg("group_name", group),
        )?;
        Ok(out.trim().to_string())
    }

    pub fn info(&self, group: &str, name: &str) -> Result<SubvolumeInfo> {
        let what = format!("subvolume {group}/{name}");
        let out = self.run(
            Command::new("fs subvolume info", &self.fs)
                .arg("sub_name", name)
                .arg("group_name", group),
        )?;
        let v = parse(&what, &out)?;
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        Ok(SubvolumeInfo {
            path: text("path"),
            // "infinite" when unlimited.
            bytes_quota: v.get("bytes_quota").and_then(|q| q.as_u64()),
            bytes_used: v.get("bytes_used").and_then(|q| q.as_u64()).unwrap_or(0),
            data_pool: text("data_pool"),
            state: text("state"),
            created_at: text("created_at"),
        })
    }

    /// Sets the quota; with `no_shrink`, a size below what is used fails.
    /// Answers the new quota.
    pub fn resize(&self, group: &str, name: &str, bytes: u64, no_shrink: bool) -> Result<u64> {
        let mut c = Command::new("fs subvolume resize", &self.fs)
            .arg("sub_name", name)
            .arg("group_name", group)
            .arg("new_size", &bytes.to_string());
        if no_shrink {
            c = c.raw("no_shrink", "true");
        }
        self.run(c)?;
        Ok(bytes)
    }

    /// Removes a subvolume. With `retain_snapshots`, one with snapshots is
    /// kept (state `snapshot-retained`) until they are gone, as Ceph
    /// requires of a subvolume whose snapshots are still wanted. A missing
    /// one is fine.
    pub fn remove(&self, group: &str, name: &str, retain_snapshots: bool) -> Result<()> {
        let mut c = Command::new("fs subvolume rm", &self.fs)
            .arg("sub_name", name)
            .arg("group_name", group);
        if retain_snapshots {
            c = c.raw("retain_snapshots", "true");
        }
        match self.run(c) {
            Err(e) if e.is(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    /// The file system's subvolume groups.
    pub fn groups(&self) -> Result<Vec<String>> {
        let out = self.run(Command::new("fs subvolumegroup ls", &self.fs))?;
        names("subvolume groups", &out)
    }

    /// Sets a key of the subvolume's own metadata (kept by Ceph with the
    /// subvolume, shown by `fs subvolume metadata ls`).
    pub fn set_metadata(&self, group: &str, name: &str, key: &str, value: &str) -> Result<()> {
        self.run(
            Command::new("fs subvolume metadata set", &self.fs)
                .arg("sub_name", name)
                .arg("group_name", group)
                .arg("key_name", key)
                .arg("value", value),
        )
        .map(drop)
    }

    /// A key of the subvolume's metadata; None when the subvolume has no
    /// such key (a missing subvolume is ENOENT).
    pub fn metadata(&self, group: &str, name: &str, key: &str) -> Result<Option<String>> {
        let c = Command::new("fs subvolume metadata get", &self.fs)
            .arg("sub_name", name)
            .arg("group_name", group)
            .arg("key_name", key);
        match self.run(c) {
            Ok(v) => Ok(Some(v.trim_end_matches('\n').to_string())),
            // The manager answers a missing key and a missing subvolume
            // alike (ENOENT); the subvolume is asked after separately.
            Err(e) if e.is(libc::ENOENT) => match self.path(group, name) {
                Ok(_) => Ok(None),
                Err(gone) => Err(gone),
            },
            Err(e) => Err(e),
        }
    }

    /// Removes what a cancelled clone left (`rm --force`: the manager
    /// refuses a plain remove of a clone target until its cancellation has
    /// settled). Only for a clone target that was never a volume.
    pub fn remove_cancelled_clone(&self, group: &str, name: &str) -> Result<()> {
        let c = Command::new("fs subvolume rm", &self.fs)
            .arg("sub_name", name)
            .arg("group_name", group)
            .raw("force", "true");
        match self.run(c) {
            Err(e) if e.is(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    /// The names of the group's subvolumes.
    pub fn list(&self, group: &str) -> Result<Vec<String>> {
        let out = self.run(Command::new("fs subvolume ls", &self.fs).arg("group_name", group))?;
        names(&format!("subvolumes of {group}"), &out)
    }

    pub fn snapshot(&self, group: &str, name: &str, snap: &str) -> Result<()> {
        self.run(
            Command::new("fs subvolume snapshot create", &self.fs)
                .arg("sub_name", name)
                .arg("snap_name", snap)
                .arg("group_name", group),
        )
        .map(drop)
    }

    /// Removes a snapshot; a missing one is fine.
    pub fn remove_snapshot(&self, group: &str, name: &str, snap: &str) -> Result<()> {
        let c = Command::new("fs subvolume snapshot rm", &self.fs)
            .arg("sub_name", name)
            .arg("snap_name", snap)
            .arg("group_name", group);
        match self.run(c) {
            Err(e) if e.is(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    pub fn snapshots(&self, group: &str, name: &str) -> Result<Vec<String>> {
        let out = self.run(
            Command::new("fs subvolume snapshot ls", &self.fs)
                .arg("sub_name", name)
                .arg("group_name", group),
        )?;
        names(&format!("snapshots of {group}/{name}"), &out)
    }

    /// Starts the manager's copy of `snap` (of `group/name`) into a new
    /// subvolume `target_group/target`; [`Subvolumes::clone_state`] says
    /// when it is done.
    pub fn clone_snapshot(
        &self,
        group: &str,
        name: &str,
        snap: &str,
        target_group: &str,
        target: &str,
        pool_layout: Option<&str>,
    ) -> Result<()> {
        let mut c = Command::new("fs subvolume snapshot clone", &self.fs)
            .arg("sub_name", name)
            .arg("snap_name", snap)
            .arg("target_sub_name", target)
            .arg("group_name", group)
            .arg("target_group_name", target_group);
        if let Some(pool) = pool_layout {
            c = c.arg("pool_layout", pool);
        }
        self.run(c).map(drop)
    }

    /// A clone's state: `pending`, `in-progress`, `complete`, `failed` or
    /// `canceled`.
    pub fn clone_state(&self, group: &str, target: &str) -> Result<String> {
        let what = format!("clone {group}/{target}");
        let out = self.run(
            Command::new("fs clone status", &self.fs)
                .arg("clone_name", target)
                .arg("group_name", group),
        )?;
        let v = parse(&what, &out)?;
        Ok(v["status"]["state"].as_str().unwrap_or_default().to_string())
    }

    /// Stops a pending or running clone (its target is then removable).
    pub fn cancel_clone(&self, group: &str, target: &str) -> Result<()> {
        self.run(
            Command::new("fs clone cancel", &self.fs)
                .arg("clone_name", target)
                .arg("group_name", group),
        )
        .map(drop)
    }
}

/// The names in a `[{"name": …}, …]` answer.
fn names(what: &str, out: &str) -> Result<Vec<String>> {
    let v = parse(what, out)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_json_whatever_the_names() {
        let c = Command::new("fs subvolume create", "fs\"1")
            .arg("sub_name", "a\\b\n")
            .raw("size", "5")
            .json();
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["prefix"], "fs subvolume create");
        assert_eq!(v["vol_name"], "fs\"1");
        assert_eq!(v["sub_name"], "a\\b\n");
        assert_eq!(v["size"], 5);
        assert_eq!(v["format"], "json");
    }

    #[test]
    fn listings_name_their_entries() {
        assert_eq!(names("x", r#"[{"name":"a"},{"name":"b"}]"#).unwrap(), ["a", "b"]);
        assert_eq!(names("x", "[]").unwrap(), Vec::<String>::new());
        assert_eq!(names("x", "nope").unwrap_err().errno, libc::EIO);
    }
}
