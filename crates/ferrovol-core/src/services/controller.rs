//! Controller service: volumes and snapshots, engine-agnostic.
//!
//! Each RPC validates its request, takes the operation locks it needs
//! (ABORTED when the name or ID is busy), and calls the engine.

use std::sync::Arc;

use ferrovol_csi as csi;
use ferrovol_csi::controller_service_capability::rpc::Type as Cap;

use crate::engine::{
    AccessMode, AccessType, ContentSource, ControllerEngine, ExpansionSite, NewVolume, Publish,
    Publishing, SnapshotFilter, Snapshots, TopologyRequirement,
};
use crate::error::{self, Result};
use crate::locks;
use crate::rpc::{self, Annotated};
use crate::services::{convert, validate, Driver};

#[derive(Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }

    fn engine(&self) -> &Arc<dyn ControllerEngine> {
        self.driver.controller()
    }

    /// The engine's snapshots, or UNIMPLEMENTED naming the engine.
    fn snapshots(&self) -> Result<&dyn Snapshots> {
        let engine = self.engine();
        engine.snapshots().ok_or_else(|| {
            error::unsupported(format!("the {} engine has no snapshots", engine.kind()))
        })
    }

    fn publishing(&self) -> Result<&dyn Publishing> {
        let engine = self.engine();
        engine.publishing().ok_or_else(|| {
            error::unsupported(format!(
                "the {} engine needs no controller attach step (attachRequired: false)",
                engine.kind()
            ))
        })
    }

    /// Exactly what works, no more: the CO plans around this list.
    pub fn capabilities(engine: &dyn ControllerEngine) -> Vec<Cap> {
        let features = engine.features();
        let mut caps = vec![
            Cap::CreateDeleteVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::GetVolume,
            Cap::VolumeCondition,
        ];
        if features.clones {
            caps.push(Cap::CloneVolume);
        }
        if engine.snapshots().is_some() {
            caps.extend([Cap::CreateDeleteSnapshot, Cap::ListSnapshots, Cap::GetSnapshot]);
        }
        if features.mount_modes.contains(&AccessMode::SingleNodeSingleWriter) {
            caps.push(Cap::SingleNodeMultiWriter);
        }
        if engine.publishing().is_some() {
            caps.push(Cap::PublishUnpublishVolume);
            caps.push(Cap::ListVolumesPublishedNodes);
            caps.push(Cap::PublishReadonly);
        }
        if features.expansion == ExpansionSite::Controller {
            caps.push(Cap::ExpandVolume);
        }
        caps
    }

    async fn create_volume(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<Annotated<csi::CreateVolumeResponse>> {
        let engine = self.engine();
        validate::name(&req.name, "name")?;
        let features = engine.features();
        let access = validate::capabilities(&req.volume_capabilities, &features)?;
        let (mut required_bytes, limit_bytes) =
            validate::capacity_range(req.capacity_range.as_ref())?;
        // A filesystem volume must be big enough for its mkfs to accept.
        if let AccessType::Mount { fs_type } = &access {
            let minimum = features.filesystem(fs_type).map_or(0, |f| f.minimum_size);
            if limit_bytes > 0 && limit_bytes < minimum {
                return Err(error::out_of_range(format!(
                    "{fs_type} needs at least {minimum} bytes; the limit is {limit_bytes}"
                )));
            }
            // Without a size the engine's default (larger than any minimum)
            // applies.
            if required_bytes > 0 {
                required_bytes = required_bytes.max(minimum);
            }
        }
        let modes: Vec<AccessMode> = req
            .volume_capabilities
            .iter()
            .filter_map(|c| c.access_mode.as_ref())
            .filter_map(|m| AccessMode::try_from(m.mode).ok())
            .collect();
        let parameters = validate::engine_parameters(&req.parameters);
        engine.validate_parameters(&parameters)?;
        if !req.mutable_parameters.is_empty() {
            return Err(error::invalid("mutable_parameters are not supported (no MODIFY_VOLUME)"));
        }
        let source = convert::content_source_from_wire(req.volume_content_source.as_ref())?;
        if let (Some(ContentSource::Snapshot(_)), None) = (&source, engine.snapshots()) {
            return Err(error::invalid(format!(
                "the {} engine has no snapshots to restore from",
                engine.kind()
            )));
        }
        if let (Some(ContentSource::Volume(_)), false) = (&source, features.clones) {
            return Err(error::invalid(format!(
                "the {} engine does not clone volumes (no CLONE_VOLUME)",
                engine.kind()
            )));
        }
        let accessibility = req.accessibility_requirements.as_ref().map(|r| TopologyRequirement {
            requisite: r.requisite.iter().map(validate::topology).collect(),
            preferred: r.preferred.iter().map(validate::topology).collect(),
        });

        let shared = match &source {
            Some(ContentSource::Snapshot(id)) => vec![locks::snapshot(id)],
            Some(ContentSource::Volume(id)) => vec![locks::volume(id)],
            None => vec![],
        };
        let _guard = self.driver.locks.acquire(&[locks::volume_name(&req.name)], &shared)?;
        let volume = engine
            .create_volume(NewVolume {
                name: req.name,
                required_bytes,
                limit_bytes,
                access,
                modes,
                parameters,
                source,
                accessibility,
                secrets: validate::secrets(&req.secrets),
            })
            .await?;
        Ok(Annotated {
            message: csi::CreateVolumeResponse { volume: Some(convert::volume(&volume)) },
            headers: convert::facts([&volume]),
        })
    }

    async fn delete_volume(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse> {
        validate::id(&req.volume_id, "volume_id")?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        self.engine().delete_volume(&req.volume_id, &validate::secrets(&req.secrets)).await?;
        Ok(csi::DeleteVolumeResponse {})
    }

    /// The spec's order: missing arguments (INVALID_ARGUMENT), then an
    /// unknown volume or node (NOT_FOUND), then conflicts with where the
    /// volume is published (FAILED_PRECONDITION, the engine's to say).
    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        let publishing = self.publishing()?;
        let features = self.engine().features();
        validate::id(&req.volume_id, "volume_id")?;
        validate::id(&req.node_id, "node_id")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| error::invalid("volume_capability is required"))?;
        let access = validate::capability(cap, &features)?;
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| AccessMode::try_from(m.mode).ok())
            .unwrap_or(AccessMode::Unknown);
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        let publish_context = publishing
            .publish(&Publish {
                volume_id: req.volume_id,
                node_id: req.node_id,
                mode,
                access,
                read_only: req.readonly,
                volume_context: req.volume_context.into_iter().collect(),
                secrets: validate::secrets(&req.secrets),
            })
            .await?;
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: publish_context.into_iter().collect(),
        })
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        let publishing = self.publishing()?;
        validate::id(&req.volume_id, "volume_id")?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        let node = (!req.node_id.is_empty()).then_some(req.node_id.as_str());
        publishing.unpublish(&req.volume_id, node, &validate::secrets(&req.secrets)).await?;
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn validate_volume_capabilities(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let engine = self.engine();
        validate::id(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(error::invalid("volume_capabilities is required"));
        }
        engine.volume(&req.volume_id).await?;
        // Unsupported capabilities are an answer ("not confirmed"), not an
        // error: the CO asked a question.
        let features = engine.features();
        let problem = req
            .volume_capabilities
            .iter()
            .find_map(|c| validate::capability(c, &features).err())
            .or_else(|| {
                engine.validate_parameters(&validate::engine_parameters(&req.parameters)).err()
            });
        Ok(match problem {
            Some(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
        })
    }

    async fn list_volumes(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<Annotated<csi::ListVolumesResponse>> {
        let max = validate::max_entries(req.max_entries)?;
        let token = (!req.starting_token.is_empty()).then_some(req.starting_token.as_str());
        let (page, conditions) = self.engine().list_volumes_with_conditions(token, max).await?;
        let entries = page
            .items
            .iter()
            .zip(conditions)
            .map(|(v, condition)| csi::list_volumes_response::Entry {
                volume: Some(convert::volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: v.published_nodes.clone(),
                    volume_condition: condition.ok().as_ref().map(convert::condition),
                }),
            })
            .collect();
        Ok(Annotated {
            message: csi::ListVolumesResponse {
                entries,
                next_token: page.next.unwrap_or_default(),
            },
            headers: convert::facts(&page.items),
        })
    }

    async fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let engine = self.engine();
        let parameters = validate::engine_parameters(&req.parameters);
        let topology = req.accessible_topology.as_ref().map(validate::topology);
        let capacity = engine.capacity(&parameters, topology.as_ref()).await?;
        // Capacity for something we cannot create (unsupported capability
        // or parameters) is zero, which is the spec's answer; so is a
        // topology segment the engine does not serve (its own answer).
        let features = engine.features();
        let servable =
            req.volume_capabilities.iter().all(|c| validate::capability(c, &features).is_ok())
                && engine.validate_parameters(&parameters).is_ok();
        // A filesystem's mkfs minimum raises the smallest volume; where even
        // that does not fit, nothing can be created here.
        let minimum = req
            .volume_capabilities
            .iter()
            .filter_map(|c| match &c.access_type {
                Some(csi::volume_capability::AccessType::Mount(m)) => {
                    features.filesystem(&m.fs_type).map(|f| f.minimum_size)
                }
                _ => None,
            })
            .fold(capacity.minimum_volume_size, u64::max);
        let fits = servable && capacity.maximum_volume_size >= minimum;
        Ok(csi::GetCapacityResponse {
            available_capacity: if fits { capacity.available as i64 } else { 0 },
            maximum_volume_size: Some(if fits { capacity.maximum_volume_size as i64 } else { 0 }),
            minimum_volume_size: Some(minimum as i64),
        })
    }

    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        let snapshots = self.snapshots()?;
        validate::name(&req.name, "name")?;
        validate::id(&req.source_volume_id, "source_volume_id")?;
        if let Some(k) = validate::engine_parameters(&req.parameters).keys().next() {
            return Err(error::invalid(format!("unknown snapshot parameter {k:?}")));
        }
        let _guard = self
            .driver
            .locks
            .acquire(&[locks::snapshot_name(&req.name)], &[locks::volume(&req.source_volume_id)])?;
        let snapshot = snapshots
            .create_snapshot(&req.name, &req.source_volume_id, &validate::secrets(&req.secrets))
            .await?;
        Ok(csi::CreateSnapshotResponse { snapshot: Some(convert::snapshot(&snapshot)) })
    }

    async fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        let snapshots = self.snapshots()?;
        validate::id(&req.snapshot_id, "snapshot_id")?;
        let _guard = self.driver.locks.exclusive(locks::snapshot(&req.snapshot_id))?;
        snapshots.delete_snapshot(&req.snapshot_id, &validate::secrets(&req.secrets)).await?;
        Ok(csi::DeleteSnapshotResponse {})
    }

    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let snapshots = self.snapshots()?;
        let max = validate::max_entries(req.max_entries)?;
        let filter = SnapshotFilter {
            snapshot_id: (!req.snapshot_id.is_empty()).then(|| req.snapshot_id.clone()),
            source_volume: (!req.source_volume_id.is_empty()).then(|| req.source_volume_id.clone()),
        };
        let token = (!req.starting_token.is_empty()).then_some(req.starting_token.as_str());
        let page = snapshots.list_snapshots(&filter, token, max).await?;
        Ok(csi::ListSnapshotsResponse {
            entries: page
                .items
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(convert::snapshot(s)),
                })
                .collect(),
            next_token: page.next.unwrap_or_default(),
        })
    }

    async fn get_snapshot(&self, req: csi::GetSnapshotRequest) -> Result<csi::GetSnapshotResponse> {
        let snapshots = self.snapshots()?;
        validate::id(&req.snapshot_id, "snapshot_id")?;
        let s = snapshots.snapshot(&req.snapshot_id).await?;
        Ok(csi::GetSnapshotResponse { snapshot: Some(convert::snapshot(&s)) })
    }

    async fn expand_volume(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let engine = self.engine();
        if engine.features().expansion != ExpansionSite::Controller {
            return Err(error::unsupported(format!(
                "the {} engine grows volumes on the node (NodeExpandVolume)",
                engine.kind()
            )));
        }
        validate::id(&req.volume_id, "volume_id")?;
        let (required, limit) = validate::capacity_range(req.capacity_range.as_ref())?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        let expanded = engine
            .expand_volume(&req.volume_id, required, limit, &validate::secrets(&req.secrets))
            .await?;
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: expanded.capacity as i64,
            node_expansion_required: expanded.node_expansion_required,
        })
    }

    async fn get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<Annotated<csi::ControllerGetVolumeResponse>> {
        validate::id(&req.volume_id, "volume_id")?;
        let (volume, condition) = self.engine().volume_with_condition(&req.volume_id).await?;
        Ok(Annotated {
            message: csi::ControllerGetVolumeResponse {
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: volume.published_nodes.clone(),
                    volume_condition: Some(convert::condition(&condition)),
                }),
                volume: Some(convert::volume(&volume)),
            },
            headers: convert::facts([&volume]),
        })
    }
}

