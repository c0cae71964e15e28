//! The kinds of object an installation holds, as one enum so that tests can match on them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource;
use serde::Serialize;

use crate::DeployError;

/// One Kubernetes object of the installation.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Service(Service),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    PodDisruptionBudget(PodDisruptionBudget),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    CsiDriver(CSIDriver),
    StorageClass(StorageClass),
    VolumeSnapshotClass(VolumeSnapshotClass),
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshotClass: a CRD of the external-snapshotter
/// project, which `k8s-openapi` does not carry.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ObjectMeta,
    pub driver: String,
    /// `Delete` or `Retain`.
    pub deletion_policy: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

impl Object {
    /// `(kind, namespace, name)`, for messages and lookups.
    pub fn id(&self) -> (&'static str, Option<&str>, &str) {
        fn of<T: Resource>(m: &ObjectMeta) -> (&'static str, Option<&str>, &str) {
            (
                T::KIND,
                m.namespace.as_deref(),
                m.name.as_deref().unwrap_or(""),
            )
        }
        match self {
            Object::Namespace(o) => of::<Namespace>(&o.metadata),
            Object::ServiceAccount(o) => of::<ServiceAccount>(&o.metadata),
            Object::Service(o) => of::<Service>(&o.metadata),
            Object::StatefulSet(o) => of::<StatefulSet>(&o.metadata),
            Object::DaemonSet(o) => of::<DaemonSet>(&o.metadata),
            Object::Deployment(o) => of::<Deployment>(&o.metadata),
            Object::PodDisruptionBudget(o) => of::<PodDisruptionBudget>(&o.metadata),
            Object::ClusterRole(o) => of::<ClusterRole>(&o.metadata),
            Object::ClusterRoleBinding(o) => of::<ClusterRoleBinding>(&o.metadata),
            Object::Role(o) => of::<Role>(&o.metadata),
            Object::RoleBinding(o) => of::<RoleBinding>(&o.metadata),
            Object::CsiDriver(o) => of::<CSIDriver>(&o.metadata),
            Object::StorageClass(o) => of::<StorageClass>(&o.metadata),
            Object::VolumeSnapshotClass(o) => {
                (o.kind, None, o.metadata.name.as_deref().unwrap_or(""))
            }
        }
    }

    /// The object as one YAML document.
    pub fn to_yaml(&self) -> Result<String, DeployError> {
        serde_norway::to_string(self).map_err(|e| {
            let (kind, _, name) = self.id();
            DeployError::Serialize(format!("{kind} {name}: {e}"))
        })
    }
}
