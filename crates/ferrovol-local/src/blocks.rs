//! Changed-block tracking: allocated and changed ranges of snapshot files,
//! from FIEMAP and SEEK_DATA, one window at a time.

use super::*;

#[tonic::async_trait]
impl ChangedBlocks for LocalEngine {
    /// Window by window (`extents::WINDOW`), so a large sparse snapshot's
    /// ranges are never all held at once.
    async fn allocated(
        &self,
        snapshot_id: &str,
        from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let snap = self.ready_snapshot(snapshot_id)?;
        let path = self.pool.path(Kind::Snapshot, snapshot_id)?;
        // Opened now: a snapshot deleted while its ranges are read stays
        // readable through the descriptor.
        let f = blocking(move || {
            std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        })
        .await?;
        let size = snap.size;
        let rx = offload::produce(RANGE_BATCHES_IN_FLIGHT, move |send| {
            let walked = extents::allocated_windows(&f, from, size, &mut |r| send(Ok(r)));
            if let Err(e) = walked {
                send(Err(Error::io("mapping a snapshot", e)));
            }
        });
        Ok((size, ranges_from(rx)))
    }

    async fn changed(
        &self,
        base: &str,
        target: &str,
        from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let (b, t) = (self.ready_snapshot(base)?, self.ready_snapshot(target)?);
        if b.source_volume != t.source_volume {
            return Err(error::invalid(format!(
                "snapshots {base} and {target} are of different volumes"
            )));
        }
        let (bp, tp) =
            (self.pool.path(Kind::Snapshot, base)?, self.pool.path(Kind::Snapshot, target)?);
        let shares = self.method == CowMethod::Reflink;
        let (bf, tf) = blocking(move || {
            let open = |p: &Path| {
                std::fs::File::open(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))
            };
            Ok((open(&bp)?, open(&tp)?))
        })
        .await?;
        let size = t.size;
        let rx = offload::produce(RANGE_BATCHES_IN_FLIGHT, move |send| {
            let walked =
                extents::changed_windows(&bf, &tf, from, size, shares, &mut |r| send(Ok(r)));
            if let Err(e) = walked {
                send(Err(Error::io("comparing snapshots", e)));
            }
        });
        Ok((size, ranges_from(rx)))
    }
}
