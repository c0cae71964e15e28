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

#[cfg(test)]
mod tests {
    use clap::Parser;
    use ironsan_deploy::{render, Object, Options};
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pods(b: &ironsan_deploy::Bundle) -> Vec<(String, &PodSpec)> {
        b.objects()
            .filter_map(|o| {
                let t = match o {
                    Object::StatefulSet(s) => &s.spec.as_ref()?.template,
                    Object::DaemonSet(d) => &d.spec.as_ref()?.template,
                    Object::Deployment(d) => &d.spec.as_ref()?.template,
                    _ => return None,
                };
                Some((o.id().2.to_string(), t.spec.as_ref()?))
            })
            .collect()
    }

    /// The `ironsan` containers of every rendering, with `$(VAR)`s as Kubernetes would fill
    /// them in.
    fn ironsan_containers() -> Vec<(String, Container)> {
        let zoned = Options {
            managers: 5,
            storage: 6,
            zones: vec!["a".into(), "b".into(), "c".into()],
            ..Options::default()
        };
        let host = Options {
            storage_host_path: Some("/srv/ironsan".into()),
            ..Options::default()
        };
        let mut out = Vec::new();
        for o in [Options::default(), zoned, host] {
            let b = render(&o).unwrap();
            for (name, spec) in pods(&b) {
                for c in &spec.containers {
                    if c.image.as_deref() != Some(o.image.as_str()) {
                        continue;
                    }
                    let mut c = c.clone();
                    for a in c.args.iter_mut().flatten() {
                        *a = a
                            .replace("$(POD_NAME)", &format!("{name}-0"))
                            .replace("$(POD_NAMESPACE)", &o.namespace)
                            .replace("$(NODE_NAME)", "node-1")
                            .replace("$(HOST_IP)", "10.0.0.7");
                    }
                    out.push((name.clone(), c));
                }
            }
        }
        assert!(out.len() >= 3 * 5, "{}", out.len());
        out
    }

    /// Every `ironsan` container's arguments parse with the binary's own parser: a renamed
    /// flag, a bad value or a missing required flag fails here, not in a crash-looping pod.
    #[test]
    fn manifest_args_parse() {
        for (name, c) in ironsan_containers() {
            let args = c.args.clone().unwrap_or_default();
            let argv = std::iter::once("ironsan".to_string()).chain(args.iter().cloned());
            if let Err(e) = crate::Cli::try_parse_from(argv) {
                panic!("{name} {}: {args:?} do not parse:\n{e}", c.name);
            }
        }
    }

    /// The addresses the daemons bind are the ports the containers declare (which Services
    /// and probes use).
    #[test]
    fn bound_ports_are_declared() {
        for (name, c) in ironsan_containers() {
            let args = c.args.clone().unwrap_or_default();
            let declared: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
            // The CSI node plugin's --portal is the gateway it connects to, not a bind.
            let binds: &[&str] = match args.first().map(String::as_str) {
                Some("csi") => &["--metrics"],
                _ => &["--listen", "--metrics", "--portal"],
            };
            let mut bound = Vec::new();
            for w in args.windows(2) {
                if binds.contains(&w[0].as_str()) {
                    let port: i32 = w[1].rsplit_once(':').unwrap().1.parse().unwrap();
                    assert!(
                        declared.contains(&port),
                        "{name} {} binds {} {} but declares {declared:?}",
                        c.name,
                        w[0],
                        w[1]
                    );
                    bound.push(port);
                }
            }
            bound.sort_unstable();
            let mut declared = declared;
            declared.sort_unstable();
            assert_eq!(
                bound, declared,
                "{name} {}: a declared port nothing binds",
                c.name
            );
        }
    }
}
