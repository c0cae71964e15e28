//! IronSAN on Kubernetes: the manifests, rendered from typed objects (`k8s-openapi`).
//!
//! [`render`] turns [`Options`] into a [`Bundle`] of files, one per component, the way
//! `ironsan deploy manifests` prints or writes them; `deploy/kubernetes/` holds the default
//! rendering for `kubectl apply -k`. Typed objects rule out misspelled fields at compile time;
//! what the types cannot check (selectors matching labels, mounts naming volumes, ports and
//! flags agreeing with the binary, RBAC covering the sidecars' calls) is tested over the
//! rendered objects.

mod csi;
mod daemons;
mod error;
mod object;
mod options;
mod pod;

pub use error::DeployError;
pub use object::{Object, VolumeSnapshotClass};
pub use options::Options;

/// Ports and paths the manifests and the daemons must agree on.
pub mod ports {
    /// Manager gRPC (clients and Raft peers).
    pub const MANAGER: u16 = 7400;
    pub const MANAGER_METRICS: u16 = 9401;
    /// Storage data path.
    pub const STORAGE: u16 = 7500;
    pub const STORAGE_METRICS: u16 = 9402;
    /// The gateway's metrics port on the node (host network).
    pub const GATEWAY_METRICS: u16 = 9403;
    /// The CSI driver's metrics (controller pod, and the node plugin on the host network).
    pub const CSI_METRICS: u16 = 9404;
    /// livenessprobe sidecars: the controller's, and the node plugin's on the host network
    /// (not the usual 9808, which other drivers' node plugins take).
    pub const CSI_HEALTH_CONTROLLER: u16 = 9808;
    pub const CSI_HEALTH_NODE: u16 = 9809;
    /// The sidecars' diagnostics endpoints (`--http-endpoint`).
    pub const REGISTRAR: u16 = 9810;
    pub const PROVISIONER: u16 = 9811;
    pub const ATTACHER: u16 = 9812;
    pub const RESIZER: u16 = 9813;
    pub const SNAPSHOTTER: u16 = 9814;
}

/// The CSI driver's name (see `ironsan_csi::DRIVER_NAME`).
pub const DRIVER_NAME: &str = "csi.ironsan.io";

/// One output file: a name and its objects, in apply order.
#[derive(Clone, Debug)]
pub struct File {
    pub name: &'static str,
    pub objects: Vec<Object>,
}

/// Every object of an installation, grouped in files.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub files: Vec<File>,
}

/// Renders the whole installation.
pub fn render(opts: &Options) -> Result<Bundle, DeployError> {
    opts.validate()?;
    let mut files = vec![
        File {
            name: "namespace.yaml",
            objects: vec![daemons::namespace(opts)],
        },
        File {
            name: "manager.yaml",
            objects: daemons::manager(opts),
        },
        File {
            name: "storage.yaml",
            objects: daemons::storage(opts)?,
        },
        File {
            name: "gateway.yaml",
            objects: daemons::gateway(opts),
        },
        File {
            name: "csi-driver.yaml",
            objects: vec![csi::driver()],
        },
        File {
            name: "csi-controller.yaml",
            objects: csi::controller(opts),
        },
        File {
            name: "csi-node.yaml",
            objects: csi::node(opts),
        },
        File {
            name: "storage-class.yaml",
            objects: csi::classes(opts),
        },
    ];
    files.retain(|f| !f.objects.is_empty());
    Ok(Bundle { files })
}

const HEADER: &str =
    "# Rendered by `ironsan deploy manifests`: change its options, not this file.\n";

impl Bundle {
    /// Every object, in apply order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.files.iter().flat_map(|f| f.objects.iter())
    }

    /// One file's YAML: a header naming the command, then the documents.
    pub fn file_yaml(&self, file: &File) -> Result<String, DeployError> {
        let mut out = HEADER.to_string();
        for o in &file.objects {
            out.push_str("---\n");
            out.push_str(&o.to_yaml()?);
        }
        Ok(out)
    }

    /// The whole installation as one YAML stream (for `kubectl apply -f -`).
    pub fn to_yaml(&self) -> Result<String, DeployError> {
        let mut out = HEADER.to_string();
        for f in &self.files {
            for o in &f.objects {
                out.push_str("---\n");
                out.push_str(&o.to_yaml()?);
            }
        }
        Ok(out)
    }

    /// The kustomization that lists the files, so that `kubectl apply -k DIR` installs them.
    pub fn kustomization(&self) -> String {
        let mut out = format!(
            "{HEADER}apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        );
        for f in &self.files {
            out.push_str("- ");
            out.push_str(f.name);
            out.push('\n');
        }
        out
    }

    /// Writes every file and `kustomization.yaml` into `dir`, replacing earlier renderings.
    pub fn write_dir(&self, dir: &std::path::Path) -> Result<(), DeployError> {
        let io = |e: std::io::Error| DeployError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        for f in &self.files {
            std::fs::write(dir.join(f.name), self.file_yaml(f)?).map_err(io)?;
        }
        std::fs::write(dir.join("kustomization.yaml"), self.kustomization()).map_err(io)
    }
}
