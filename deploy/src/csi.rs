//! The CSI driver: CSIDriver object, controller Deployment with the Kubernetes sidecars and
//! their RBAC, node DaemonSet with node-driver-registrar, StorageClass, VolumeSnapshotClass.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, DeploymentStrategy,
    RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, EmptyDirVolumeSource, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, SecurityContext, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIDriverSpec, StorageClass};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::daemons::{everywhere, headless, pdb, quiet_account, rolling_daemonset, Budget};
use crate::pod::{
    self, cluster_meta, env_field, ironsan_container, meta, mount, port, selector, selector_labels,
};
use crate::{ports, Object, Options, VolumeSnapshotClass, DRIVER_NAME};

pub const CONTROLLER: &str = "ironsan-csi-controller";
pub const NODE: &str = "ironsan-csi-node";
/// The socket inside the pods (an emptyDir in the controller, the plugin's kubelet directory
/// on the node).
const SOCKET_DIR: &str = "/csi";
const SOCKET: &str = "/csi/csi.sock";

/// The Kubernetes CSI sidecars, pinned: name, image, tag.
pub const PROVISIONER: (&str, &str) = ("csi-provisioner", "v6.3.0");
pub const ATTACHER: (&str, &str) = ("csi-attacher", "v4.12.0");
pub const RESIZER: (&str, &str) = ("csi-resizer", "v2.2.1");
pub const SNAPSHOTTER: (&str, &str) = ("csi-snapshotter", "v8.6.0");
pub const REGISTRAR: (&str, &str) = ("csi-node-driver-registrar", "v2.17.0");
pub const LIVENESS: (&str, &str) = ("livenessprobe", "v2.19.0");

pub fn driver() -> Object {
    Object::CsiDriver(CSIDriver {
        metadata: cluster_meta(DRIVER_NAME, "csi"),
        spec: CSIDriverSpec {
            // ControllerPublishVolume attaches the volume to the node's gateway.
            attach_required: Some(true),
            pod_info_on_mount: Some(true),
            fs_group_policy: Some("File".into()),
            volume_lifecycle_modes: Some(vec!["Persistent".into()]),
            requires_republish: Some(false),
            storage_capacity: Some(false),
            ..Default::default()
        },
    })
}

/// A sidecar container on the CSI socket.
fn sidecar(opts: &Options, (image, tag): (&str, &str), name: &str, args: &[String]) -> Container {
    let mut all = vec![format!("--csi-address={SOCKET}")];
    all.extend(args.iter().cloned());
    Container {
        name: name.into(),
        image: Some(format!("{}/{image}:{tag}", opts.sidecar_registry)),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(all),
        volume_mounts: Some(vec![mount("socket-dir", SOCKET_DIR)]),
        resources: Some(pod::resources("10m", "32Mi", "200m", "256Mi")),
        security_context: Some(pod::locked_down()),
        ..Default::default()
    }
}

