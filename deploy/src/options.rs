//! What an operator may choose about an installation: a values file (YAML, camelCase keys,
//! every key optional) and the `ironsan deploy manifests` flags that override it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::DeployError;

/// Every choice that shapes the manifests. `Options::default()` renders the checked-in set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Options {
    /// Namespace of every namespaced object.
    pub namespace: String,
    /// The `ironsan` image (deploy/Dockerfile).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// Registry of the Kubernetes CSI sidecar images (a mirror for air-gapped clusters).
    pub sidecar_registry: String,
    /// Manager members (Raft voters): an odd number from 1 to 7.
    pub managers: u32,
    /// Size of each manager's Raft volume.
    pub manager_data_size: String,
    /// StorageClass of the managers' Raft volumes (none: the cluster's default class).
    pub manager_data_class: Option<String>,
    /// Storage pods; with zones they are spread over one StatefulSet per zone.
    pub storage: u32,
    /// Disks (local PersistentVolumes) per storage pod.
    pub storage_disks: u32,
    /// Size asked of each disk's claim.
    pub storage_disk_size: String,
    /// StorageClass of the local PersistentVolumes that back the storage pods.
    pub storage_disk_class: String,
    /// Run storage as a DaemonSet on the labelled nodes, on this host directory, instead of
    /// a StatefulSet on local PersistentVolumes.
    pub storage_host_path: Option<String>,
    /// Node label (`KEY=VALUE`) that admits a node to run storage.
    pub storage_node_label: String,
    /// Failure domains (`topology.kubernetes.io/zone` values): storage is pinned per zone and
    /// registers its zone, so replicas land in distinct zones; managers spread across them.
    pub zones: Vec<String>,
    /// Name of the StorageClass (and VolumeSnapshotClass) offered to users.
    pub storage_class: String,
    /// Mark the StorageClass as the cluster's default.
    pub default_storage_class: bool,
    /// Replicas of a volume made through the StorageClass (1-5).
    pub replicas: u32,
    /// Filesystem made on a volume through the StorageClass: `ext4` or `xfs`.
    pub fs_type: String,
    /// Ship the csi-snapshotter sidecar and a VolumeSnapshotClass (needs the snapshot CRDs and
    /// snapshot-controller in the cluster).
    pub snapshots: bool,
    /// Replicas of the CSI controller Deployment (its sidecars elect a leader).
    pub csi_controllers: u32,
    /// iSCSI portal port the gateway opens on every node.
    pub iscsi_port: u16,
    /// The kubelet's root directory on the nodes (some distributions move it).
    pub kubelet_dir: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "ironsan".into(),
            image: format!("docker.io/ironsan/ironsan:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            sidecar_registry: "registry.k8s.io/sig-storage".into(),
            managers: 3,
            manager_data_size: "1Gi".into(),
            manager_data_class: None,
            storage: 3,
            storage_disks: 1,
            storage_disk_size: "100Gi".into(),
            storage_disk_class: "local-storage".into(),
            storage_host_path: None,
            storage_node_label: "ironsan.io/storage=true".into(),
            zones: Vec::new(),
            storage_class: "ironsan".into(),
            default_storage_class: false,
            replicas: 3,
            fs_type: "ext4".into(),
            snapshots: true,
            csi_controllers: 2,
            iscsi_port: 3260,
            kubelet_dir: "/var/lib/kubelet".into(),
        }
    }
}

impl Options {
    /// Reads a values file: YAML with any subset of the keys.
    pub fn from_yaml(text: &str) -> Result<Options, DeployError> {
        if text.trim().is_empty() {
            return Ok(Options::default());
        }
        serde_norway::from_str(text).map_err(|e| DeployError::Values(e.to_string()))
    }

