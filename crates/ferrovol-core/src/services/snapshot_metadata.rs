//! SnapshotMetadata service: changed-block tracking for backup tools.
//!
//! Both calls stream pages of `VARIABLE_LENGTH` ranges, resumable with
//! `starting_offset` and sized by `max_results`.

use std::pin::Pin;
use std::sync::Arc;

use ferrovol_csi as csi;
use tokio_stream::Stream;
use tonic::Status;

use crate::engine::{ChangedBlocks, Ranges};
use crate::error::{self, Result};
use crate::rpc;
use crate::services::{validate, Driver};

/// Ranges per message when the caller leaves it to us.
pub const DEFAULT_PAGE: usize = 1024;

pub struct SnapshotMetadataService {
    driver: Arc<Driver>,
}

type Pages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn start_offset(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| error::invalid("starting_offset must not be negative"))
}

/// Pages (each at most `page` ranges) in flight between the engine and the
/// caller: what bounds the memory a listing takes.
const PAGES_IN_FLIGHT: usize = 2;

/// The engine's ranges, clipped to start at `start`, as response messages
/// of at most `max_results` ranges each (0: [`DEFAULT_PAGE`]), built by
/// `message`. A task reads the engine's batches and sends pages through a
/// bounded channel: however many ranges a snapshot has, only a few pages
/// are ever held, and a caller that stops reading stops the engine.
fn stream<T: Send + 'static>(
    mut ranges: Ranges,
    start: u64,
    capacity: u64,
    max_results: i32,
    message: fn(i32, i64, Vec<csi::BlockMetadata>) -> T,
) -> Result<Pages<T>> {
    use tokio_stream::StreamExt;
    if max_results < 0 {
        return Err(error::invalid("max_results must not be negative"));
    }
    if start > capacity {
        return Err(error::out_of_range(format!(
            "starting_offset {start} is beyond the snapshot's {capacity} bytes"
        )));
    }
    let page = if max_results == 0 { DEFAULT_PAGE } else { max_results as usize };
    let kind = csi::BlockMetadataType::VariableLength as i32;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<T, Status>>(PAGES_IN_FLIGHT);
    tokio::spawn(async move {
        let mut pending: Vec<csi::BlockMetadata> = Vec::with_capacity(page);
        while let Some(batch) = ranges.next().await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            for (off, len) in batch.into_iter().filter(|(off, len)| off + len > start) {
                let from = off.max(start);
                pending.push(csi::BlockMetadata {
                    byte_offset: from as i64,
                    size_bytes: (off + len - from) as i64,
                });
                if pending.len() == page {
                    let full = std::mem::replace(&mut pending, Vec::with_capacity(page));
                    if tx.send(Ok(message(kind, capacity as i64, full))).await.is_err() {
                        return; // the caller went away: so does the engine's stream
                    }
                }
            }
        }
        if !pending.is_empty() {
            let _ = tx.send(Ok(message(kind, capacity as i64, pending))).await;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

impl SnapshotMetadataService {
    pub fn new(driver: Arc<Driver>) -> Self {
        SnapshotMetadataService { driver }
    }

    /// The engine's changed blocks: a process serves this service only
    /// when its engine has them, so this answers for a miswired one.
    fn blocks(&self) -> Result<&dyn ChangedBlocks> {
        let engine = self.driver.controller();
        engine.changed_blocks().ok_or_else(|| {
            error::unsupported(format!("the {} engine has no changed blocks", engine.kind()))
        })
    }

    async fn allocated(
        &self,
        req: csi::GetMetadataAllocatedRequest,
    ) -> Result<Pages<csi::GetMetadataAllocatedResponse>> {
        let blocks = self.blocks()?;
        validate::id(&req.snapshot_id, "snapshot_id")?;
        let start = start_offset(req.starting_offset)?;
        let (capacity, ranges) =
            blocks.allocated(&req.snapshot_id, start, &validate::secrets(&req.secrets)).await?;
        stream(
            ranges,
            start,
            capacity,
            req.max_results,
            |block_metadata_type, volume_capacity_bytes, block_metadata| {
                csi::GetMetadataAllocatedResponse {
                    block_metadata_type,
                    volume_capacity_bytes,
                    block_metadata,
                }
            },
        )
    }

    async fn delta(
        &self,
        req: csi::GetMetadataDeltaRequest,
    ) -> Result<Pages<csi::GetMetadataDeltaResponse>> {
        let blocks = self.blocks()?;
        validate::id(&req.base_snapshot_id, "base_snapshot_id")?;
        validate::id(&req.target_snapshot_id, "target_snapshot_id")?;
        let start = start_offset(req.starting_offset)?;
        let (capacity, ranges) = blocks
            .changed(
                &req.base_snapshot_id,
                &req.target_snapshot_id,
                start,
                &validate::secrets(&req.secrets),
            )
            .await?;
        stream(
            ranges,
            start,
            capacity,
            req.max_results,
            |block_metadata_type, volume_capacity_bytes, block_metadata| {
                csi::GetMetadataDeltaResponse {
                    block_metadata_type,
                    volume_capacity_bytes,
                    block_metadata,
                }
            },
        )
    }
}

rpc::service! {
    SnapshotMetadataService: csi::snapshot_metadata_server::SnapshotMetadata {
        type GetMetadataAllocatedStream = Pages<csi::GetMetadataAllocatedResponse>;
        type GetMetadataDeltaStream = Pages<csi::GetMetadataDeltaResponse>;
        fn get_metadata_allocated(csi::GetMetadataAllocatedRequest)
            -> Pages<csi::GetMetadataAllocatedResponse> => inline allocated;
        fn get_metadata_delta(csi::GetMetadataDeltaRequest)
            -> Pages<csi::GetMetadataDeltaResponse> => inline delta;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_stream::StreamExt;

    fn pages(
        ranges: Vec<crate::engine::Range>,
        start: u64,
        max: i32,
    ) -> Result<Vec<Vec<(i64, i64)>>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let s = stream(crate::engine::ranges_of(ranges), start, 1000, max, |_, _, b| b)?;
            let all: Vec<_> = s.collect().await;
            Ok(all
                .into_iter()
                .map(|p| p.unwrap().iter().map(|b| (b.byte_offset, b.size_bytes)).collect())
                .collect())
        })
    }

    #[test]
    fn pages_resume_and_clip() {
        let ranges = vec![(0, 100), (200, 100), (400, 100)];
        assert_eq!(pages(ranges.clone(), 250, 1).unwrap(), vec![vec![(250, 50)], vec![(400, 100)]]);
        assert_eq!(pages(ranges.clone(), 0, 0).unwrap().len(), 1);
        assert_eq!(pages(ranges.clone(), 1001, 0).unwrap_err().code(), tonic::Code::OutOfRange);
        assert!(pages(ranges.clone(), 1000, 0).unwrap().is_empty());
        assert_eq!(pages(ranges, 0, -1).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    /// However many ranges an engine has (here: without end), a caller
    /// that reads two pages has made the engine produce only a few more:
    /// the listing never holds the whole list.
    #[tokio::test]
    async fn a_listing_holds_a_few_pages_not_the_whole_list() {
        static PULLED: AtomicUsize = AtomicUsize::new(0);
        let endless = tokio_stream::iter(0u64..).map(|i| {
            PULLED.fetch_add(1, Ordering::SeqCst);
            Ok(vec![(i * 10, 5)])
        });
        let mut s = stream(Box::pin(endless), 0, u64::MAX, 1, |_, _, b| b).unwrap();
        for _ in 0..2 {
            s.next().await.unwrap().unwrap();
        }
        // Let the producing task run as far as the channel lets it.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let pulled = PULLED.load(Ordering::SeqCst);
        assert!(pulled <= 2 + PAGES_IN_FLIGHT + 1, "{pulled} batches pulled for 2 pages read");
        drop(s);
    }
}
