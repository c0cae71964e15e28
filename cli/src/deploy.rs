//! `ironsan deploy manifests`: the Kubernetes installation, rendered from a values file and
//! flags (see `ironsan-deploy`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ironsan_deploy::Options;

#[derive(Subcommand)]
pub(crate) enum DeployCmd {
    /// Print the Kubernetes manifests (or write them, with a kustomization, to a directory):
    /// `ironsan deploy manifests | kubectl apply -f -`.
    Manifests(ManifestArgs),
}

#[derive(Args)]
pub(crate) struct ManifestArgs {
    /// Values file (YAML, camelCase keys as in deploy/README.md); flags override it.
    #[arg(long, short = 'f')]
    values: Option<PathBuf>,
    /// Write one file per component and kustomization.yaml into DIR instead of printing.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Namespace of the installation.
    #[arg(long)]
    namespace: Option<String>,
    /// The ironsan image (built from deploy/Dockerfile).
    #[arg(long)]
    image: Option<String>,
    /// Manager members (odd, 1-7).
    #[arg(long)]
    managers: Option<u32>,
    /// Storage pods (spread over the zones).
    #[arg(long)]
    storage: Option<u32>,
    /// Disks (local PersistentVolumes) per storage pod.
    #[arg(long)]
    storage_disks: Option<u32>,
    /// StorageClass of the local PersistentVolumes that back the storage pods.
    #[arg(long)]
    storage_disk_class: Option<String>,
    /// Run storage as a DaemonSet on this host directory of the labelled nodes.
    #[arg(long)]
    storage_host_path: Option<String>,
    /// Name of the StorageClass (and VolumeSnapshotClass) offered to users.
    #[arg(long)]
    storage_class: Option<String>,
    /// Failure domains (topology.kubernetes.io/zone values), comma-separated.
    #[arg(long, value_delimiter = ',')]
    zones: Option<Vec<String>>,
    /// Replicas of a volume made through the StorageClass.
    #[arg(long)]
    replicas: Option<u32>,
    /// Filesystem of volumes made through the StorageClass (ext4, xfs).
    #[arg(long)]
    fs_type: Option<String>,
    /// Leave out the csi-snapshotter sidecar and the VolumeSnapshotClass (clusters without the
    /// snapshot CRDs).
    #[arg(long)]
    no_snapshots: bool,
}

impl ManifestArgs {
    /// The values file, then every flag given over it.
    fn options(&self) -> anyhow::Result<Options> {
        let mut o = match &self.values {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
                Options::from_yaml(&text).with_context(|| p.display().to_string())?
            }
            None => Options::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    o.$field = v.clone().into();
                }
            )*};
        }
        over!(
            namespace,
            image,
            managers,
            storage,
            storage_disks,
            storage_disk_class,
            storage_host_path,
            storage_class,
            zones,
            replicas,
            fs_type
        );
        if self.no_snapshots {
            o.snapshots = false;
        }
        Ok(o)
    }
}

pub(crate) fn run(cmd: DeployCmd) -> anyhow::Result<()> {
    match cmd {
        DeployCmd::Manifests(a) => {
            let bundle = ironsan_deploy::render(&a.options()?)?;
            match &a.output_dir {
                Some(dir) => {
                    bundle.write_dir(dir)?;
                    eprintln!(
                        "wrote {} files and kustomization.yaml to {}: kubectl apply -k {}",
                        bundle.files.len(),
                        dir.display(),
                        dir.display()
                    );
                }
                None => print!("{}", bundle.to_yaml()?),
            }
            Ok(())
        }
    }
}