impl ControllerService {
    async fn get_capabilities(
        &self,
        _: csi::ControllerGetCapabilitiesRequest,
    ) -> Result<csi::ControllerGetCapabilitiesResponse> {
        let capabilities = Self::capabilities(self.engine().as_ref())
            .into_iter()
            .map(|c| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc { r#type: c as i32 },
                )),
            })
            .collect();
        Ok(csi::ControllerGetCapabilitiesResponse { capabilities })
    }

    async fn modify_volume(
        &self,
        _: csi::ControllerModifyVolumeRequest,
    ) -> Result<csi::ControllerModifyVolumeResponse> {
        Err(error::unsupported("ControllerModifyVolume is not supported"))
    }
}

rpc::service! {
    ControllerService: csi::controller_server::Controller {
        fn create_volume(csi::CreateVolumeRequest) -> csi::CreateVolumeResponse
            => detached_annotated create_volume;
        fn delete_volume(csi::DeleteVolumeRequest) -> csi::DeleteVolumeResponse
            => detached delete_volume;
        fn controller_publish_volume(csi::ControllerPublishVolumeRequest)
            -> csi::ControllerPublishVolumeResponse => detached publish;
        fn controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest)
            -> csi::ControllerUnpublishVolumeResponse => detached unpublish;
        fn validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest)
            -> csi::ValidateVolumeCapabilitiesResponse => inline validate_volume_capabilities;
        fn list_volumes(csi::ListVolumesRequest) -> csi::ListVolumesResponse
            => annotated list_volumes;
        fn get_capacity(csi::GetCapacityRequest) -> csi::GetCapacityResponse => inline get_capacity;
        fn controller_get_capabilities(csi::ControllerGetCapabilitiesRequest)
            -> csi::ControllerGetCapabilitiesResponse => inline get_capabilities;
        fn create_snapshot(csi::CreateSnapshotRequest) -> csi::CreateSnapshotResponse
            => detached create_snapshot;
        fn delete_snapshot(csi::DeleteSnapshotRequest) -> csi::DeleteSnapshotResponse
            => detached delete_snapshot;
        fn list_snapshots(csi::ListSnapshotsRequest) -> csi::ListSnapshotsResponse
            => inline list_snapshots;
        fn get_snapshot(csi::GetSnapshotRequest) -> csi::GetSnapshotResponse => inline get_snapshot;
        fn controller_expand_volume(csi::ControllerExpandVolumeRequest)
            -> csi::ControllerExpandVolumeResponse => detached expand_volume;
        fn controller_get_volume(csi::ControllerGetVolumeRequest)
            -> csi::ControllerGetVolumeResponse => annotated get_volume;
        fn controller_modify_volume(csi::ControllerModifyVolumeRequest)
            -> csi::ControllerModifyVolumeResponse => inline modify_volume;
    }
}
