//! SnapshotMetadata service: changed-block tracking for backup tools.
//!
//! Both calls stream pages of `VARIABLE_LENGTH` ranges, resumable with
//! `starting_offset` and sized by `max_results`.

use std::pin::Pin;
use std::sync::Arc;

use ferrovol_csi as csi;
use tokio_stream::Stream;
use tonic::Status;

use crate::engine::{ChangedBlocks, Range};
use crate::error::{self, Result};
use crate::rpc;
use crate::services::{validate, Driver};

/// Ranges per message when the caller leaves it to us.
pub const DEFAULT_PAGE: usize = 1024;

pub struct SnapshotMetadataService {
    driver: Arc<Driver>,
}

type Pages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Clips ranges to start at `start` and splits them into pages.
fn paginate(
    ranges: Vec<Range>,
    start: u64,
    capacity: u64,
    max_results: i32,
) -> Result<Vec<Vec<csi::BlockMetadata>>> {
    if max_results < 0 {
        return Err(error::invalid("max_results must not be negative"));
    }
    if start > capacity {
        return Err(error::out_of_range(format!(
            "starting_offset {start} is beyond the snapshot's {capacity} bytes"
        )));
    }
    let page = if max_results == 0 { DEFAULT_PAGE } else { max_results as usize };
    let blocks: Vec<csi::BlockMetadata> = ranges
        .into_iter()
        .filter(|(off, len)| off + len > start)
        .map(|(off, len)| {
            let from = off.max(start);
            csi::BlockMetadata { byte_offset: from as i64, size_bytes: (off + len - from) as i64 }
        })
        .collect();
    Ok(blocks.chunks(page).map(<[_]>::to_vec).collect())
}

/// The pages as a stream of response messages built by `message`.
fn stream<T: Send + 'static>(
    ranges: Vec<Range>,
    start: u64,
    capacity: u64,
    max_results: i32,
    message: fn(i32, i64, Vec<csi::BlockMetadata>) -> T,
) -> Result<Pages<T>> {
    let kind = csi::BlockMetadataType::VariableLength as i32;
    let messages: Vec<Result<T, Status>> = paginate(ranges, start, capacity, max_results)?
        .into_iter()
        .map(|page| Ok(message(kind, capacity as i64, page)))
        .collect();
    Ok(Box::pin(tokio_stream::iter(messages)))
}

fn start_offset(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| error::invalid("starting_offset must not be negative"))
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
            error::unimplemented(format!("the {} engine has no changed blocks", engine.kind()))
        })
    }

    async fn allocated(
        &self,
        req: csi::GetMetadataAllocatedRequest,
    ) -> Result<Pages<csi::GetMetadataAllocatedResponse>> {
        let blocks = self.blocks()?;
        validate::id(&req.snapshot_id, "snapshot_id")?;
        let start = start_offset(req.starting_offset)?;
        let (capacity, ranges) = blocks.allocated_ranges(&req.snapshot_id).await?;
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
        let (capacity, ranges) =
            blocks.changed_ranges(&req.base_snapshot_id, &req.target_snapshot_id).await?;
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

    #[test]
    fn pages_resume_and_clip() {
        let ranges = vec![(0, 100), (200, 100), (400, 100)];
        let pages = paginate(ranges.clone(), 250, 1000, 1).unwrap();
        let flat: Vec<(i64, i64)> =
            pages.iter().map(|p| (p[0].byte_offset, p[0].size_bytes)).collect();
        assert_eq!(flat, vec![(250, 50), (400, 100)]);
        assert_eq!(paginate(ranges.clone(), 0, 1000, 0).unwrap().len(), 1);
        assert_eq!(
            paginate(ranges.clone(), 1001, 1000, 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert!(paginate(ranges.clone(), 1000, 1000, 0).unwrap().is_empty());
        assert_eq!(paginate(ranges, 0, 1000, -1).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