    /// Refuses a combination that would render objects the API server rejects or a cluster
    /// that cannot work; the message names the option.
    pub fn validate(&self) -> Result<(), DeployError> {
        let bad = |what: &str, why: String| Err(DeployError::Option(format!("{what}: {why}")));
        if !is_dns_label(&self.namespace) {
            return bad(
                "namespace",
                format!("{:?} is not a DNS label", self.namespace),
            );
        }
        if self.image.is_empty() || self.image.contains(char::is_whitespace) {
            return bad(
                "image",
                format!("{:?} is not an image reference", self.image),
            );
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return bad(
                "imagePullPolicy",
                format!(
                    "{:?} is not Always, IfNotPresent or Never",
                    self.image_pull_policy
                ),
            );
        }
        if self.sidecar_registry.is_empty() || self.sidecar_registry.contains(char::is_whitespace) {
            return bad(
                "sidecarRegistry",
                format!("{:?} is not a registry", self.sidecar_registry),
            );
        }
        if self.managers == 0 || self.managers > 7 || self.managers.is_multiple_of(2) {
            return bad(
                "managers",
                format!(
                    "{} is not an odd number from 1 to 7 (an even group survives no more \
                     failures than the odd one below it)",
                    self.managers
                ),
            );
        }
        check_quantity("managerDataSize", &self.manager_data_size)?;
        if let Some(c) = &self.manager_data_class {
            check_name("managerDataClass", c)?;
        }
        if self.storage == 0 || self.storage > 1000 {
            return bad(
                "storage",
                format!("{} storage pods (1 to 1000)", self.storage),
            );
        }
        if self.storage_disks == 0 || self.storage_disks > 16 {
            return bad(
                "storageDisks",
                format!("{} disks per pod (1 to 16)", self.storage_disks),
            );
        }
        check_quantity("storageDiskSize", &self.storage_disk_size)?;
        check_name("storageDiskClass", &self.storage_disk_class)?;
        if let Some(p) = &self.storage_host_path {
            check_path("storageHostPath", p)?;
        }
        check_path("kubeletDir", &self.kubelet_dir)?;
        self.storage_node_label()?;
        let mut seen = BTreeSet::new();
        for z in &self.zones {
            // Zone names end up in object names (one storage StatefulSet per zone).
            if !is_dns_label(z) || z.len() > 20 {
                return bad(
                    "zones",
                    format!("{z:?} is not a DNS label of at most 20 characters"),
                );
            }
            if !seen.insert(z) {
                return bad("zones", format!("{z:?} is listed twice"));
            }
        }
        if self.storage_host_path.is_none() && (self.storage as usize) < self.zones.len() {
            return bad(
                "storage",
                format!(
                    "{} storage pods cannot cover {} zones",
                    self.storage,
                    self.zones.len()
                ),
            );
        }
        check_name("storageClass", &self.storage_class)?;
        if !(1..=5).contains(&self.replicas) {
            return bad("replicas", format!("{} (1 to 5)", self.replicas));
        }
        if self.storage_host_path.is_none() && self.replicas > self.storage {
            return bad(
                "replicas",
                format!(
                    "{} replicas need as many storage pods; only {} are asked for",
                    self.replicas, self.storage
                ),
            );
        }
        if !["ext4", "xfs"].contains(&self.fs_type.as_str()) {
            return bad("fsType", format!("{:?} is not ext4 or xfs", self.fs_type));
        }
        if self.csi_controllers == 0 || self.csi_controllers > 5 {
            return bad(
                "csiControllers",
                format!("{} (1 to 5)", self.csi_controllers),
            );
        }
        if self.iscsi_port == 0 {
            return bad("iscsiPort", "0 is not a port".into());
        }
        Ok(())
    }

    /// The storage node label as (key, value).
    pub fn storage_node_label(&self) -> Result<(String, String), DeployError> {
        let (k, v) = self
            .storage_node_label
            .split_once('=')
            .unwrap_or((&self.storage_node_label, ""));
        let key_ok = {
            let name = k.rsplit_once('/').map_or(k, |(prefix, name)| {
                if prefix.is_empty() || !prefix.split('.').all(is_dns_label) {
                    ""
                } else {
                    name
                }
            });
            is_label_value(name) && !name.is_empty()
        };
        if !key_ok || v.is_empty() || !is_label_value(v) {
            return Err(DeployError::Option(format!(
                "storageNodeLabel: {:?} is not KEY=VALUE with a valid label key and value",
                self.storage_node_label
            )));
        }
        Ok((k.to_string(), v.to_string()))
    }
}

