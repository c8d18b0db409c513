//! GroupController service: crash-consistent snapshots of several volumes
//! at one instant.
//!
//! Every member whose filesystem is mounted on this node is frozen, all
//! members are cloned, and all are thawed: one short window for the whole
//! group. A member attached only as a raw block device cannot be quiesced
//! here, so the request is refused rather than answered with a torn group.

use std::collections::HashSet;
use std::sync::Arc;

use ferrovol_csi as csi;
use ferrovol_csi::group_controller_service_capability::rpc::Type as Cap;
use tracing::info;

use crate::engine::{GroupSnapshot, GroupSnapshots};
use crate::error::{self, Error, Result};
use crate::locks;
use crate::rpc;
use crate::services::{convert, validate, Driver};

#[derive(Clone)]
pub struct GroupControllerService {
    driver: Arc<Driver>,
}

fn to_wire(g: &GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g.snapshots.iter().map(convert::snapshot).collect(),
        creation_time: Some(convert::timestamp(g.created)),
        ready_to_use: g.ready,
    }
}

/// The spec's `snapshot_ids` check: when given, they must be exactly the
/// group's members.
fn check_members(g: &GroupSnapshot, snapshot_ids: &[String]) -> Result<()> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let given: HashSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
    let actual: HashSet<&str> = g.snapshots.iter().map(|s| s.id.as_str()).collect();
    if given != actual {
        return Err(members_mismatch(g));
    }
    Ok(())
}

/// The answer for `snapshot_ids` that are not the group's members.
fn members_mismatch(g: &GroupSnapshot) -> Error {
    error::invalid(format!("snapshot_ids do not match the members of group snapshot {}", g.id))
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupControllerService { driver }
    }

    /// The engine's group snapshots: a process serves this service only
    /// when its engine has them, so this answers for a miswired one.
    fn groups(&self) -> Result<&dyn GroupSnapshots> {
        let engine = self.driver.controller();
        engine.groups().ok_or_else(|| {
            error::unsupported(format!("the {} engine has no group snapshots", engine.kind()))
        })
    }

    async fn create(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
        let groups = self.groups()?;
        validate::name(&req.name, "name")?;
        if req.source_volume_ids.is_empty() {
            return Err(error::invalid("source_volume_ids must name at least one volume"));
        }
        let mut seen = HashSet::new();
        for id in &req.source_volume_ids {
            validate::id(id, "source_volume_ids")?;
            if !seen.insert(id.as_str()) {
                return Err(error::invalid(format!("volume {id} is listed twice")));
            }
        }
        if let Some(k) = validate::engine_parameters(&req.parameters).keys().next() {
            return Err(error::invalid(format!("unknown group snapshot parameter {k:?}")));
        }
        let shared: Vec<String> = req.source_volume_ids.iter().map(|v| locks::volume(v)).collect();
        let _guard = self.driver.locks.acquire(&[locks::group_name(&req.name)], &shared)?;

        let (group, window) = groups
            .create_group_snapshot(
                &req.name,
                &req.source_volume_ids,
                &validate::secrets(&req.secrets),
            )
            .await?;
        crate::metrics::global().observe_freeze(window.as_secs_f64());
        info!(
            group_snapshot_id = %group.id,
            members = group.snapshots.len(),
            freeze_window_ms = window.as_secs_f64() * 1000.0,
            "group snapshot taken"
        );
        Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(to_wire(&group)) })
    }

    async fn delete(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse> {
        let engine = self.groups()?;
        validate::id(&req.group_snapshot_id, "group_snapshot_id")?;
        let _guard = self.driver.locks.exclusive(locks::group(&req.group_snapshot_id))?;
        // Each member is locked as a DeleteSnapshot would lock it: a restore
        // or clone from a member that is running finishes first (the delete
        // is ABORTED and retried), and never reads a file being trashed.
        let _members = match engine.group_snapshot(&req.group_snapshot_id).await {
            Ok(g) => {
                self.check_members_left(&g, &req.snapshot_ids).await?;
                let keys: Vec<String> =
                    g.snapshots.iter().map(|m| locks::snapshot(&m.id)).collect();
                Some(self.driver.locks.acquire(&keys, &[])?)
            }
            Err(e) if e.code() == tonic::Code::NotFound => None,
            Err(e) => return Err(e),
        };
        engine
            .delete_group_snapshot(&req.group_snapshot_id, &validate::secrets(&req.secrets))
            .await?;
        Ok(csi::DeleteVolumeGroupSnapshotResponse {})
    }

    /// DeleteVolumeGroupSnapshot's `snapshot_ids` check. A delete that was
    /// cut short (a group spread over nodes, one node's part gone, another
    /// node unreachable or busy) leaves fewer members than the sidecar
    /// names on its retry: a named member that no longer exists anywhere
    /// is one that delete already removed, not a mismatch. Every member
    /// still there must be named, and none named may live on elsewhere.
    async fn check_members_left(&self, g: &GroupSnapshot, snapshot_ids: &[String]) -> Result<()> {
        if snapshot_ids.is_empty() {
            return Ok(());
        }
        let given: HashSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
        let left: HashSet<&str> = g.snapshots.iter().map(|s| s.id.as_str()).collect();
        if !left.is_subset(&given) {
            return Err(members_mismatch(g));
        }
        for gone in given.difference(&left) {
            let Some(snapshots) = self.driver.controller().snapshots() else { break };
            match snapshots.snapshot(gone).await {
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Ok(_) => return Err(members_mismatch(g)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn get(
        &self,
        req: csi::GetVolumeGroupSnapshotRequest,
    ) -> Result<csi::GetVolumeGroupSnapshotResponse> {
        let groups = self.groups()?;
        validate::id(&req.group_snapshot_id, "group_snapshot_id")?;
        let g = groups.group_snapshot(&req.group_snapshot_id).await?;
        check_members(&g, &req.snapshot_ids)?;
        Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(to_wire(&g)) })
    }
}

impl GroupControllerService {
    async fn get_capabilities(
        &self,
        _: csi::GroupControllerGetCapabilitiesRequest,
    ) -> Result<csi::GroupControllerGetCapabilitiesResponse> {
        Ok(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(csi::group_controller_service_capability::Type::Rpc(
                    csi::group_controller_service_capability::Rpc {
                        r#type: Cap::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        })
    }
}

rpc::service! {
    GroupControllerService: csi::group_controller_server::GroupController {
        fn group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest)
            -> csi::GroupControllerGetCapabilitiesResponse => inline get_capabilities;
        fn create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest)
            -> csi::CreateVolumeGroupSnapshotResponse => detached create;
        fn delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest)
            -> csi::DeleteVolumeGroupSnapshotResponse => detached delete;
        fn get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest)
            -> csi::GetVolumeGroupSnapshotResponse => inline get;
    }
}
