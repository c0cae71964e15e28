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
//! - **Snapshots.** The snapshot id is `<volume>@<snapshot>` ([`crate::volume`]), the
//!   snapshot name mapped from the CSI name, so CreateSnapshot is idempotent like
//!   CreateVolume: the same name on the same volume answers that snapshot, on another volume
//!   ALREADY_EXISTS. The manager answers a snapshot request at once in state CREATING while
//!   the gateway holding the volume takes it; CreateSnapshot waits up to
//!   [`SNAPSHOT_WAIT`] for READY and otherwise answers `ready_to_use: false` (the
//!   csi-snapshotter calls again until it is true). A FAILED snapshot is deleted and reported
//!   INTERNAL, so the retry starts afresh. DeleteSnapshot only marks the snapshot: the
//!   replicas drop it in the background and it is no longer listed; a snapshot that clones
//!   still copy from is FAILED_PRECONDITION. ListSnapshots shows CREATING and READY ones
//!   (not the internal snapshots volume clones take), paged like ListVolumes.
//! - **Clones.** CreateVolume with a content source is the manager's `CloneVolume` from the
//!   snapshot, or from the source volume's present content: the new volume is usable at once
//!   (chunks are filled from the source before their first I/O). It is at least the source's
//!   size (OUT_OF_RANGE otherwise) and keeps the source's chunk size. A repeated request
//!   must name the same source, unless the volume has none left (fully copied).

use std::collections::HashMap;
use std::time::{Duration, Instant};

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

/// How long CreateSnapshot waits for a snapshot to be READY before answering that it is not
/// yet (the sidecar calls again): short enough to keep its workers free.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);
/// How often CreateSnapshot looks meanwhile.
const SNAPSHOT_POLL: Duration = Duration::from_millis(100);

/// What a CreateVolume's content source names: a volume, and one of its snapshots or not.
struct CloneSource {
    volume: String,
    snapshot: Option<String>,
}

impl CloneSource {
    fn from_request(src: &volume_content_source::Type) -> Result<CloneSource, Status> {
        match src {
            volume_content_source::Type::Snapshot(s) => {
                let (volume, snapshot) =
                    volume::split_snapshot_id(&s.snapshot_id).ok_or_else(|| {
                        Status::not_found(format!("snapshot {} does not exist", s.snapshot_id))
                    })?;
                Ok(CloneSource {
                    volume: volume.to_string(),
                    snapshot: Some(snapshot.to_string()),
                })
            }
            volume_content_source::Type::Volume(v) => Ok(CloneSource {
                volume: v.volume_id.clone(),
                snapshot: None,
            }),
        }
    }

    /// Whether volume `v` was made from this source. Its source is cleared once every chunk
    /// is copied, and then nothing tells: it is taken as made from it.
    fn made(&self, v: &pb::Volume) -> bool {
        v.source.as_ref().is_none_or(|s| {
            s.volume_name == self.volume
                && self.snapshot.as_ref().is_none_or(|n| *n == s.snapshot_name)
        })
    }

    fn describe(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("snapshot {}", volume::snapshot_id(&self.volume, s)),
            None => format!("volume {}", self.volume),
        }
    }
}

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

    /// A snapshot by id: ids are never reused, so a stale request cannot hit a newer one.
    fn snapshot_ref(id: u64) -> pb::SnapshotRef {
        pb::SnapshotRef {
            id,
            volume: None,
            name: String::new(),
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

    /// The snapshots of volume `volume` (None: of every volume); an unknown volume has none.
    async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<pb::Snapshot>, Status> {
        let req = pb::ListSnapshotsRequest {
            volume: volume.map(Self::vref),
            id: 0,
        };
        match self.mgr.list_snapshots(req).await {
            Ok(r) => Ok(r.snapshots),
            Err(e) if e.code() == MgrCode::NotFound => Ok(Vec::new()),
            Err(e) => Err(manager_status("list snapshots", &e)),
        }
    }

    /// The snapshot a CSI snapshot id names, or None (also for an id this driver never makes).
    async fn find_snapshot(&self, id: &str) -> Result<Option<pb::Snapshot>, Status> {
        let Some((volume, name)) = volume::split_snapshot_id(id) else {
            return Ok(None);
        };
        let mut found = self.snapshots(Some(volume)).await?;
        found.retain(|s| s.name == name);
        Ok(found.pop().map(|s| pb::Snapshot {
            // A view field: filled here in case the manager left it out.
            volume_name: volume.to_string(),
            ..s
        }))
    }

    /// Asks the manager for a clone of `src` named `id`: the request's checks need the
    /// source, so it is looked up first (NOT_FOUND when missing).
    async fn clone_volume(
        &self,
        id: &str,
        src: &CloneSource,
        range: Option<&CapacityRange>,
        params: &Params,
    ) -> Result<Result<pb::Volume, ClientError>, Status> {
        let missing = || Status::not_found(format!("source {} does not exist", src.describe()));
        let from = self.find(&src.volume).await?.ok_or_else(missing)?;
        let size = match &src.snapshot {
            Some(name) => {
                let id = volume::snapshot_id(&src.volume, name);
                self.find_snapshot(&id).await?.ok_or_else(missing)?.size
            }
            None => from.size,
        };
        if params.chunk_size != 0 && params.chunk_size != from.chunk_size {
            return Err(invalid(format!(
                "a volume made from {} keeps its chunk size {}, not {}",
                src.describe(),
                from.chunk_size,
                params.chunk_size
            )));
        }
        let size = volume::clone_size(range, size).map_err(size_status)?;
        Ok(self
            .mgr
            .clone_volume(pb::CloneVolumeRequest {
                name: id.to_string(),
                source: Some(Self::vref(&src.volume)),
                snapshot: src.snapshot.clone().unwrap_or_default(),
                size,
                replicas: params.replicas,
                qos: params.qos,
            })
            .await)
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

fn is_state(s: &pb::Snapshot, state: pb::SnapshotState) -> bool {
    s.state == state as i32
}

fn csi_snapshot(s: &pb::Snapshot) -> Snapshot {
    Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: volume::snapshot_id(&s.volume_name, &s.name),
        source_volume_id: s.volume_name.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: (s.created_ms / 1000) as i64,
            nanos: (s.created_ms % 1000 * 1_000_000) as i32,
        }),
        ready_to_use: is_state(s, pb::SnapshotState::SnapshotReady),
        group_snapshot_id: String::new(),
    }
}