/// A controller sidecar: leader-elected, with its diagnostics endpoint as its probes.
fn controller_sidecar(
    opts: &Options,
    which: (&str, &str),
    name: &str,
    http: u16,
    extra: &[&str],
) -> Container {
    let mut args = vec![
        "--leader-election".to_string(),
        format!("--http-endpoint=:{http}"),
        "--timeout=60s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut c = sidecar(opts, which, name, &args);
    c.ports = Some(vec![port("http", http)]);
    c.liveness_probe = Some(pod::http_probe("/healthz/leader-election", "http", 20, 3));
    c.readiness_probe = Some(pod::tcp_probe("http"));
    c
}

/// The livenessprobe sidecar: its `/healthz` calls the driver's Probe, which is what the
/// driver container's liveness probe asks.
fn liveness_sidecar(opts: &Options, health: u16) -> Container {
    let mut c = sidecar(
        opts,
        LIVENESS,
        "liveness-probe",
        &[
            format!("--http-endpoint=:{health}"),
            "--probe-timeout=3s".into(),
        ],
    );
    c.ports = Some(vec![port("healthz", health)]);
    c.liveness_probe = Some(pod::tcp_probe("healthz"));
    c.readiness_probe = Some(pod::tcp_probe("healthz"));
    c
}

/// The driver container: liveness through the livenessprobe sidecar's port, readiness from
/// its own `/readyz`.
fn driver_probes(c: &mut Container, health: u16) {
    // A named port resolves among the container's own ports only, hence the number.
    let mut live = pod::http_probe("/healthz", "healthz", 10, 5);
    if let Some(get) = live.http_get.as_mut() {
        get.port = IntOrString::Int(i32::from(health));
    }
    live.initial_delay_seconds = Some(10);
    c.liveness_probe = Some(live);
    c.readiness_probe = Some(pod::http_probe("/readyz", "metrics", 5, 2));
}

pub fn controller(opts: &Options) -> Vec<Object> {
    let component = "csi-controller";
    let mut driver = ironsan_container(
        "ironsan-csi",
        opts,
        vec![
            "csi".into(),
            "--mode".into(),
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{SOCKET}"),
            "--manager".into(),
            pod::manager_addrs(opts),
            "--metrics".into(),
            format!("0.0.0.0:{}", ports::CSI_METRICS),
        ],
    );
    driver.ports = Some(vec![port("metrics", ports::CSI_METRICS)]);
    driver_probes(&mut driver, ports::CSI_HEALTH_CONTROLLER);
    driver.resources = Some(pod::resources("10m", "32Mi", "500m", "256Mi"));
    driver.security_context = Some(pod::locked_down());
    driver.volume_mounts = Some(vec![mount("socket-dir", SOCKET_DIR)]);

    let mut containers = vec![
        driver,
        controller_sidecar(
            opts,
            PROVISIONER,
            "csi-provisioner",
            ports::PROVISIONER,
            // No Topology gate: a volume is reachable from every node with a gateway, and
            // per-node segments in a PV's affinity would pin it to the nodes of the day.
            &[
                "--extra-create-metadata",
                &format!("--default-fstype={}", opts.fs_type),
            ],
        ),
        controller_sidecar(opts, ATTACHER, "csi-attacher", ports::ATTACHER, &[]),
        controller_sidecar(
            opts,
            RESIZER,
            "csi-resizer",
            ports::RESIZER,
            // Filesystems grow online, while pods use them.
            &["--handle-volume-inuse-error=false"],
        ),
    ];
    if opts.snapshots {
        containers.push(controller_sidecar(
            opts,
            SNAPSHOTTER,
            "csi-snapshotter",
            ports::SNAPSHOTTER,
            &["--extra-create-metadata"],
        ));
    }
    containers.push(liveness_sidecar(opts, ports::CSI_HEALTH_CONTROLLER));

    let deployment = Deployment {
        metadata: meta(CONTROLLER, opts, component),
        spec: Some(DeploymentSpec {
            replicas: Some(opts.csi_controllers as i32),
            selector: selector(selector_labels(component)),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: pod::template(
                pod::labels(component),
                PodSpec {
                    service_account_name: Some(CONTROLLER.into()),
                    security_context: Some(pod::non_root_pod()),
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(PodAntiAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(vec![
                                WeightedPodAffinityTerm {
                                    weight: 100,
                                    pod_affinity_term: PodAffinityTerm {
                                        label_selector: Some(selector(selector_labels(component))),
                                        topology_key: "kubernetes.io/hostname".into(),
                                        ..Default::default()
                                    },
                                },
                            ]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers,
                    volumes: Some(vec![Volume {
                        name: "socket-dir".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = vec![Object::ServiceAccount(
        k8s_openapi::api::core::v1::ServiceAccount {
            metadata: meta(CONTROLLER, opts, component),
            ..Default::default()
        },
    )];
    out.extend(controller_rbac(opts, component));
    out.push(headless(
        CONTROLLER,
        opts,
        component,
        &[("metrics", ports::CSI_METRICS)],
    ));
    out.push(Object::Deployment(deployment));
    out.push(pdb(CONTROLLER, opts, component, Budget::MaxUnavailable(1)));
    out
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// What the controller's sidecars call, and no more (their upstream RBAC, merged; the
/// driver itself never calls the API server).
fn controller_rbac(opts: &Options, component: &str) -> Vec<Object> {
    const READ: &[&str] = &["get", "list", "watch"];
    let mut rules = vec![
        rule(
            "",
            &["persistentvolumes"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(
            "",
            &["persistentvolumeclaims"],
            &["get", "list", "watch", "update"],
        ),
        rule("", &["persistentvolumeclaims/status"], &["patch"]),
        rule("", &["pods", "nodes"], READ),
        rule(
            "",
            &["events"],
            &["list", "watch", "create", "update", "patch"],
        ),
        rule(
            "storage.k8s.io",
            &["storageclasses", "csinodes", "volumeattributesclasses"],
            READ,
        ),
        rule(
            "storage.k8s.io",
            &["volumeattachments"],
            &["get", "list", "watch", "patch"],
        ),
        rule("storage.k8s.io", &["volumeattachments/status"], &["patch"]),
        rule(
            "snapshot.storage.k8s.io",
            &["volumesnapshots"],
            &["get", "list", "watch", "update"],
        ),
    ];
    if opts.snapshots {
        rules.extend([
            rule("snapshot.storage.k8s.io", &["volumesnapshotclasses"], READ),
            rule(
                "snapshot.storage.k8s.io",
                &["volumesnapshotcontents"],
                &["get", "list", "watch", "update", "patch"],
            ),
            rule(
                "snapshot.storage.k8s.io",
                &["volumesnapshotcontents/status"],
                &["update", "patch"],
            ),
        ]);
    } else {
        // The provisioner reads snapshot contents to restore from them.
        rules.push(rule(
            "snapshot.storage.k8s.io",
            &["volumesnapshotcontents"],
            &["get", "list"],
        ));
    }
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: CONTROLLER.into(),
        namespace: Some(opts.namespace.clone()),
        ..Default::default()
    };
    // ClusterRoles are cluster-wide: name them for the namespace so that two installations
    // do not overwrite each other's.
    let cluster_name = format!("{CONTROLLER}-{}", opts.namespace);
    vec![
        Object::ClusterRole(ClusterRole {
            metadata: cluster_meta(&cluster_name, component),
            rules: Some(rules),
            ..Default::default()
        }),
        Object::ClusterRoleBinding(ClusterRoleBinding {
            metadata: cluster_meta(&cluster_name, component),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: cluster_name.clone(),
            },
            subjects: Some(vec![subject.clone()]),
        }),
        // Leader election of the sidecars, in the driver's namespace only.
        Object::Role(Role {
            metadata: meta(CONTROLLER, opts, component),
            rules: Some(vec![rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "watch", "list", "delete", "update", "create"],
            )]),
        }),
        Object::RoleBinding(RoleBinding {
            metadata: meta(CONTROLLER, opts, component),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: CONTROLLER.into(),
            },
            subjects: Some(vec![subject]),
        }),
    ]
}

pub fn node(opts: &Options) -> Vec<Object> {
    let component = "csi-node";
    let kubelet = opts.kubelet_dir.trim_end_matches('/');
    let plugin_dir = format!("{kubelet}/plugins/{DRIVER_NAME}");
    let mut driver = ironsan_container(
        "ironsan-csi",
        opts,
        vec![
            "csi".into(),
            "--mode".into(),
            "node".into(),
            "--endpoint".into(),
            format!("unix://{SOCKET}"),
            "--node-id".into(),
            "$(NODE_NAME)".into(),
            // The gateway of this node, on the host network like the plugin.
            "--portal".into(),
            format!("127.0.0.1:{}", opts.iscsi_port),
            "--state-dir".into(),
            "/var/lib/ironsan-csi".into(),
            "--metrics".into(),
            format!("0.0.0.0:{}", ports::CSI_METRICS),
        ],
    );
    driver.env = Some(vec![env_field("NODE_NAME", "spec.nodeName")]);
    driver.ports = Some(vec![pod::host_port("metrics", ports::CSI_METRICS)]);
    driver_probes(&mut driver, ports::CSI_HEALTH_NODE);
    driver.resources = Some(pod::resources("10m", "64Mi", "1", "512Mi"));
    // Mounting, formatting and logging in to iSCSI targets take the host's privileges.
    driver.security_context = Some(SecurityContext {
        privileged: Some(true),
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        ..Default::default()
    });
    let bidirectional = |name: &str, path: &str| VolumeMount {
        mount_propagation: Some("Bidirectional".into()),
        ..mount(name, path)
    };
    driver.volume_mounts = Some(vec![
        mount("socket-dir", SOCKET_DIR),
        bidirectional("kubelet-dir", kubelet),
        mount("dev", "/dev"),
        mount("sys", "/sys"),
        mount("iscsi-config", "/etc/iscsi"),
        mount("iscsi-lib", "/var/lib/iscsi"),
        mount("iscsi-lock", "/run/lock/iscsi"),
        VolumeMount {
            read_only: Some(true),
            ..mount("modules", "/lib/modules")
        },
        mount("state", "/var/lib/ironsan-csi"),
    ]);

    let mut registrar = sidecar(
        opts,
        REGISTRAR,
        "node-driver-registrar",
        &[
            format!("--kubelet-registration-path={plugin_dir}/csi.sock"),
            format!("--http-endpoint=:{}", ports::REGISTRAR),
        ],
    );
    registrar.ports = Some(vec![pod::host_port("http", ports::REGISTRAR)]);
    registrar.liveness_probe = Some(pod::http_probe("/healthz", "http", 10, 3));
    registrar.readiness_probe = Some(pod::tcp_probe("http"));
    registrar
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(mount("registration-dir", "/registration"));
    let mut liveness = liveness_sidecar(opts, ports::CSI_HEALTH_NODE);
    liveness.ports = Some(vec![pod::host_port("healthz", ports::CSI_HEALTH_NODE)]);

    let volumes = vec![
        pod::host_path("socket-dir", &plugin_dir, "DirectoryOrCreate"),
        pod::host_path("kubelet-dir", kubelet, "Directory"),
        pod::host_path(
            "registration-dir",
            &format!("{kubelet}/plugins_registry"),
            "Directory",
        ),
        pod::host_path("dev", "/dev", "Directory"),
        pod::host_path("sys", "/sys", "Directory"),
        // The host's open-iscsi: its iscsid does the sessions, its records and initiator
        // name are the node's.
        pod::host_path("iscsi-config", "/etc/iscsi", "Directory"),
        pod::host_path("iscsi-lib", "/var/lib/iscsi", "DirectoryOrCreate"),
        pod::host_path("iscsi-lock", "/run/lock/iscsi", "DirectoryOrCreate"),
        pod::host_path("modules", "/lib/modules", "Directory"),
        pod::host_path("state", "/var/lib/ironsan-csi", "DirectoryOrCreate"),
    ];
    let set = DaemonSet {
        metadata: meta(NODE, opts, component),
        spec: Some(DaemonSetSpec {
            selector: selector(selector_labels(component)),
            update_strategy: Some(rolling_daemonset()),
            template: pod::template(
                pod::labels(component),
                PodSpec {
                    service_account_name: Some(NODE.into()),
                    automount_service_account_token: Some(false),
                    // iscsiadm reaches the host's iscsid on an abstract socket, which lives
                    // in the host's network namespace.
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    // The sidecars use the driver's root-owned socket and write kubelet's
                    // registration directory.
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(0),
                        run_as_non_root: Some(false),
                        ..Default::default()
                    }),
                    termination_grace_period_seconds: Some(30),
                    tolerations: Some(everywhere()),
                    containers: vec![driver, registrar, liveness],
                    volumes: Some(volumes),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        quiet_account(NODE, opts, component),
        headless(NODE, opts, component, &[("metrics", ports::CSI_METRICS)]),
        Object::DaemonSet(set),
    ]
}

pub fn classes(opts: &Options) -> Vec<Object> {
    let mut m = cluster_meta(&opts.storage_class, "csi");
    if opts.default_storage_class {
        m.annotations = Some(BTreeMap::from([(
            "storageclass.kubernetes.io/is-default-class".into(),
            "true".into(),
        )]));
    }
    let class = StorageClass {
        metadata: m,
        provisioner: DRIVER_NAME.into(),
        parameters: Some(BTreeMap::from([
            ("replicas".into(), opts.replicas.to_string()),
            ("fsType".into(), opts.fs_type.clone()),
            // Also Kubernetes' own key, so that kubelet knows the filesystem it mounts.
            ("csi.storage.k8s.io/fstype".into(), opts.fs_type.clone()),
        ])),
        reclaim_policy: Some("Delete".into()),
        allow_volume_expansion: Some(true),
        // Wait for the pod, so that the volume is made once its node is known.
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        ..Default::default()
    };
    let mut out = vec![Object::StorageClass(class)];
    if opts.snapshots {
        out.push(Object::VolumeSnapshotClass(VolumeSnapshotClass {
            api_version: "snapshot.storage.k8s.io/v1",
            kind: "VolumeSnapshotClass",
            metadata: cluster_meta(&opts.storage_class, "csi"),
            driver: DRIVER_NAME.into(),
            deletion_policy: "Delete".into(),
            parameters: BTreeMap::new(),
        }));
    }
    out
}
