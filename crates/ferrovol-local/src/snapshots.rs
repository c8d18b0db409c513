//! Snapshots: a read-only reflink (or copy) of the volume's file, taken
//! under a freeze of its mounted filesystem.

use super::*;

#[tonic::async_trait]
impl Snapshots for LocalEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        _secrets: &Secrets,
    ) -> Result<Snapshot> {
        if let Some(existing) = self.journal.by_name::<SnapshotRecord>(name)? {
            if existing.state() == State::Ready {
                if existing.source_volume != source_volume {
                    return Err(error::exists(format!(
                        "snapshot {name:?} exists for volume {}, not {source_volume}",
                        existing.source_volume
                    )));
                }
                return Ok(to_snapshot(&existing));
            }
            self.discard(Kind::Snapshot, &existing).await?;
        }
        let volume = self.ready_volume(source_volume)?;
        let src = self.existing_file(Kind::Volume, source_volume)?;
        // A filesystem staged on this node is flushed now (the pod's dirty
        // data, outside the window), then frozen for the instant of the
        // copy-on-write clone only; the guard thaws it on every path. Raw
        // block or idle: crash-consistent, as a power cut would leave it.
        let quiesce = self
            .node
            .prepare_quiesce(&[source_volume.to_string()], false)
            .await
            .map_err(|e| self.explained_by_full_pool(e))?;
        let mut record = SnapshotRecord {
            id: ids::mint(Kind::Snapshot, &self.tag),
            name: name.to_string(),
            state: State::Creating as i32,
            source_volume: source_volume.to_string(),
            size: volume.capacity,
            created_unix_nanos: now_nanos(),
            group_id: String::new(),
        };
        if let Reservation::Existing(_) = self.journal.reserve(&record).await? {
            return Err(error::busy(format!("snapshot {name:?} is being created")));
        }
        let dst = self.pool.staging_path(Kind::Snapshot, &record.id)?;
        let (method, size) = (self.method, volume.capacity);
        let made = blocking(move || {
            failpoint::hit("create-snapshot-after-reserve");
            // The window: the clone alone.
            let started = std::time::Instant::now();
            let hold = quiesce()?;
            failpoint::hit("create-snapshot-frozen");
            let cloned = pool::clone_file(&src, &dst, size, method);
            drop(hold);
            tracing::debug!(
                window_ms = started.elapsed().as_secs_f64() * 1000.0,
                "snapshot window"
            );
            cloned?;
            pool::seal(&dst)?;
            failpoint::hit("create-snapshot-before-commit");
            Ok(())
        })
        .await;
        if let Err(e) = made {
            self.discard(Kind::Snapshot, &record).await?;
            return Err(self.explained_by_full_pool(e));
        }
        self.commit_created(Kind::Snapshot, &mut record).await?;
        Ok(to_snapshot(&record))
    }

    async fn delete_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Snapshot, id) {
            return Ok(());
        }
        let Some(record) = self.journal.get::<SnapshotRecord>(id)? else {
            return Ok(());
        };
        if !record.group_id.is_empty() && record.state() == State::Ready {
            // The spec's code for a member deleted alone: the caller must
            // stop and delete the group (FAILED_PRECONDITION is retried).
            return Err(error::invalid(format!(
                "snapshot {id} is part of group snapshot {}; delete the group instead",
                record.group_id
            )));
        }
        self.delete_file_and_record(Kind::Snapshot, &record).await
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        self.ready_snapshot(id).map(|r| to_snapshot(&r))
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let source_matches = |r: &SnapshotRecord| {
            filter.source_volume.as_ref().is_none_or(|v| &r.source_volume == v)
        };
        if let Some(id) = &filter.snapshot_id {
            // A filter by ID answers that snapshot or nothing, never an error.
            let found = self.ready_snapshot(id).ok().filter(source_matches);
            return Ok(Page { items: found.iter().map(to_snapshot).collect(), next: None });
        }
        if token.is_some_and(|t| !ids::is_valid(Kind::Snapshot, t)) {
            return Err(error::busy("starting_token is not one this driver issued"));
        }
        let mut records =
            self.journal.scan::<SnapshotRecord>(token, max.saturating_add(1), |r| {
                r.state() == State::Ready && source_matches(r)
            })?;
        let next = ferrovol_core::engine::next_token(&mut records, max, |r| r.id.clone());
        Ok(Page { items: records.iter().map(to_snapshot).collect(), next })
    }
}