/// RFC 1123 label: what namespaces, zones in names and most object names must be.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A label value: 63 characters of alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// A cluster-scoped object name (DNS subdomain).
fn check_name(what: &str, s: &str) -> Result<(), DeployError> {
    if s.len() <= 253 && s.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err(DeployError::Option(format!(
            "{what}: {s:?} is not a valid object name"
        )))
    }
}

fn check_path(what: &str, p: &str) -> Result<(), DeployError> {
    if p.starts_with('/') && p.len() > 1 && !p.contains("..") && !p.contains(char::is_whitespace) {
        Ok(())
    } else {
        Err(DeployError::Option(format!(
            "{what}: {p:?} is not an absolute path"
        )))
    }
}

/// A storage quantity as claims take it: digits with a binary or decimal suffix.
fn check_quantity(what: &str, s: &str) -> Result<(), DeployError> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    let ok = !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"].contains(&suffix);
    if ok {
        Ok(())
    } else {
        Err(DeployError::Option(format!(
            "{what}: {s:?} is not a size such as 100Gi"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(f: impl FnOnce(&mut Options), what: &str) {
        let mut o = Options::default();
        f(&mut o);
        match o.validate() {
            Err(DeployError::Option(m)) => assert!(m.starts_with(what), "{m}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        Options::default().validate().unwrap();
        assert_eq!(Options::from_yaml("").unwrap(), Options::default());
    }

    #[test]
    fn bad_options_are_named() {
        refused(|o| o.namespace = "Iron_SAN".into(), "namespace");
        refused(|o| o.image = "a b".into(), "image");
        refused(
            |o| o.image_pull_policy = "Sometimes".into(),
            "imagePullPolicy",
        );
        refused(|o| o.managers = 4, "managers");
        refused(|o| o.managers = 0, "managers");
        refused(|o| o.managers = 9, "managers");
        refused(|o| o.manager_data_size = "1 GiB".into(), "managerDataSize");
        refused(|o| o.manager_data_size = "0Gi".into(), "managerDataSize");
        refused(|o| o.storage = 0, "storage");
        refused(|o| o.storage_disks = 17, "storageDisks");
        refused(|o| o.storage_disk_size = "lots".into(), "storageDiskSize");
        refused(
            |o| o.storage_disk_class = "Local".into(),
            "storageDiskClass",
        );
        refused(
            |o| o.storage_host_path = Some("data".into()),
            "storageHostPath",
        );
        refused(
            |o| o.storage_node_label = "storage".into(),
            "storageNodeLabel",
        );
        refused(|o| o.storage_node_label = "/x=y".into(), "storageNodeLabel");
        refused(|o| o.zones = vec!["a".into(), "a".into()], "zones");
        refused(|o| o.zones = vec!["Zone A".into()], "zones");
        refused(
            |o| o.zones = vec!["a".into(), "b".into(), "c".into(), "d".into()],
            "storage",
        );
        refused(|o| o.replicas = 6, "replicas");
        refused(|o| o.storage = 2, "replicas");
        refused(|o| o.fs_type = "btrfs".into(), "fsType");
        refused(|o| o.csi_controllers = 0, "csiControllers");
        refused(|o| o.iscsi_port = 0, "iscsiPort");
        refused(|o| o.kubelet_dir = "kubelet".into(), "kubeletDir");
    }

    #[test]
    fn values_files() {
        let o = Options::from_yaml("managers: 5\nzones: [a, b]\nstorageHostPath: /srv/ironsan\n")
            .unwrap();
        assert_eq!(o.managers, 5);
        assert_eq!(o.zones, ["a", "b"]);
        assert_eq!(o.storage_host_path.as_deref(), Some("/srv/ironsan"));
        assert_eq!(o.namespace, "ironsan");
        let e = Options::from_yaml("manegers: 5\n").unwrap_err().to_string();
        assert!(e.contains("manegers"), "{e}");
        assert!(Options::from_yaml("managers: many\n").is_err());
    }

    #[test]
    fn node_label() {
        let o = Options::default();
        assert_eq!(
            o.storage_node_label().unwrap(),
            ("ironsan.io/storage".to_string(), "true".to_string())
        );
    }
}
