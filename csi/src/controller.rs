//! The CSI Controller service: volumes, publication to nodes, capacity and expansion, all
//! through the manager.
//!
//! - **Create/Delete.** The volume id is the IronSAN volume name ([`crate::volume`]), so a
//!   repeated CreateVolume finds the volume it made and checks it is compatible (size within
//!   the range, same replicas and chunk size) or answers ALREADY_EXISTS. The manager creates a
//!   volume in one Raft command, placement included, so a refused create leaves nothing
//!   behind. A volume still published (or attached by an operator) is not deleted
//!   (FAILED_PRECONDITION); an unknown one counts as deleted.
//! - **Publish.** ControllerPublishVolume(volume, node) is the manager's `Publish`: it attaches
//!   the volume, under a lease, to the gateway whose id is the node id, or for ReadOnlyMany
//!   adds the node as another reader of the gateway already serving it. The publish context
//!   names that gateway's portal, the IQN and LUN 0. A writer published on one node refuses
//!   every other node (FAILED_PRECONDITION); the same node with a different read-only flag
//!   gets ALREADY_EXISTS.
//! - **Expand** is the manager's resize; the gateway announces the new size to initiators as
//!   CAPACITY DATA HAS CHANGED and the node grows the filesystem (NodeExpandVolume).
//! - **Snapshots** are not there yet: the capability is not advertised and the calls answer
//!   UNIMPLEMENTED.

use std::collections::HashMap;
use std::time::Duration;

use ironsan_common::manager_client::{ClientError, Code as MgrCode, ManagerClient};
use ironsan_common::proto::manager as pb;
use tonic011::{Request, Response, Status};

use crate::capability::{self, Access};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::*;
use crate::error::{invalid, manager_status};
use crate::node::{CTX_GATEWAY, CTX_IQN, CTX_LUN, CTX_PORTAL};
use crate::volume::{self, Params, SizeError, CTX_FS_TYPE};

/// ListVolumes tokens are `after:` + the last volume id returned, so a page boundary
/// survives volumes being created or deleted in between.
const TOKEN_PREFIX: &str = "after:";

pub struct ControllerService {
    mgr: ManagerClient,
    lease_ms: u64,
}

impl ControllerService {
    pub fn new(mgr: ManagerClient, lease: Duration) -> Self {
        ControllerService {
            mgr,
            lease_ms: lease.as_millis() as u64,
        }
    }

    fn vref(id: &str) -> pb::VolumeRef {
        pb::VolumeRef {
            id: 0,
            name: id.to_string(),
        }
    }

    /// The volume, or None when the manager does not know it.
    async fn find(&self, id: &str) -> Result<Option<pb::Volume>, Status> {
        if !volume::valid_volume_id(id) {
            // Not a name this driver could have made: no such volume.
            return Ok(None);
        }
        match self.mgr.get_volume(Self::vref(id)).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code() == MgrCode::NotFound => Ok(None),
            Err(e) => Err(manager_status("look up the volume", &e)),
        }
    }

    /// The portal of the gateway with this id (NOT_FOUND when no such gateway registered).
    async fn gateway_portal(&self, gateway: &str) -> Result<String, Status> {
        match self
            .mgr
            .get_gateway(pb::GatewayRef {
                id: gateway.to_string(),
            })
            .await
        {
            Ok(g) => Ok(g.portal),
            Err(e) if e.code() == MgrCode::NotFound => Err(Status::not_found(format!(
                "node {gateway:?} has no IronSAN gateway registered (is the gateway running there, with --node-id {gateway}?)"
            ))),
            Err(e) => Err(manager_status("look up the node's gateway", &e)),
        }
    }

    fn csi_volume(&self, v: &pb::Volume, ctx: HashMap<String, String>) -> Volume {
        Volume {
            capacity_bytes: v.size as i64,
            volume_id: v.name.clone(),
            volume_context: ctx,
            content_source: None,
            accessible_topology: Vec::new(),
        }
    }
}

fn cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

fn size_status(e: SizeError) -> Status {
    match e {
        SizeError::Invalid(m) => Status::invalid_argument(m),
        SizeError::OutOfRange(m) => Status::out_of_range(m),
    }
}

/// The volume as CSI status: the nodes it is published to, and whether it is degraded.
fn published_nodes(v: &pb::Volume) -> Vec<String> {
    v.attachment
        .as_ref()
        .map(|a| a.published.clone())
        .unwrap_or_default()
}

