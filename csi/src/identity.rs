//! The CSI Identity service: who the plugin is, what it offers, and whether it is ready.

use std::time::Duration;

use ironsan_common::manager_client::ManagerClient;
use ironsan_common::proto::manager::StatusRequest;
use tonic011::{Request, Response, Status};

use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::DRIVER_NAME;

/// A probe waits this long for the manager: kubelet's liveness probe gives the call a few
/// seconds, and a manager that slow is as good as absent.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

pub struct IdentityService {
    manager: Option<ManagerClient>,
}

impl IdentityService {
    /// `manager`: probed by Probe; without one (a node plugin run without `--manager`) the
    /// plugin is ready as soon as it serves.
    pub fn new(manager: Option<ManagerClient>) -> Self {
        let manager = manager.map(|m| m.with_deadline(PROBE_DEADLINE));
        IdentityService { manager }
    }
}

/// The rule of Probe, shared with the plugin's `/readyz`: the manager answers `Status` within
/// [`PROBE_DEADLINE`].
pub async fn manager_answers(mgr: &ManagerClient) -> Result<(), String> {
    mgr.clone()
        .with_deadline(PROBE_DEADLINE)
        .status(StatusRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("the IronSAN manager does not answer: {e}"))
}

fn capability(t: plugin_capability::Type) -> PluginCapability {
    PluginCapability { r#type: Some(t) }
}

#[tonic011::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| {
            capability(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            ))
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                capability(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            ],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if let Some(mgr) = &self.manager {
            if let Err(e) = manager_answers(mgr).await {
                tracing::warn!(error = %e, "probe: the manager does not answer");
                return Err(Status::failed_precondition(e));
            }
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
