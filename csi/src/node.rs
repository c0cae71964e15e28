//! The CSI Node service (being written).

use std::path::PathBuf;

use ironsan_common::manager_client::ManagerClient;
use tonic011::{Request, Response, Status};

use crate::csi::node_server::Node;
use crate::csi::*;
use crate::CsiError;

/// The node plugin's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id: the Kubernetes node name, and the id of the gateway running here.
    pub node_id: String,
    /// The node's zone, reported as topology when set.
    pub zone: Option<String>,
    /// The portal of the gateway on this node.
    pub portal: String,
    /// Where per-volume staging records are kept across restarts.
    pub state_dir: PathBuf,
    /// Reported as max_volumes_per_node (0: no limit).
    pub max_volumes: i64,
}

pub struct NodeService {
    cfg: NodeConfig,
}

impl NodeService {
    pub async fn new(cfg: NodeConfig, _manager: Option<ManagerClient>) -> Result<Self, CsiError> {
        Ok(NodeService { cfg })
    }
}

#[tonic011::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_publish_volume(
        &self,
        _: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_unpublish_volume(
        &self,
        _: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Err(Status::unimplemented("node"))
    }
    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let _ = &self.cfg;
        Err(Status::unimplemented("node"))
    }
}