fn condition(v: &pb::Volume) -> VolumeCondition {
    if v.degraded_chunks == 0 {
        VolumeCondition {
            abnormal: false,
            message: format!("all chunks have their {} replicas", v.replicas),
        }
    } else {
        VolumeCondition {
            abnormal: true,
            message: format!(
                "{} chunks are short of their {} replicas (still served; being rebuilt)",
                v.degraded_chunks, v.replicas
            ),
        }
    }
}

/// The accessible topology of a new volume: every node with a gateway reaches every volume,
/// so it is accessible from all the requisite segments (else the preferred ones); no
/// requirement means accessible everywhere (an empty list).
fn accessible_topology(req: Option<&TopologyRequirement>) -> Vec<Topology> {
    let Some(req) = req else { return Vec::new() };
    let source = if req.requisite.is_empty() {
        &req.preferred
    } else {
        &req.requisite
    };
    let mut out: Vec<Topology> = Vec::new();
    for t in source {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

#[tonic011::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(invalid("CreateVolume needs a name"));
        }
        capability::check_all(&req.volume_capabilities).map_err(invalid)?;
        let params = Params::parse(&req.parameters).map_err(invalid)?;
        if !req.mutable_parameters.is_empty() {
            return Err(invalid(
                "mutable parameters (VolumeAttributesClass) are not supported",
            ));
        }
        if req.volume_content_source.is_some() {
            return Err(invalid(
                "creating a volume from a snapshot or another volume is not supported yet",
            ));
        }
        let size = volume::size_for(req.capacity_range.as_ref()).map_err(size_status)?;
        let id = volume::volume_id_for(&req.name);
        let mut ctx = HashMap::new();
        if !params.fs_type.is_empty() {
            ctx.insert(CTX_FS_TYPE.to_string(), params.fs_type.clone());
        }
        let topology = accessible_topology(req.accessibility_requirements.as_ref());

        let compatible = |v: &pb::Volume| -> Result<(), Status> {
            if v.state == pb::VolumeState::VolumeDeleting as i32 {
                return Err(Status::aborted(format!(
                    "volume {id} of the same name is still being deleted; retry"
                )));
            }
            let mismatch = if !volume::size_fits(v.size, req.capacity_range.as_ref()) {
                Some(format!("its size is {} bytes", v.size))
            } else if params.replicas != 0 && params.replicas != v.replicas {
                Some(format!("it has {} replicas", v.replicas))
            } else if params.chunk_size != 0 && params.chunk_size != v.chunk_size {
                Some(format!("its chunk size is {}", v.chunk_size))
            } else {
                None
            };
            match mismatch {
                Some(why) => Err(Status::already_exists(format!(
                    "volume {id} for name {:?} exists and does not match the request: {why}",
                    req.name
                ))),
                None => Ok(()),
            }
        };

        let v = match self.find(&id).await? {
            Some(v) => {
                compatible(&v)?;
                v
            }
            None => {
                let created = self
                    .mgr
                    .create_volume(pb::CreateVolumeRequest {
                        name: id.clone(),
                        size,
                        replicas: params.replicas,
                        chunk_size: params.chunk_size,
                        qos: params.qos,
                    })
                    .await;
                match created {
                    Ok(v) => {
                        tracing::info!(volume = %id, name = %req.name, size, replicas = v.replicas, "CSI volume created");
                        v
                    }
                    // A concurrent or retried create of the same name (the manager may have
                    // committed our own earlier attempt): the volume must still match.
                    Err(e) if e.code() == MgrCode::AlreadyExists => {
                        let v = self.find(&id).await?.ok_or_else(|| {
                            Status::aborted(format!("volume {id} came and went; retry"))
                        })?;
                        compatible(&v)?;
                        v
                    }
                    Err(e) => return Err(manager_status("create the volume", &e)),
                }
            }
        };
        let mut vol = self.csi_volume(&v, ctx);
        vol.accessible_topology = topology;
        Ok(Response::new(CreateVolumeResponse { volume: Some(vol) }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(invalid("DeleteVolume needs a volume id"));
        }
        let Some(v) = self.find(&id).await? else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        if let Some(a) = &v.attachment {
            let to = if a.published.is_empty() {
                format!("attached to gateway {}", a.gateway)
            } else {
                format!("published to {}", a.published.join(", "))
            };
            return Err(Status::failed_precondition(format!(
                "volume {id} is {to}; unpublish it first"
            )));
        }
        match self
            .mgr
            .delete_volume(pb::DeleteVolumeRequest {
                volume: Some(Self::vref(&id)),
            })
            .await
        {
            Ok(_) => tracing::info!(volume = %id, "CSI volume deleted"),
            // Deleted meanwhile, or our own earlier attempt's answer was lost.
            Err(e) if e.code() == MgrCode::NotFound => {}
            Err(e) => return Err(manager_status("delete the volume", &e)),
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(invalid("ControllerPublishVolume needs a volume id"));
        }
        if req.node_id.is_empty() {
            return Err(invalid("ControllerPublishVolume needs a node id"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("ControllerPublishVolume needs a volume capability"))?;
        let cap = capability::check(cap).map_err(invalid)?;
        let Some(v) = self.find(&req.volume_id).await? else {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                req.volume_id
            )));
        };
        let own_portal = self.gateway_portal(&req.node_id).await?;
        // Single-node modes: another node holding it is refused here, whatever its flags (the
        // manager alone would let a second read-only node join).
        if let Some(a) = &v.attachment {
            let elsewhere: Vec<&String> =
                a.published.iter().filter(|n| **n != req.node_id).collect();
            if !elsewhere.is_empty() && !cap.multi_node() && !a.published.contains(&req.node_id) {
                return Err(Status::failed_precondition(format!(
                    "volume {} is published to node {} and its access mode allows one node",
                    req.volume_id, elsewhere[0]
                )));
            }
        }
        let readonly = req.readonly || cap.multi_node();
        let a = self
            .mgr
            .publish(pb::PublishRequest {
                volume: Some(Self::vref(&req.volume_id)),
                node: req.node_id.clone(),
                readonly,
                lease_ms: self.lease_ms,
            })
            .await
            .map_err(|e| publish_status(&req.volume_id, &req.node_id, &e))?;
        let portal = if a.gateway == req.node_id {
            own_portal
        } else {
            self.gateway_portal(&a.gateway).await?
        };
        tracing::info!(volume = %req.volume_id, node = %req.node_id, gateway = %a.gateway, readonly, "CSI volume published");
        let ctx = HashMap::from([
            (CTX_PORTAL.to_string(), portal),
            (CTX_IQN.to_string(), volume::iqn(&req.volume_id)),
            (CTX_LUN.to_string(), "0".to_string()),
            (CTX_GATEWAY.to_string(), a.gateway),
        ]);
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: ctx,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(invalid("ControllerUnpublishVolume needs a volume id"));
        }
        let Some(v) = self.find(&req.volume_id).await? else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        // No node id: unpublish from every node (the spec's rule).
        let nodes = if req.node_id.is_empty() {
            published_nodes(&v)
        } else {
            vec![req.node_id.clone()]
        };
        for node in nodes {
            match self
                .mgr
                .unpublish(pb::UnpublishRequest {
                    volume: Some(Self::vref(&req.volume_id)),
                    node: node.clone(),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(volume = %req.volume_id, node = %node, "CSI volume unpublished")
                }
                Err(e) if e.code() == MgrCode::NotFound => {}
                Err(e) => return Err(manager_status("unpublish the volume", &e)),
            }
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(invalid("ValidateVolumeCapabilities needs a volume id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(invalid(
                "ValidateVolumeCapabilities needs volume capabilities",
            ));
        }
        if self.find(&req.volume_id).await?.is_none() {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                req.volume_id
            )));
        }
        let checked = capability::check_all(&req.volume_capabilities)
            .and_then(|_| Params::parse(&req.parameters).map(|_| ()))
            .and_then(|_| {
                req.volume_context.get(CTX_FS_TYPE).map_or(Ok(()), |fs| {
                    Params::parse(&HashMap::from([(CTX_FS_TYPE.to_string(), fs.clone())]))
                        .map(|_| ())
                })
            });
        let resp = match checked {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        if req.max_entries < 0 {
            return Err(invalid("max_entries must not be negative"));
        }
        let after = match req.starting_token.as_str() {
            "" => None,
            t => Some(t.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
                Status::aborted(format!("starting_token {t:?} is not one this driver gave"))
            })?),
        };
        let mut vols = self
            .mgr
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map_err(|e| manager_status("list volumes", &e))?
            .volumes;
        vols.retain(|v| {
            v.state != pb::VolumeState::VolumeDeleting as i32
                && after.is_none_or(|a| v.name.as_str() > a)
        });
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        let page = match req.max_entries {
            0 => vols.len(),
            n => (n as usize).min(vols.len()),
        };
        let next_token = if page < vols.len() {
            format!("{TOKEN_PREFIX}{}", vols[page - 1].name)
        } else {
            String::new()
        };
        let entries = vols[..page]
            .iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(self.csi_volume(v, HashMap::new())),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        if !req.volume_capabilities.is_empty() {
            // Unsupported capabilities: nothing can be provisioned for them.
            if capability::check_all(&req.volume_capabilities).is_err() {
                return Ok(Response::new(GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: None,
                    minimum_volume_size: None,
                }));
            }
        }
        let params = Params::parse(&req.parameters).map_err(invalid)?;
        let zone = req
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(crate::TOPOLOGY_ZONE));
        let nodes = self
            .mgr
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|e| manager_status("list storage nodes", &e))?
            .nodes;
        let free: u64 = nodes
            .iter()
            .filter(|n| n.state == pb::NodeState::NodeUp as i32)
            .filter(|n| zone.is_none_or(|z| *z == n.zone))
            // `free` comes with heartbeats (0 until the leader has one): the disks' free space
            // at registration stands in until then.
            .map(|n| match n.free {
                0 => n.disks.iter().map(|d| d.free).sum(),
                f => f,
            })
            .sum();
        // Thin volumes: what can still be written, each byte stored `replicas` times.
        let replicas = u64::from(if params.replicas == 0 {
            3
        } else {
            params.replicas
        });
        let available = (free / replicas).min(i64::MAX as u64) as i64;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(volume::MAX_VOLUME_SIZE as i64),
            minimum_volume_size: Some(volume::SIZE_UNIT as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities = [
            CreateDeleteVolume,
            PublishUnpublishVolume,
            ListVolumes,
            ListVolumesPublishedNodes,
            GetCapacity,
            ExpandVolume,
            PublishReadonly,
            GetVolume,
            VolumeCondition,
            SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(cap)
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(invalid("ControllerExpandVolume needs a volume id"));
        }
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("ControllerExpandVolume needs a capacity range"))?;
        let block = match &req.volume_capability {
            Some(c) => capability::check(c).map_err(invalid)?.access == Access::Block,
            None => false,
        };
        let Some(v) = self.find(&req.volume_id).await? else {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                req.volume_id
            )));
        };
        let size = volume::size_for(Some(range)).map_err(size_status)?;
        let size = if v.size >= size {
            // Already that big (a repeated call, or a request below the current size, which
            // CSI treats as done: volumes never shrink).
            v.size
        } else {
            let grown = self
                .mgr
                .resize_volume(pb::ResizeVolumeRequest {
                    volume: Some(Self::vref(&req.volume_id)),
                    size,
                })
                .await
                .map_err(|e| manager_status("resize the volume", &e))?;
            tracing::info!(volume = %req.volume_id, from = v.size, to = grown.size, "CSI volume expanded");
            grown.size
        };
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            // A filesystem has to be grown by the node; a raw device is simply bigger.
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(invalid("ControllerGetVolume needs a volume id"));
        }
        let Some(v) = self.find(&id).await? else {
            return Err(Status::not_found(format!("volume {id} does not exist")));
        };
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(&v, HashMap::new())),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volume attributes classes are not supported",
        ))
    }
}