/// One page of `items`: sorted by `key`, those after the starting token's key, at most
/// `max_entries` (0: all), and the token of the next page (`after:` + the last key, so a page
/// boundary survives entries coming and going in between; empty after the last page).
fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    max_entries: i32,
    starting_token: &str,
) -> Result<(Vec<T>, String), Status> {
    if max_entries < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    if !starting_token.is_empty() {
        let after = starting_token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            Status::aborted(format!(
                "starting_token {starting_token:?} is not one this driver gave"
            ))
        })?;
        items.retain(|i| key(i).as_str() > after);
    }
    items.sort_by_key(&key);
    let n = match max_entries {
        0 => items.len(),
        n => (n as usize).min(items.len()),
    };
    let next_token = match items.get(n) {
        Some(_) if n > 0 => format!("{TOKEN_PREFIX}{}", key(&items[n - 1])),
        _ => String::new(),
    };
    items.truncate(n);
    Ok((items, next_token))
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
        let source = req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
            .map(CloneSource::from_request)
            .transpose()?;
        // A clone's size depends on its source's, known once that is looked up.
        let size = match source {
            Some(_) => 0,
            None => volume::size_for(req.capacity_range.as_ref()).map_err(size_status)?,
        };
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
                source
                    .as_ref()
                    .filter(|s| !s.made(v))
                    .map(|s| format!("it is not made from {}", s.describe()))
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
                let created = match &source {
                    Some(src) => {
                        self.clone_volume(&id, src, req.capacity_range.as_ref(), &params)
                            .await?
                    }
                    None => {
                        self.mgr
                            .create_volume(pb::CreateVolumeRequest {
                                name: id.clone(),
                                size,
                                replicas: params.replicas,
                                chunk_size: params.chunk_size,
                                qos: params.qos,
                            })
                            .await
                    }
                };
                match created {
                    Ok(v) => {
                        let from = source.as_ref().map(CloneSource::describe);
                        tracing::info!(volume = %id, name = %req.name, size = v.size, replicas = v.replicas, ?from, "CSI volume created");
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
        vol.content_source = req.volume_content_source;
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
        let mut vols = self
            .mgr
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .map_err(|e| manager_status("list volumes", &e))?
            .volumes;
        vols.retain(|v| v.state != pb::VolumeState::VolumeDeleting as i32);
        let (vols, next_token) = page(
            vols,
            |v| v.name.clone(),
            req.max_entries,
            &req.starting_token,
        )?;
        let entries = vols
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
            CreateDeleteSnapshot,
            ListSnapshots,
            CloneVolume,
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
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(invalid("CreateSnapshot needs a name"));
        }
        if req.source_volume_id.is_empty() {
            return Err(invalid("CreateSnapshot needs a source volume id"));
        }
        let source = req.source_volume_id.as_str();
        let name = volume::volume_id_for(&req.name);
        let id = volume::snapshot_id(source, &name);
        if self.find(source).await?.is_none() {
            return Err(Status::not_found(format!("volume {source} does not exist")));
        }
        // The snapshot name comes from the CSI name, unique across volumes: the same name on
        // another volume is another snapshot.
        let same_name: Vec<pb::Snapshot> = self
            .snapshots(None)
            .await?
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        if let Some(other) = same_name.iter().find(|s| s.volume_name != source) {
            return Err(Status::already_exists(format!(
                "snapshot name {:?} is taken by snapshot {} of volume {}",
                req.name,
                volume::snapshot_id(&other.volume_name, &name),
                other.volume_name
            )));
        }
        let gone = || Status::aborted(format!("snapshot {id} came and went; retry"));
        // What is left of `same_name` is this volume's snapshot of that name, if any.
        let mut snap = match same_name.into_iter().next() {
            Some(s) => s,
            None => match self
                .mgr
                .create_snapshot(pb::CreateSnapshotRequest {
                    volume: Some(Self::vref(source)),
                    name: name.clone(),
                })
                .await
            {
                Ok(s) => {
                    tracing::info!(snapshot = %id, name = %req.name, "CSI snapshot requested");
                    pb::Snapshot {
                        volume_name: source.to_string(),
                        ..s
                    }
                }
                // A concurrent or retried request of the same name.
                Err(e) if e.code() == MgrCode::AlreadyExists => {
                    self.find_snapshot(&id).await?.ok_or_else(gone)?
                }
                Err(e) => return Err(manager_status("take the snapshot", &e)),
            },
        };
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        while is_state(&snap, pb::SnapshotState::SnapshotCreating) && Instant::now() < deadline {
            tokio::time::sleep(SNAPSHOT_POLL).await;
            snap = self.find_snapshot(&id).await?.ok_or_else(gone)?;
        }
        match pb::SnapshotState::try_from(snap.state) {
            Ok(pb::SnapshotState::SnapshotFailed) => {
                // Gone, the retry the sidecar makes takes a new one.
                let deleted = self.mgr.delete_snapshot(Self::snapshot_ref(snap.id)).await;
                if let Err(e) = deleted {
                    tracing::warn!(snapshot = %id, error = %e, "could not delete a failed snapshot");
                }
                Err(Status::internal(format!(
                    "snapshot {id} failed: {}",
                    snap.error
                )))
            }
            Ok(pb::SnapshotState::SnapshotDeleting) => Err(Status::aborted(format!(
                "snapshot {id} of the same name is still being deleted; retry"
            ))),
            _ => Ok(Response::new(CreateSnapshotResponse {
                snapshot: Some(csi_snapshot(&snap)),
            })),
        }
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(invalid("DeleteSnapshot needs a snapshot id"));
        }
        let snap = self.find_snapshot(&id).await?;
        let Some(snap) = snap.filter(|s| !is_state(s, pb::SnapshotState::SnapshotDeleting)) else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        let deleted = self.mgr.delete_snapshot(Self::snapshot_ref(snap.id)).await;
        match deleted {
            Ok(_) => tracing::info!(snapshot = %id, "CSI snapshot deleted"),
            Err(e) if e.code() == MgrCode::NotFound => {}
            // FAILED_PRECONDITION (clones still copy from it) carries over.
            Err(e) => return Err(manager_status("delete the snapshot", &e)),
        }
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let source = req.source_volume_id.as_str();
        let mut snaps = if !req.snapshot_id.is_empty() {
            let found = self.find_snapshot(&req.snapshot_id).await?;
            found
                .into_iter()
                .filter(|s| source.is_empty() || s.volume_name == source)
                .collect()
        } else if !source.is_empty() {
            match volume::valid_volume_id(source) {
                true => self.snapshots(Some(source)).await?,
                false => Vec::new(),
            }
        } else {
            self.snapshots(None).await?
        };
        snaps.retain(|s| {
            !s.internal
                && (is_state(s, pb::SnapshotState::SnapshotReady)
                    || is_state(s, pb::SnapshotState::SnapshotCreating))
        });
        let (snaps, next_token) = page(
            snaps,
            |s| volume::snapshot_id(&s.volume_name, &s.name),
            req.max_entries,
            &req.starting_token,
        )?;
        let entries = snaps
            .iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(csi_snapshot(s)),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
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
    fn pages_follow_the_token() {
        let items = vec!["c", "a", "d", "b"];
        let key = |s: &&str| s.to_string();
        let (p, t) = page(items.clone(), key, 3, "").unwrap();
        assert_eq!((p, t.as_str()), (vec!["a", "b", "c"], "after:c"));
        let (p, t) = page(items.clone(), key, 3, &t).unwrap();
        assert_eq!((p, t.as_str()), (vec!["d"], ""));
        let (p, t) = page(items.clone(), key, 0, "").unwrap();
        assert_eq!((p.len(), t.as_str()), (4, ""));
        let (p, t) = page(items.clone(), key, 4, "").unwrap();
        assert_eq!((p.len(), t.as_str()), (4, ""));
        let e = page(items.clone(), key, 1, "bogus").unwrap_err();
        assert_eq!(e.code(), tonic011::Code::Aborted);
        let e = page(items, key, -1, "").unwrap_err();
        assert_eq!(e.code(), tonic011::Code::InvalidArgument);
    }

    #[test]
    fn clone_sources_match_by_name() {
        let src = CloneSource {
            volume: "v".into(),
            snapshot: Some("s".into()),
        };
        let mut v = pb::Volume::default();
        assert!(src.made(&v), "a fully copied clone has no source left");
        v.source = Some(pb::VolumeSource {
            volume_name: "v".into(),
            snapshot_name: "s".into(),
            ..Default::default()
        });
        assert!(src.made(&v));
        v.source.as_mut().unwrap().snapshot_name = "t".into();
        assert!(!src.made(&v));
        let whole = CloneSource {
            volume: "v".into(),
            snapshot: None,
        };
        assert!(whole.made(&v));
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
