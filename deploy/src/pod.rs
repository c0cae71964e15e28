//! Building blocks every workload shares: labels, metadata, probes, resources, security.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::Options;

/// The user of the image's `ironsan` account (deploy/Dockerfile).
pub const UID: i64 = 65532;

/// Labels that pick one component's pods: what selectors use, never changed by an upgrade.
pub fn selector_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "ironsan".into()),
        ("app.kubernetes.io/component".into(), component.into()),
    ])
}

/// Every object's labels: the selector labels plus the ones a ServiceMonitor or an operator
/// filters by.
pub fn labels(component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(component);
    l.insert("app.kubernetes.io/part-of".into(), "ironsan".into());
    l.insert(
        "app.kubernetes.io/version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    l
}

pub fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    }
}

/// A pod template: the workload's pods carry `labels`.
pub fn template(labels: BTreeMap<String, String>, spec: PodSpec) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        }),
        spec: Some(spec),
    }
}

/// Metadata of a namespaced object.
pub fn meta(name: &str, opts: &Options, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(opts.namespace.clone()),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

/// Metadata of a cluster-scoped object.
pub fn cluster_meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

pub fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// A port opened on the node itself (host network: the host port must equal the port).
pub fn host_port(name: &str, p: u16) -> ContainerPort {
    ContainerPort {
        host_port: Some(i32::from(p)),
        ..port(name, p)
    }
}

/// An HTTP probe on a named port.
pub fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// A TCP probe on a named port, for sidecars whose HTTP endpoint has no readiness notion.
pub fn tcp_probe(port: &str) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// The daemons' probes: `/healthz` says the process serves, `/readyz` that it is part of the
/// cluster (see each daemon's readiness in ARCHITECTURE.md).
pub fn daemon_probes(c: &mut Container, port: &str) {
    c.liveness_probe = Some(http_probe("/healthz", port, 10, 6));
    c.readiness_probe = Some(http_probe("/readyz", port, 5, 2));
}

pub fn resources(
    cpu_req: &str,
    mem_req: &str,
    cpu_lim: &str,
    mem_lim: &str,
) -> ResourceRequirements {
    let q = |s: &str| Quantity(s.into());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q(cpu_req)),
            ("memory".into(), q(mem_req)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), q(cpu_lim)),
            ("memory".into(), q(mem_lim)),
        ])),
        ..Default::default()
    }
}

/// An environment variable from the downward API (`metadata.name`, `spec.nodeName`, ...).
pub fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container that needs nothing from the kernel beyond the default: no capabilities, no
/// privilege escalation, a read-only root filesystem.
pub fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod of non-root containers whose volumes are group-writable by the image's user.
pub fn non_root_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        fs_group: Some(UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

pub fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

pub fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

/// A host directory (`type_`: `Directory` must exist, `DirectoryOrCreate` is made).
pub fn host_path(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Default::default()
    }
}

/// `ironsan` container with the image and pull policy of the options; `args` start with the
/// subcommand (the image's entrypoint is the binary).
pub fn ironsan_container(name: &str, opts: &Options, args: Vec<String>) -> Container {
    Container {
        name: name.into(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some(opts.image_pull_policy.clone()),
        args: Some(args),
        ..Default::default()
    }
}

/// Manager addresses as clients give them: every member's stable DNS name.
pub fn manager_addrs(opts: &Options) -> String {
    (0..opts.managers)
        .map(|i| manager_addr(opts, i))
        .collect::<Vec<_>>()
        .join(",")
}

/// Member `ordinal`'s address (its id is `ordinal + 1`).
pub fn manager_addr(opts: &Options, ordinal: u32) -> String {
    format!(
        "{}-{ordinal}.{}.{}.svc:{}",
        crate::daemons::MANAGER,
        crate::daemons::MANAGER,
        opts.namespace,
        crate::ports::MANAGER
    )
}