/// The manager's publish refusals in CSI's words.
fn publish_status(volume: &str, node: &str, e: &ClientError) -> Status {
    match e.code() {
        MgrCode::FailedPrecondition => Status::failed_precondition(format!(
            "volume {volume} cannot be published to node {node}: {}",
            e.message()
        )),
        MgrCode::AlreadyExists => Status::already_exists(format!(
            "volume {volume} is already published to node {node} with a different read-only flag: {}",
            e.message()
        )),
        MgrCode::NotFound => Status::not_found(format!("volume {volume} does not exist")),
        _ => manager_status("publish the volume", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessible_topology_follows_the_requirement() {
        let seg = |n: &str| Topology {
            segments: HashMap::from([(crate::TOPOLOGY_NODE.to_string(), n.to_string())]),
        };
        assert!(accessible_topology(None).is_empty());
        let req = TopologyRequirement {
            requisite: vec![seg("a"), seg("b"), seg("a")],
            preferred: vec![seg("b")],
        };
        assert_eq!(accessible_topology(Some(&req)), vec![seg("a"), seg("b")]);
        let req = TopologyRequirement {
            requisite: vec![],
            preferred: vec![seg("c")],
        };
        assert_eq!(accessible_topology(Some(&req)), vec![seg("c")]);
    }

    #[test]
    fn condition_reports_degraded_chunks() {
        let mut v = pb::Volume {
            replicas: 3,
            ..Default::default()
        };
        assert!(!condition(&v).abnormal);
        v.degraded_chunks = 2;
        let c = condition(&v);
        assert!(c.abnormal && c.message.contains("2 chunks"), "{c:?}");
    }
}
