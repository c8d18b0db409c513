//! Group snapshots: every member's file cloned under one freeze (and, for
//! a group spread over nodes, under the relay's hold).

use super::*;

#[tonic::async_trait]
impl GroupSnapshots for LocalEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        _secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        self.create_group(name, volumes, None).await
    }

    async fn delete_group_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Group, id) {
            return Ok(());
        }
        let Some(mut group) = self.journal.get::<GroupRecord>(id)? else { return Ok(()) };
        group.set_state(State::Deleting);
        self.journal.put(&group).await?;
        for sid in &group.snapshot_ids {
            if let Some(member) = self.journal.get::<SnapshotRecord>(sid)? {
                self.delete_file_and_record(Kind::Snapshot, &member).await?;
            }
        }
        self.journal.remove(&group).await
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        let group = self.ready_group(id)?;
        self.group_view(&group)
    }
}

impl LocalEngine {
    /// This node's part of a relay's group snapshot spread over nodes,
    /// asked for over the link (a field of the request says it is a part,
    /// never the group's name): the group's one ID here, taken under the
    /// relay's freeze.
    pub async fn create_group_part(
        &self,
        group_id: &str,
        volumes: &[String],
    ) -> Result<(GroupSnapshot, Duration)> {
        if !ids::is_shared_group(group_id) {
            return Err(error::invalid(format!(
                "{} is not the ID of a group spread over nodes",
                error::bounded(group_id)
            )));
        }
        self.create_group(group_id, volumes, Some(group_id)).await
    }

    /// A group snapshot of `volumes` here; `part_of` (a relay's group
    /// spread over nodes) names the group's one ID on every node, and this
    /// node's part is taken under the relay's freeze, never at an instant
    /// of its own.
    async fn create_group(
        &self,
        name: &str,
        volumes: &[String],
        part_of: Option<&str>,
    ) -> Result<(GroupSnapshot, Duration)> {
        if let Some(existing) = self.journal.by_name::<GroupRecord>(name)? {
            if existing.state() == State::Ready {
                let mut want: Vec<&String> = volumes.iter().collect();
                let mut have: Vec<&String> = existing.source_volumes.iter().collect();
                want.sort();
                have.sort();
                if want != have {
                    return Err(error::exists(format!(
                        "group snapshot {name:?} exists with other volumes"
                    )));
                }
                return Ok((self.group_view(&existing)?, Duration::ZERO));
            }
            self.discard_group(&existing).await?;
        }
        let sources = volumes.iter().map(|v| self.ready_volume(v)).collect::<Result<Vec<_>>>()?;
        let group_id = match part_of {
            Some(id) => id.to_string(),
            None => ids::mint(Kind::Group, &self.tag),
        };
        let created = now_nanos();
        let mut members: Vec<SnapshotRecord> = sources
            .iter()
            .map(|v| SnapshotRecord {
                id: ids::mint(Kind::Snapshot, &self.tag),
                // Internal names: unique, and never a name a CO could pick.
                name: format!("{group_id}/{}", v.id),
                state: State::Creating as i32,
                source_volume: v.id.clone(),
                size: v.capacity,
                created_unix_nanos: created,
                group_id: group_id.clone(),
            })
            .collect();
        let mut group = GroupRecord {
            id: group_id,
            name: name.to_string(),
            state: State::Creating as i32,
            source_volumes: volumes.to_vec(),
            snapshot_ids: members.iter().map(|m| m.id.clone()).collect(),
            created_unix_nanos: created,
        };
        if let Reservation::Existing(_) = self.journal.reserve(&group).await? {
            return Err(error::busy(format!("group snapshot {name:?} is being created")));
        }
        for m in &members {
            self.journal.reserve(m).await?;
        }
        // Every member mounted here is flushed now and frozen together for
        // the clones; a member in use as a raw block device cannot be
        // quiesced, and a torn group is refused rather than answered.
        // A part of a group spread over nodes is taken under the relay's
        // freeze, never at an instant of its own.
        let quiesce = match part_of {
            Some(_) => self.node.prepare_quiesce_within_hold(volumes).await,
            None => self.node.prepare_quiesce(volumes, true).await,
        };
        let quiesce = match quiesce {
            Ok(q) => q,
            Err(e) => {
                self.discard_group(&group).await?;
                return Err(e);
            }
        };

        let mut copies = Vec::with_capacity(members.len());
        for m in &members {
            copies.push((
                self.pool.path(Kind::Volume, &m.source_volume)?,
                self.pool.staging_path(Kind::Snapshot, &m.id)?,
                m.size,
            ));
        }
        let method = self.method;
        let made = blocking(move || {
            failpoint::hit("create-group-before-clone");
            // The window: quiesce, clone every member, release. Nothing
            // else (no journal write, no allocation of note) happens inside.
            // It is measured from the first freeze, so it is what the
            // earliest-frozen member's writers wait at most.
            let started = std::time::Instant::now();
            let hold = quiesce()?;
            let quiesced = started.elapsed();
            for (src, dst, size) in &copies {
                pool::clone_file(src, dst, *size, method)?;
            }
            let window = started.elapsed();
            drop(hold);
            tracing::debug!(
                quiesce_ms = quiesced.as_secs_f64() * 1000.0,
                clone_ms = (window - quiesced).as_secs_f64() * 1000.0,
                "group snapshot window"
            );
            for (_, dst, _) in &copies {
                pool::seal(dst)?;
            }
            failpoint::hit("create-group-before-commit");
            Ok(window)
        })
        .await;
        let window = match made {
            Ok(w) => w,
            Err(e) => {
                self.discard_group(&group).await?;
                return Err(e);
            }
        };
        // Members first, then the group: recovery discards the members of a
        // group that never became Ready.
        for m in &mut members {
            if let Err(e) = self.commit_created(Kind::Snapshot, m).await {
                let _ = self.discard_group(&group).await;
                return Err(e);
            }
        }
        group.set_state(State::Ready);
        if let Err(e) = self.journal.put(&group).await {
            let _ = self.discard_group(&group).await;
            return Err(e);
        }
        Ok((self.group_view(&group)?, window))
    }
}
