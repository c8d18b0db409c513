//! `ferrovol pool seed`: fills a stopped pool with empty thin volumes, fast,
//! for measuring start-up at scale (`ferrovol bench --only startup`). The
//! records and files are exactly what `CreateVolume` would have left; they
//! are written in large group commits instead of one request at a time.

use std::path::Path;

use crate::error::{Error, Result};
use crate::ids::{self, Kind};
use crate::journal::{Journal, State, VolumeRecord};
use crate::pool::Pool;

/// Adds `count` empty thin volumes of `size` bytes named `seed-<n>`.
/// With `legacy_ids`, the IDs are untagged, as releases before IDs named
/// their node minted them (for testing that such IDs still resolve).
pub async fn thin_volumes(
    pool_dir: &Path,
    count: usize,
    size: u64,
    node_id: &str,
    legacy_ids: bool,
) -> Result<()> {
    let pool = Pool::open(pool_dir)?;
    let tag = ids::node_tag(node_id);
    let journal = Journal::open(&pool.journal_path())?;
    let topology =
        std::collections::BTreeMap::from([(crate::TOPOLOGY_KEY.to_string(), node_id.to_string())]);
    // Enough at once for the journal writer to fill its largest batches.
    for start in (0..count).step_by(2048) {
        let records: Vec<VolumeRecord> = (start..count.min(start + 2048))
            .map(|n| VolumeRecord {
                id: match legacy_ids {
                    false => ids::mint(Kind::Volume, &tag),
                    true => format!("{}{}", Kind::Volume.prefix(), uuid::Uuid::new_v4().simple()),
                },
                name: format!("seed-{n}"),
                state: State::Ready as i32,
                capacity: size,
                created_unix_nanos: crate::now_nanos(),
                topology: topology.clone(),
                ..Default::default()
            })
            .collect();
        for r in &records {
            let path = pool.path(Kind::Volume, &r.id)?;
            std::fs::File::create_new(&path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        }
        // All at once: the journal writer batches what arrives together.
        let mut puts = tokio::task::JoinSet::new();
        for r in records {
            let journal = journal.clone();
            puts.spawn(async move { journal.put(&r).await });
        }
        while let Some(put) = puts.join_next().await {
            put.map_err(|e| crate::error::internal(e.to_string()))??;
        }
    }
    Ok(())
}
