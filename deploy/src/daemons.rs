//! The cluster itself: namespace, manager StatefulSet, storage StatefulSets (or DaemonSet on
//! host paths) and the gateway DaemonSet.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, Namespace, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, Service, ServiceAccount,
    ServicePort, ServiceSpec, Toleration, TopologySpreadConstraint, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pod::{
    self, env_field, ironsan_container, meta, mount, port, selector, selector_labels,
};
use crate::{ports, DeployError, Object, Options};

pub const MANAGER: &str = "ironsan-manager";
pub const STORAGE: &str = "ironsan-storage";
pub const GATEWAY: &str = "ironsan-gateway";
/// Where the image keeps daemon data (volumes mount below it).
const DATA: &str = "/var/lib/ironsan";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const HOST_LABEL: &str = "kubernetes.io/hostname";

pub fn namespace(opts: &Options) -> Object {
    let mut labels = pod::labels("namespace");
    // The gateway and the CSI node plugin use the host network, and the node plugin mounts
    // with Bidirectional propagation: the namespace must admit privileged pods.
    labels.insert(
        "pod-security.kubernetes.io/enforce".into(),
        "privileged".into(),
    );
    Object::Namespace(Namespace {
        metadata: ObjectMeta {
            name: Some(opts.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    })
}

/// A service account for a component that never calls the API server.
pub fn quiet_account(name: &str, opts: &Options, component: &str) -> Object {
    Object::ServiceAccount(ServiceAccount {
        metadata: meta(name, opts, component),
        automount_service_account_token: Some(false),
        ..Default::default()
    })
}

/// A headless Service: stable per-pod DNS names, published before the pods are ready (members
/// must find each other to become ready), and named ports a ServiceMonitor can select.
pub fn headless(name: &str, opts: &Options, component: &str, ports: &[(&str, u16)]) -> Object {
    Object::Service(Service {
        metadata: meta(name, opts, component),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(component)),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some((*n).into()),
                        port: i32::from(*p),
                        target_port: Some(IntOrString::String((*n).into())),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn pdb(name: &str, opts: &Options, component: &str, budget: Budget) -> Object {
    let (min, max) = match budget {
        Budget::MinAvailable(n) => (Some(IntOrString::Int(n)), None),
        Budget::MaxUnavailable(n) => (None, Some(IntOrString::Int(n))),
    };
    Object::PodDisruptionBudget(PodDisruptionBudget {
        metadata: meta(name, opts, component),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: min,
            max_unavailable: max,
            selector: Some(selector(selector_labels(component))),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub enum Budget {
    MinAvailable(i32),
    MaxUnavailable(i32),
}

/// No two pods of `labels` on one node.
fn spread_over_nodes(labels: BTreeMap<String, String>) -> PodAntiAffinity {
    PodAntiAffinity {
        required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
            label_selector: Some(selector(labels)),
            topology_key: HOST_LABEL.into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn claim(name: &str, size: &str, class: Option<&str>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.map(Into::into),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size.into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn rolling_statefulset() -> StatefulSetUpdateStrategy {
    StatefulSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateStatefulSetStrategy {
            partition: Some(0),
            ..Default::default()
        }),
    }
}

/// One pod at a time, never two on a node at once (host ports).
pub fn rolling_daemonset() -> DaemonSetUpdateStrategy {
    DaemonSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDaemonSet {
            max_unavailable: Some(IntOrString::Int(1)),
            max_surge: Some(IntOrString::Int(0)),
        }),
    }
}

/// Every node, tainted or not: a volume can be mounted only where the gateway and the CSI
/// node plugin both run.
pub fn everywhere() -> Vec<Toleration> {
    vec![Toleration {
        operator: Some("Exists".into()),
        ..Default::default()
    }]
}

pub fn manager(opts: &Options) -> Vec<Object> {
    let component = "manager";
    let mut args: Vec<String> = vec![
        "manager".into(),
        "--id-from-hostname".into(),
        "--listen".into(),
        format!("0.0.0.0:{}", ports::MANAGER),
        "--advertise".into(),
        format!(
            "$(POD_NAME).{MANAGER}.$(POD_NAMESPACE).svc:{}",
            ports::MANAGER
        ),
        "--data-dir".into(),
        format!("{DATA}/manager"),
        "--metrics".into(),
        format!("0.0.0.0:{}", ports::MANAGER_METRICS),
    ];
    // Every member gets the same list; each drops its own entry.
    for i in 0..opts.managers {
        args.push("--peer".into());
        args.push(format!("{}={}", i + 1, pod::manager_addr(opts, i)));
    }
    let mut c = ironsan_container(component, opts, args);
    c.env = Some(vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
    ]);
    c.ports = Some(vec![
        port("grpc", ports::MANAGER),
        port("metrics", ports::MANAGER_METRICS),
    ]);
    pod::daemon_probes(&mut c, "metrics");
    c.resources = Some(pod::resources("100m", "128Mi", "1", "512Mi"));
    c.security_context = Some(pod::locked_down());
    c.volume_mounts = Some(vec![mount("data", DATA)]);

    let mut spread = None;
    if !opts.zones.is_empty() {
        // Losing a zone must not cost the quorum: at most one member more in any zone.
        spread = Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE_LABEL.into(),
            when_unsatisfiable: "DoNotSchedule".into(),
            label_selector: Some(selector(selector_labels(component))),
            ..Default::default()
        }]);
    }
    let set = StatefulSet {
        metadata: meta(MANAGER, opts, component),
        spec: Some(StatefulSetSpec {
            replicas: Some(opts.managers as i32),
            service_name: Some(MANAGER.into()),
            // Members only become ready together (a quorum), so they must start together.
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(rolling_statefulset()),
            selector: selector(selector_labels(component)),
            template: pod::template(
                pod::labels(component),
                PodSpec {
                    service_account_name: Some(MANAGER.into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(pod::non_root_pod()),
                    termination_grace_period_seconds: Some(30),
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(spread_over_nodes(selector_labels(component))),
                        ..Default::default()
                    }),
                    topology_spread_constraints: spread,
                    containers: vec![c],
                    ..Default::default()
                },
            ),
            volume_claim_templates: Some(vec![claim(
                "data",
                &opts.manager_data_size,
                opts.manager_data_class.as_deref(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    // A voluntary disruption may take members only while a quorum stays.
    let budget = if opts.managers == 1 {
        Budget::MaxUnavailable(1)
    } else {
        Budget::MinAvailable(opts.managers as i32 / 2 + 1)
    };
    vec![
        quiet_account(MANAGER, opts, component),
        headless(
            MANAGER,
            opts,
            component,
            &[
                ("grpc", ports::MANAGER),
                ("metrics", ports::MANAGER_METRICS),
            ],
        ),
        Object::StatefulSet(set),
        pdb(MANAGER, opts, component, budget),
    ]
}

/// The storage container for data directories `dirs`, advertising `advertise`.
fn storage_container(
    opts: &Options,
    advertise: &str,
    node_id: &str,
    zone: Option<&str>,
) -> Container {
    let mut args: Vec<String> = vec![
        "storage".into(),
        "--listen".into(),
        format!("0.0.0.0:{}", ports::STORAGE),
        "--advertise".into(),
        advertise.into(),
        "--node-id".into(),
        node_id.into(),
        "--manager".into(),
        pod::manager_addrs(opts),
        "--metrics".into(),
        format!("0.0.0.0:{}", ports::STORAGE_METRICS),
    ];
    if let Some(z) = zone {
        args.extend(["--zone".into(), z.into()]);
    }
    let mut mounts = Vec::new();
    for d in 0..opts.storage_disks {
        args.extend(["--data-dir".into(), format!("{DATA}/disk{d}")]);
        mounts.push(mount(&format!("disk{d}"), &format!("{DATA}/disk{d}")));
    }
    let mut c = ironsan_container("storage", opts, args);
    c.ports = Some(vec![
        port("data", ports::STORAGE),
        port("metrics", ports::STORAGE_METRICS),
    ]);
    pod::daemon_probes(&mut c, "metrics");
    // Opening a large store may take a while; liveness starts counting after it.
    c.startup_probe = Some(pod::http_probe("/healthz", "metrics", 5, 60));
    c.resources = Some(pod::resources("500m", "1Gi", "2", "4Gi"));
    c.security_context = Some(pod::locked_down());
    c.volume_mounts = Some(mounts);
    c
}

/// Nodes admitted to run storage (the label), in `zone` when given.
fn storage_nodes(opts: &Options, zone: Option<&str>) -> Result<Affinity, DeployError> {
    let (key, value) = opts.storage_node_label()?;
    let mut exprs = vec![NodeSelectorRequirement {
        key,
        operator: "In".into(),
        values: Some(vec![value]),
    }];
    if let Some(z) = zone {
        exprs.push(NodeSelectorRequirement {
            key: ZONE_LABEL.into(),
            operator: "In".into(),
            values: Some(vec![z.into()]),
        });
    }
    Ok(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(exprs),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        // Replicas go to distinct storage nodes; they must be distinct hosts too.
        pod_anti_affinity: Some(spread_over_nodes(selector_labels("storage"))),
        ..Default::default()
    })
}

pub fn storage(opts: &Options) -> Result<Vec<Object>, DeployError> {
    let component = "storage";
    let mut out = vec![
        quiet_account(STORAGE, opts, component),
        headless(
            STORAGE,
            opts,
            component,
            &[
                ("data", ports::STORAGE),
                ("metrics", ports::STORAGE_METRICS),
            ],
        ),
    ];
    if let Some(root) = &opts.storage_host_path {
        out.push(storage_daemonset(opts, root)?);
    } else {
        let zones: Vec<Option<&str>> = if opts.zones.is_empty() {
            vec![None]
        } else {
            opts.zones.iter().map(|z| Some(z.as_str())).collect()
        };
        let n = zones.len() as u32;
        for (i, zone) in zones.into_iter().enumerate() {
            // Pods spread evenly, the first zones taking the remainder.
            let replicas = opts.storage / n + u32::from((i as u32) < opts.storage % n);
            out.push(storage_statefulset(opts, zone, replicas)?);
        }
    }
    // One storage pod at a time: every chunk keeps all but one of its replicas.
    out.push(pdb(STORAGE, opts, component, Budget::MaxUnavailable(1)));
    Ok(out)
}

fn storage_statefulset(
    opts: &Options,
    zone: Option<&str>,
    replicas: u32,
) -> Result<Object, DeployError> {
    let name = match zone {
        Some(z) => format!("{STORAGE}-{z}"),
        None => STORAGE.into(),
    };
    let mut pick = selector_labels("storage");
    let mut labels = pod::labels("storage");
    if let Some(z) = zone {
        // Each zone's StatefulSet selects only its own pods.
        pick.insert("ironsan.io/zone".into(), z.into());
        labels.insert("ironsan.io/zone".into(), z.into());
    }
    let mut c = storage_container(
        opts,
        &format!(
            "$(POD_NAME).{STORAGE}.$(POD_NAMESPACE).svc:{}",
            ports::STORAGE
        ),
        "$(POD_NAME)",
        zone,
    );
    c.env = Some(vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
    ]);
    let claims = (0..opts.storage_disks)
        .map(|d| {
            claim(
                &format!("disk{d}"),
                &opts.storage_disk_size,
                Some(&opts.storage_disk_class),
            )
        })
        .collect();
    let mut m = meta(&name, opts, "storage");
    m.labels = Some(labels.clone());
    Ok(Object::StatefulSet(StatefulSet {
        metadata: m,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(STORAGE.into()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(rolling_statefulset()),
            // A restarted pod must stay ready a while before the next one goes.
            min_ready_seconds: Some(10),
            selector: selector(pick),
            template: pod::template(
                labels,
                PodSpec {
                    service_account_name: Some(STORAGE.into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(pod::non_root_pod()),
                    // SIGTERM drains the data path and closes the store.
                    termination_grace_period_seconds: Some(60),
                    affinity: Some(storage_nodes(opts, zone)?),
                    containers: vec![c],
                    ..Default::default()
                },
            ),
            volume_claim_templates: Some(claims),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

/// Storage on host directories: one pod per labelled node, on the host network so that its
/// address (the node's) and its id (the node's name) survive restarts.
fn storage_daemonset(opts: &Options, root: &str) -> Result<Object, DeployError> {
    let mut c = storage_container(
        opts,
        &format!("$(HOST_IP):{}", ports::STORAGE),
        "$(NODE_NAME)",
        None,
    );
    c.env = Some(vec![
        env_field("NODE_NAME", "spec.nodeName"),
        env_field("HOST_IP", "status.hostIP"),
    ]);
    c.ports = Some(vec![
        pod::host_port("data", ports::STORAGE),
        pod::host_port("metrics", ports::STORAGE_METRICS),
    ]);
    // Host directories belong to root; the container keeps no capability.
    let mut sc = pod::locked_down();
    sc.run_as_user = Some(0);
    sc.run_as_non_root = Some(false);
    c.security_context = Some(sc);
    let root = root.trim_end_matches('/');
    let volumes = (0..opts.storage_disks)
        .map(|d| {
            pod::host_path(
                &format!("disk{d}"),
                &format!("{root}/disk{d}"),
                "DirectoryOrCreate",
            )
        })
        .collect();
    let mut affinity = storage_nodes(opts, None)?;
    affinity.pod_anti_affinity = None;
    Ok(Object::DaemonSet(DaemonSet {
        metadata: meta(STORAGE, opts, "storage"),
        spec: Some(DaemonSetSpec {
            selector: selector(selector_labels("storage")),
            update_strategy: Some(rolling_daemonset()),
            min_ready_seconds: Some(10),
            template: pod::template(
                pod::labels("storage"),
                PodSpec {
                    service_account_name: Some(STORAGE.into()),
                    automount_service_account_token: Some(false),
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(pod::runtime_default()),
                        ..Default::default()
                    }),
                    termination_grace_period_seconds: Some(60),
                    affinity: Some(affinity),
                    containers: vec![c],
                    volumes: Some(volumes),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

pub fn gateway(opts: &Options) -> Vec<Object> {
    let component = "gateway";
    let args: Vec<String> = vec![
        "gateway".into(),
        "--manager".into(),
        pod::manager_addrs(opts),
        "--portal".into(),
        format!("0.0.0.0:{}", opts.iscsi_port),
        "--advertise".into(),
        format!("$(HOST_IP):{}", opts.iscsi_port),
        // CSI publishes a volume to the gateway named like the node.
        "--node-id".into(),
        "$(NODE_NAME)".into(),
        "--metrics".into(),
        format!("0.0.0.0:{}", ports::GATEWAY_METRICS),
    ];
    let mut c = ironsan_container(component, opts, args);
    c.env = Some(vec![
        env_field("NODE_NAME", "spec.nodeName"),
        env_field("HOST_IP", "status.hostIP"),
    ]);
    c.ports = Some(vec![
        pod::host_port("iscsi", opts.iscsi_port),
        pod::host_port("metrics", ports::GATEWAY_METRICS),
    ]);
    pod::daemon_probes(&mut c, "metrics");
    c.resources = Some(pod::resources("250m", "256Mi", "2", "2Gi"));
    let mut sc = pod::locked_down();
    let mut pod_sc = pod::non_root_pod();
    if opts.iscsi_port < 1024 {
        // A privileged port on the host network: root, with only the right to bind it.
        sc.run_as_user = Some(0);
        sc.run_as_non_root = Some(false);
        sc.capabilities = Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(vec!["NET_BIND_SERVICE".into()]),
        });
        pod_sc = PodSecurityContext {
            seccomp_profile: Some(pod::runtime_default()),
            ..Default::default()
        };
    }
    c.security_context = Some(sc);
    let set = DaemonSet {
        metadata: meta(GATEWAY, opts, component),
        spec: Some(DaemonSetSpec {
            selector: selector(selector_labels(component)),
            update_strategy: Some(rolling_daemonset()),
            template: pod::template(
                pod::labels(component),
                PodSpec {
                    service_account_name: Some(GATEWAY.into()),
                    automount_service_account_token: Some(false),
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    security_context: Some(pod_sc),
                    // SIGTERM drains the sessions and flushes acknowledged writes.
                    termination_grace_period_seconds: Some(60),
                    tolerations: Some(everywhere()),
                    containers: vec![c],
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        quiet_account(GATEWAY, opts, component),
        headless(
            GATEWAY,
            opts,
            component,
            &[("metrics", ports::GATEWAY_METRICS)],
        ),
        Object::DaemonSet(set),
    ]
}
