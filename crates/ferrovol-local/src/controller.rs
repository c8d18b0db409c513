//! The controller half's core: volumes (create, delete, list, capacity,
//! conditions, expansion) and the engine's figures.

use super::*;

#[tonic::async_trait]
impl ControllerEngine for LocalEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        node::features()
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("engine".to_string(), "local".to_string()),
            ("cow_method".to_string(), self.method.as_str().to_string()),
            ("pool".to_string(), self.pool.root().display().to_string()),
        ])
    }

    fn has_topology(&self) -> bool {
        true
    }

    /// Inline, no blocking-pool hop: every check is a syscall answered from
    /// kernel memory (stat, statvfs, a journal page in the cache); the one
    /// that touches the device runs in the background monitor.
    async fn health(&self) -> Result<()> {
        self.pool.verify()?;
        crate::fsutil::check_not_read_only(self.pool.root())?;
        self.pool_writes.status()?;
        self.journal.get::<VolumeRecord>("health-check").map(|_| ())
    }

    async fn stats(&self) -> Result<ferrovol_core::engine::EngineStats> {
        let ready = |s: State| s == State::Ready;
        let volumes = self.journal.scan::<VolumeRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let snapshots =
            self.journal.scan::<SnapshotRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let groups = self.journal.scan::<GroupRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let (_, total) = self.pool.space()?;
        let used = self.pool.used()?;
        Ok(ferrovol_core::engine::EngineStats {
            volumes: volumes.len() as u64,
            snapshots: snapshots.len() as u64,
            groups: groups.len() as u64,
            storage_capacity_bytes: total,
            storage_used_bytes: used,
            provisioned_bytes: volumes.iter().map(|v| v.capacity).sum(),
            facts: BTreeMap::from([("cow_method".to_string(), self.method.as_str().to_string())]),
            // Copies are reflinks (or a bounded copy) inside the call.
            ..Default::default()
        })
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        check_parameters(parameters)
    }

    /// Lazy journal changes (a delete's removal, a growth's size) become
    /// durable here rather than being left for recovery to redo.
    async fn close(&self) -> Result<()> {
        self.journal.sync().await
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        self.validate_parameters(&req.parameters)?;
        let ours = self.node.topology();
        if let Some(reqs) = &req.accessibility {
            if !reqs.requisite.is_empty() && !reqs.requisite.iter().any(|t| serves(&ours, t)) {
                return Err(self.elsewhere(&req.source, &reqs.requisite));
            }
        }
        let thick = is_thick(&req.parameters);
        let source = self.resolve_source(&req.source)?;
        let (available, total) = self.pool.space()?;
        let source_size = source.as_ref().map_or(0, |(_, size)| *size);
        let capacity =
            choose_size(req.required_bytes, req.limit_bytes, source_size, GRANULARITY, total)?;

        if let Some(existing) = self.journal.by_name::<VolumeRecord>(&req.name)? {
            if existing.state() == State::Ready {
                return compatible_volume(existing, &req);
            }
            self.discard(Kind::Volume, &existing).await?;
        }
        if capacity > largest_volume(available, thick) {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free, a {} volume of {capacity} bytes does not fit",
                if thick { "thick" } else { "thin" }
            )));
        }

        let (source_snapshot, source_volume) = match &req.source {
            Some(ContentSource::Snapshot(id)) => (id.clone(), String::new()),
            Some(ContentSource::Volume(id)) => (String::new(), id.clone()),
            None => (String::new(), String::new()),
        };
        let (block, fs_type) = match &req.access {
            AccessType::Block => (true, String::new()),
            AccessType::Mount { fs_type } => (false, fs_type.clone()),
        };
        let mut record = VolumeRecord {
            id: ids::mint(Kind::Volume, &self.tag),
            name: req.name.clone(),
            state: State::Creating as i32,
            capacity,
            source_snapshot,
            source_volume,
            block,
            fs_type,
            parameters: req.parameters.clone(),
            topology: ours,
            created_unix_nanos: now_nanos(),
        };
        // An empty thin volume holds no data yet: recovery can make its file
        // again from the record (`recovery::recreatable`), so it takes the
        // short path: file first, then one durable commit that neither
        // waits for the file's directory entry nor follows a reservation.
        if recovery::recreatable(&record) {
            return self.create_empty_thin(record).await;
        }
        if let Reservation::Existing(_) = self.journal.reserve(&record).await? {
            return Err(error::busy(format!("volume {:?} is being created", req.name)));
        }

        let path = self.pool.staging_path(Kind::Volume, &record.id)?;
        let method = self.method;
        let made = blocking(move || {
            failpoint::hit("create-volume-after-reserve");
            match source {
                None => pool::create_empty(&path, capacity, thick)?,
                Some((src, _)) => {
                    pool::clone_file(&src, &path, capacity, method)?;
                    if thick {
                        pool::grow(&path, capacity, true)?;
                    }
                }
            }
            failpoint::hit("create-volume-before-commit");
            Ok(())
        })
        .await;
        if let Err(e) = made {
            self.discard(Kind::Volume, &record).await?;
            return Err(e);
        }
        self.commit_created(Kind::Volume, &mut record).await?;
        Ok(to_volume(&record))
    }

    async fn delete_volume(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Volume, id) {
            return Ok(()); // cannot exist, so it is already deleted
        }
        let Some(record) = self.journal.get::<VolumeRecord>(id)? else {
            return Ok(());
        };
        if let Some(device) = self.node.device(id).await? {
            return Err(error::precondition(format!(
                "volume {id} is attached as {} on this node (still staged or published)",
                device.display()
            )));
        }
        self.delete_file_and_record(Kind::Volume, &record).await
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        self.ready_volume(id).map(|r| to_volume(&r))
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        let volumes: Vec<Result<(VolumeRecord, PathBuf)>> = ids
            .iter()
            .map(|id| Ok((self.ready_volume(id)?, self.pool.path(Kind::Volume, id)?)))
            .collect();
        let pool = self.pool.clone();
        blocking(move || {
            let (available, _) = pool.space()?;
            // The attached ones' devices, from one listing.
            let attached: std::collections::HashMap<PathBuf, PathBuf> = loopdev::list()
                .unwrap_or_default()
                .into_iter()
                .map(|a| (a.backing, a.device))
                .collect();
            Ok(volumes
                .into_iter()
                .map(|v| {
                    v.map(|(record, path)| {
                        let device = attached.get(&path).map(PathBuf::as_path);
                        condition_of(&record, &path, available, &pool, device)
                    })
                })
                .collect())
        })
        .await
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        if token.is_some_and(|t| !ids::is_valid(Kind::Volume, t)) {
            return Err(error::busy("starting_token is not one this driver issued"));
        }
        let mut records = self
            .journal
            .scan::<VolumeRecord>(token, max.saturating_add(1), |r| r.state() == State::Ready)?;
        let next = ferrovol_core::engine::next_token(&mut records, max, |r| r.id.clone());
        Ok(Page { items: records.iter().map(to_volume).collect(), next })
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        if topology.is_some_and(|t| !serves(&self.node.topology(), t)) {
            // Another node's segment: nothing can be created there from here.
            return Ok(Capacity {
                available: 0,
                maximum_volume_size: 0,
                minimum_volume_size: GRANULARITY,
            });
        }
        // The largest volume CreateVolume accepts now (kube-scheduler
        // prefers this figure to the available capacity when it is set).
        let (available, _) = self.pool.space()?;
        Ok(Capacity {
            available: available / GRANULARITY * GRANULARITY,
            maximum_volume_size: largest_volume(available, is_thick(parameters)),
            minimum_volume_size: GRANULARITY,
        })
    }

    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        _secrets: &Secrets,
    ) -> Result<Expanded> {
        let grown = |capacity| Expanded { capacity, node_expansion_required: true };
        let mut record = self.ready_volume(id)?;
        let wanted = pool::round_up(required)
            .ok_or_else(|| error::out_of_range(format!("{required} bytes is too large")))?;
        if wanted <= record.capacity {
            return Ok(grown(record.capacity)); // never shrink; already big enough
        }
        if limit > 0 && wanted > limit {
            return Err(error::out_of_range(format!(
                "{required} bytes rounded to {wanted} exceeds the limit of {limit}"
            )));
        }
        let (available, total) = self.pool.space()?;
        if wanted > total {
            return Err(error::out_of_range(format!(
                "{wanted} bytes is more than the whole pool ({total} bytes)"
            )));
        }
        let thick = is_thick(&record.parameters);
        let grow_by = wanted - record.capacity;
        if thick && grow_by > available {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free, growing needs {grow_by}"
            )));
        }
        // A thin volume's new space costs nothing yet, but the filesystem
        // writes metadata into it as it grows (ext4 zeroes new inode tables
        // afterwards): on a pool without room for that, the writes fail
        // inside the filesystem, later, where nobody is asking.
        let headroom = grow_by / 50 + (16 << 20);
        if !thick && available < headroom {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free; growing a thin volume by {grow_by} bytes \
                 needs about {headroom} for the filesystem's new metadata"
            )));
        }
        let path = self.pool.path(Kind::Volume, id)?;
        // The file's new size is made durable (`grow` syncs it): the file
        // is the truth, and recovery brings a record that lags it up to
        // date, so the record's own update need not wait for the disk.
        blocking(move || pool::grow(&path, wanted, thick)).await?;
        record.capacity = wanted;
        self.journal.put_lazily(&record).await?;
        Ok(grown(wanted))
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    fn groups(&self) -> Option<&dyn GroupSnapshots> {
        Some(self)
    }

    fn changed_blocks(&self) -> Option<&dyn ChangedBlocks> {
        Some(self)
    }
}
