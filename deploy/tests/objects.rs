//! What an API server would only find out at apply or run time, checked over the rendered
//! objects: selectors that match their pods, mounts of declared volumes, probes and Services on
//! real ports, `$(VAR)`s that are defined, one CSI socket path everywhere, host ports that do
//! not collide, and RBAC that covers every call of the pinned CSI sidecars and no more.

use std::collections::{BTreeMap, BTreeSet};

use ironsan_deploy::{ports, render, Bundle, Object, Options};
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The option sets every check runs on: the default, the non-default one, storage on
/// host paths, and no snapshots.
fn renderings() -> Vec<(&'static str, Options, Bundle)> {
    let zoned = Options {
        managers: 5,
        storage: 6,
        zones: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
        namespace: "storage-system".into(),
        storage_class: "fast".into(),
        image: "registry.example.com/ironsan:test".into(),
        storage_disks: 2,
        ..Options::default()
    };
    let host = Options {
        storage_host_path: Some("/srv/ironsan".into()),
        iscsi_port: 13260,
        ..Options::default()
    };
    let bare = Options {
        snapshots: false,
        managers: 1,
        storage: 1,
        replicas: 1,
        ..Options::default()
    };
    [
        ("default", Options::default()),
        ("zoned", zoned),
        ("host-path", host),
        ("no-snapshots", bare),
    ]
    .into_iter()
    .map(|(n, o)| {
        let b = render(&o).unwrap_or_else(|e| panic!("{n}: {e}"));
        (n, o, b)
    })
    .collect()
}

/// A workload's pod template, as the checks need it.
struct Workload<'a> {
    what: String,
    namespace: &'a str,
    selector: &'a LabelSelector,
    labels: BTreeMap<String, String>,
    spec: &'a PodSpec,
    claims: Vec<String>,
}

fn workloads(b: &Bundle) -> Vec<Workload<'_>> {
    let mut out = Vec::new();
    for o in b.objects() {
        let (kind, ns, name) = o.id();
        let (selector, template, claims) = match o {
            Object::StatefulSet(s) => {
                let spec = s.spec.as_ref().expect("spec");
                let claims = spec
                    .volume_claim_templates
                    .iter()
                    .flatten()
                    .map(|c| c.metadata.name.clone().expect("claim name"))
                    .collect();
                (&spec.selector, &spec.template, claims)
            }
            Object::DaemonSet(d) => {
                let spec = d.spec.as_ref().expect("spec");
                (&spec.selector, &spec.template, Vec::new())
            }
            Object::Deployment(d) => {
                let spec = d.spec.as_ref().expect("spec");
                (&spec.selector, &spec.template, Vec::new())
            }
            _ => continue,
        };
        out.push(Workload {
            what: format!("{kind} {name}"),
            namespace: ns.expect("workloads are namespaced"),
            selector,
            labels: template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default(),
            spec: template.spec.as_ref().expect("pod spec"),
            claims,
        });
    }
    out
}

fn matches(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn match_labels(s: &LabelSelector) -> BTreeMap<String, String> {
    assert!(
        s.match_expressions.is_none(),
        "selectors here use matchLabels only"
    );
    s.match_labels.clone().unwrap_or_default()
}

#[test]
fn selectors_match_their_pods_and_no_other_workload() {
    for (name, _, b) in renderings() {
        let ws = workloads(&b);
        for w in &ws {
            let sel = match_labels(w.selector);
            assert!(
                matches(&sel, &w.labels),
                "{name}: {} selects not its own pods",
                w.what
            );
            for other in &ws {
                if other.what != w.what {
                    assert!(
                        !matches(&sel, &other.labels),
                        "{name}: {} also selects the pods of {}",
                        w.what,
                        other.what
                    );
                }
            }
        }
        for o in b.objects() {
            let (kind, ns, oname) = o.id();
            let sel = match o {
                Object::Service(s) => s.spec.as_ref().and_then(|s| s.selector.clone()),
                Object::PodDisruptionBudget(p) => p
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .map(match_labels),
                _ => continue,
            }
            .unwrap_or_default();
            let hit: Vec<_> = ws
                .iter()
                .filter(|w| Some(w.namespace) == ns && matches(&sel, &w.labels))
                .collect();
            assert!(!hit.is_empty(), "{name}: {kind} {oname} selects no pods");
            if let Object::Service(s) = o {
                // Every target port is a port the selected pods declare.
                for p in s
                    .spec
                    .as_ref()
                    .and_then(|s| s.ports.as_ref())
                    .into_iter()
                    .flatten()
                {
                    for w in &hit {
                        let declared = w
                            .spec
                            .containers
                            .iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .any(|cp| match &p.target_port {
                                Some(IntOrString::String(n)) => cp.name.as_deref() == Some(n),
                                Some(IntOrString::Int(n)) => cp.container_port == *n,
                                None => cp.container_port == p.port,
                            });
                        assert!(
                            declared,
                            "{name}: Service {oname} port {:?} is not a port of {}",
                            p.name, w.what
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn mounts_name_declared_volumes() {
    for (name, _, b) in renderings() {
        for w in workloads(&b) {
            let mut declared: BTreeSet<String> = w
                .spec
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.clone())
                .collect();
            let n = declared.len() + w.claims.len();
            declared.extend(w.claims.iter().cloned());
            assert_eq!(
                declared.len(),
                n,
                "{name}: {} declares a volume twice",
                w.what
            );
            let mut used = BTreeSet::new();
            for c in &w.spec.containers {
                let mut paths = BTreeSet::new();
                for m in c.volume_mounts.iter().flatten() {
                    assert!(
                        declared.contains(&m.name),
                        "{name}: {} container {} mounts undeclared volume {}",
                        w.what,
                        c.name,
                        m.name
                    );
                    assert!(
                        paths.insert(&m.mount_path),
                        "{name}: {} mounts {} twice",
                        c.name,
                        m.mount_path
                    );
                    used.insert(m.name.clone());
                    if m.mount_propagation.as_deref() == Some("Bidirectional") {
                        let privileged = c
                            .security_context
                            .as_ref()
                            .and_then(|s| s.privileged)
                            .unwrap_or(false);
                        assert!(
                            privileged,
                            "{name}: Bidirectional propagation needs a privileged container"
                        );
                    }
                }
            }
            assert_eq!(
                used, declared,
                "{name}: {} declares volumes nobody mounts",
                w.what
            );
        }
    }
}

fn probe_port(p: &Probe) -> &IntOrString {
    if let Some(h) = &p.http_get {
        &h.port
    } else if let Some(t) = &p.tcp_socket {
        &t.port
    } else {
        panic!("probe without http or tcp action")
    }
}

#[test]
fn every_container_has_probes_resources_and_real_ports() {
    for (name, _, b) in renderings() {
        for w in workloads(&b) {
            let pod_ports: BTreeSet<i32> = w
                .spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
                .collect();
            for c in &w.spec.containers {
                let what = format!("{name}: {} container {}", w.what, c.name);
                let r = c
                    .resources
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: no resources"));
                for set in [&r.requests, &r.limits] {
                    let set = set
                        .as_ref()
                        .unwrap_or_else(|| panic!("{what}: requests and limits"));
                    assert!(
                        set.contains_key("cpu") && set.contains_key("memory"),
                        "{what}"
                    );
                }
                for (kind, p) in [
                    ("liveness", &c.liveness_probe),
                    ("readiness", &c.readiness_probe),
                ] {
                    let p = p
                        .as_ref()
                        .unwrap_or_else(|| panic!("{what}: no {kind} probe"));
                    match probe_port(p) {
                        // Named ports resolve among the container's own ports only.
                        IntOrString::String(n) => assert!(
                            c.ports.iter().flatten().any(|cp| cp.name.as_deref() == Some(n.as_str())),
                            "{what}: {kind} probe on port {n}, which the container does not declare"
                        ),
                        IntOrString::Int(n) => assert!(pod_ports.contains(n), "{what}: {kind} probe on undeclared port {n}"),
                    }
                }
                if w.spec.host_network == Some(true) {
                    for p in c.ports.iter().flatten() {
                        assert_eq!(
                            p.host_port,
                            Some(p.container_port),
                            "{what}: host network port {:?}",
                            p.name
                        );
                    }
                }
            }
        }
    }
}

/// `$(VAR)` in args expands only from variables the container defines; anything else stays
/// literal and the daemon would get a bogus address.
#[test]
fn variables_in_args_are_defined() {
    for (name, _, b) in renderings() {
        for w in workloads(&b) {
            for c in &w.spec.containers {
                let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
                for a in c.args.iter().flatten() {
                    let mut rest = a.as_str();
                    while let Some(i) = rest.find("$(") {
                        let end = rest[i..].find(')').expect("closed $(") + i;
                        let var = &rest[i + 2..end];
                        assert!(
                            env.contains(var),
                            "{name}: {} arg {a:?} uses undefined {var}",
                            c.name
                        );
                        rest = &rest[end..];
                    }
                }
            }
        }
    }
}

/// Pods on the host network that can share a node must not open the same port.
#[test]
fn host_ports_do_not_collide() {
    for (name, o, b) in renderings() {
        let mut seen: BTreeMap<i32, String> = BTreeMap::new();
        for w in workloads(&b) {
            if w.spec.host_network != Some(true) {
                continue;
            }
            for c in &w.spec.containers {
                for p in c.ports.iter().flatten() {
                    let who = format!("{} {}", w.what, c.name);
                    if let Some(prev) = seen.insert(p.container_port, who.clone()) {
                        panic!(
                            "{name}: port {} opened by {prev} and {who}",
                            p.container_port
                        );
                    }
                }
            }
        }
        assert!(
            seen.contains_key(&i32::from(o.iscsi_port)),
            "{name}: the portal is on the node"
        );
    }
}

fn container<'a>(w: &'a Workload<'_>, name: &str) -> &'a Container {
    w.spec
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{} has no container {name}", w.what))
}

fn arg_value<'a>(c: &'a Container, flag: &str) -> Vec<&'a str> {
    let args = c.args.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a == flag {
            out.push(args.get(i + 1).map(String::as_str).unwrap_or_default());
        } else if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            out.push(v);
        }
    }
    out
}

/// The driver's socket is where every sidecar looks, in the same volume; kubelet is told the
/// host path of that volume.
#[test]
fn one_csi_socket() {
    for (name, o, b) in renderings() {
        let ws = workloads(&b);
        for w in ws.iter().filter(|w| w.what.contains("csi")) {
            let driver = container(w, "ironsan-csi");
            let endpoint = arg_value(driver, "--endpoint")[0];
            let path = endpoint.strip_prefix("unix://").expect("a unix endpoint");
            let dir = path.rsplit_once('/').expect("a directory").0;
            let volume_at = |c: &Container| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.mount_path == dir)
                    .map(|m| m.name.clone())
            };
            let vol = volume_at(driver).expect("the driver mounts its socket directory");
            for c in w.spec.containers.iter().filter(|c| c.name != "ironsan-csi") {
                assert_eq!(arg_value(c, "--csi-address"), [path], "{name}: {}", c.name);
                assert_eq!(
                    volume_at(c).as_ref(),
                    Some(&vol),
                    "{name}: {} sees another socket dir",
                    c.name
                );
            }
            if w.what.contains("csi-node") {
                let host = w
                    .spec
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == vol)
                    .and_then(|v| v.host_path.as_ref())
                    .expect("the node socket is on the host")
                    .path
                    .clone();
                let reg = container(w, "node-driver-registrar");
                assert_eq!(
                    arg_value(reg, "--kubelet-registration-path"),
                    [format!("{host}/csi.sock").as_str()]
                );
                assert_eq!(
                    host,
                    format!("{}/plugins/{}", o.kubelet_dir, ironsan_deploy::DRIVER_NAME)
                );
            }
        }
    }
}

/// Each sidecar's flags, as the pinned release defines them (its cmd/ main plus csi-lib-utils'
/// standard flags): a renamed or misspelled flag makes the sidecar exit at start.
fn sidecar_flags(image: &str) -> &'static [&'static str] {
    const STANDARD: &[&str] = &[
        "csi-address",
        "leader-election",
        "leader-election-namespace",
        "http-endpoint",
        "kube-api-qps",
        "kube-api-burst",
        "kubeconfig",
        "metrics-path",
        "timeout",
    ];
    let own: &[&str] = match image.rsplit('/').next().and_then(|n| n.split(':').next()) {
        Some("csi-provisioner") => &[
            "extra-create-metadata",
            "default-fstype",
            "strict-topology",
            "worker-threads",
        ],
        Some("csi-attacher") => &["worker-threads", "default-fstype"],
        Some("csi-resizer") => &["handle-volume-inuse-error", "workers"],
        Some("csi-snapshotter") => &["extra-create-metadata", "worker-threads"],
        Some("csi-node-driver-registrar") => {
            return &[
                "csi-address",
                "kubelet-registration-path",
                "http-endpoint",
                "health-port",
                "timeout",
            ];
        }
        Some("livenessprobe") => {
            return &[
                "csi-address",
                "probe-timeout",
                "http-endpoint",
                "health-port",
            ]
        }
        other => panic!("unknown sidecar {other:?}"),
    };
    Box::leak([STANDARD, own].concat().into_boxed_slice())
}

#[test]
fn sidecar_flags_exist() {
    for (name, _, b) in renderings() {
        for w in workloads(&b) {
            for c in &w.spec.containers {
                let image = c.image.as_deref().unwrap_or_default();
                if !image.contains("sig-storage") {
                    continue;
                }
                let known = sidecar_flags(image);
                for a in c.args.iter().flatten() {
                    let flag = a
                        .trim_start_matches('-')
                        .split('=')
                        .next()
                        .unwrap_or_default();
                    assert!(known.contains(&flag), "{name}: {} has no flag {a}", c.name);
                }
            }
        }
    }
}

/// (api group, resource, verb) triples.
type Grants = BTreeSet<(String, String, String)>;

fn grants(rules: &[(&str, &str, &[&str])]) -> Grants {
    rules
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

/// What the pinned sidecars call, from each release's deploy/kubernetes/rbac*.yaml (the
/// optional secret and capacity-tracking rules left out: neither feature is enabled).
fn needed(snapshots: bool) -> (Grants, Grants) {
    const LEASES: (&str, &str, &[&str]) = (
        "coordination.k8s.io",
        "leases",
        &["get", "watch", "list", "delete", "update", "create"],
    );
    let mut cluster = grants(&[
        // external-provisioner v6.3.0
        (
            "",
            "persistentvolumes",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        (
            "",
            "persistentvolumeclaims",
            &["get", "list", "watch", "update"],
        ),
        (
            "storage.k8s.io",
            "storageclasses",
            &["get", "list", "watch"],
        ),
        (
            "",
            "events",
            &["list", "watch", "create", "update", "patch"],
        ),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshots",
            &["get", "list", "watch", "update"],
        ),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list"],
        ),
        ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
        ("", "nodes", &["get", "list", "watch"]),
        (
            "storage.k8s.io",
            "volumeattachments",
            &["get", "list", "watch"],
        ),
        // external-attacher v4.12.0
        ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
        (
            "storage.k8s.io",
            "volumeattachments",
            &["get", "list", "watch", "patch"],
        ),
        ("storage.k8s.io", "volumeattachments/status", &["patch"]),
        // external-resizer v2.2.1
        ("", "pods", &["get", "list", "watch"]),
        ("", "persistentvolumeclaims/status", &["patch"]),
        (
            "storage.k8s.io",
            "volumeattributesclasses",
            &["get", "list", "watch"],
        ),
    ]);
    if snapshots {
        // external-snapshotter v8.6.0 (csi-snapshotter sidecar; group snapshots not enabled)
        cluster.extend(grants(&[
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotclasses",
                &["get", "list", "watch"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents",
                &["get", "list", "watch", "update", "patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents/status",
                &["update", "patch"],
            ),
        ]));
    }
    (cluster, grants(&[LEASES]))
}

/// The grants a service account gets from the bundle's bindings: (cluster-wide, in-namespace).
fn granted(b: &Bundle, ns: &str, account: &str) -> (Grants, Grants) {
    let rules_of = |kind: &str, name: &str| -> Grants {
        let rules = b.objects().find_map(|o| match o {
            Object::ClusterRole(r)
                if kind == "ClusterRole" && r.metadata.name.as_deref() == Some(name) =>
            {
                r.rules.clone()
            }
            Object::Role(r) if kind == "Role" && r.metadata.name.as_deref() == Some(name) => {
                r.rules.clone()
            }
            _ => None,
        });
        let rules = rules.unwrap_or_else(|| panic!("{kind} {name} is bound but not defined"));
        let mut out = Grants::new();
        for r in rules {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for v in &r.verbs {
                        assert!(
                            g != "*" && res != "*" && v != "*",
                            "wildcard in {kind} {name}"
                        );
                        out.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
        out
    };
    let (mut cluster, mut local) = (Grants::new(), Grants::new());
    for o in b.objects() {
        let (subjects, role, into) = match o {
            Object::ClusterRoleBinding(x) => (&x.subjects, &x.role_ref, &mut cluster),
            Object::RoleBinding(x) => (&x.subjects, &x.role_ref, &mut local),
            _ => continue,
        };
        let to_me = subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(ns)
        });
        if to_me {
            into.extend(rules_of(&role.kind, &role.name));
        }
    }
    (cluster, local)
}

#[test]
fn rbac_covers_the_sidecars_and_no_more() {
    for (name, o, b) in renderings() {
        let ws = workloads(&b);
        let accounts: BTreeSet<(String, String)> = b
            .objects()
            .filter_map(|x| match x {
                Object::ServiceAccount(sa) => Some((
                    sa.metadata.namespace.clone().unwrap_or_default(),
                    sa.metadata.name.clone().unwrap_or_default(),
                )),
                _ => None,
            })
            .collect();
        for w in &ws {
            let account = w
                .spec
                .service_account_name
                .clone()
                .expect("an own service account");
            assert!(
                accounts.contains(&(w.namespace.to_string(), account.clone())),
                "{name}: {} runs as undefined account {account}",
                w.what
            );
            let (cluster, local) = granted(&b, w.namespace, &account);
            let calls_api = w.spec.containers.iter().any(|c| {
                c.image.as_deref().is_some_and(|i| {
                    i.contains("sig-storage")
                        && !i.contains("registrar")
                        && !i.contains("livenessprobe")
                })
            });
            if calls_api {
                let (need_cluster, need_local) = needed(o.snapshots);
                assert_eq!(cluster, need_cluster, "{name}: {} cluster grants", w.what);
                assert_eq!(local, need_local, "{name}: {} namespace grants", w.what);
            } else {
                assert!(
                    cluster.is_empty() && local.is_empty(),
                    "{name}: {} needs no API access",
                    w.what
                );
                assert_eq!(
                    w.spec.automount_service_account_token,
                    Some(false),
                    "{name}: {} should not get a token",
                    w.what
                );
            }
        }
        for x in b.objects() {
            if let Object::ClusterRoleBinding(r) = x {
                for s in r.subjects.iter().flatten() {
                    let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
                    assert!(
                        accounts.contains(&key),
                        "{name}: binding to unknown {key:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn namespaced_objects_are_in_the_namespace() {
    for (name, o, b) in renderings() {
        let mut seen = BTreeSet::new();
        for x in b.objects() {
            let (kind, ns, oname) = x.id();
            assert!(
                seen.insert((kind, ns, oname)),
                "{name}: {kind} {oname} twice"
            );
            let cluster_scoped = matches!(
                x,
                Object::Namespace(_)
                    | Object::ClusterRole(_)
                    | Object::ClusterRoleBinding(_)
                    | Object::CsiDriver(_)
                    | Object::StorageClass(_)
                    | Object::VolumeSnapshotClass(_)
            );
            if cluster_scoped {
                assert_eq!(ns, None, "{name}: {kind} {oname}");
            } else {
                assert_eq!(ns, Some(o.namespace.as_str()), "{name}: {kind} {oname}");
            }
        }
    }
}

/// The managers name each other by the StatefulSet's stable names, ids 1..=N; clients get
/// every member.
#[test]
fn managers_find_each_other() {
    for (name, o, b) in renderings() {
        let ws = workloads(&b);
        let m = ws
            .iter()
            .find(|w| w.what == "StatefulSet ironsan-manager")
            .expect("managers");
        let set = b
            .objects()
            .find_map(|x| match x {
                Object::StatefulSet(s) if s.metadata.name.as_deref() == Some("ironsan-manager") => {
                    s.spec.clone()
                }
                _ => None,
            })
            .expect("spec");
        assert_eq!(set.replicas, Some(o.managers as i32));
        let svc = set.service_name.expect("service");
        let c = container(m, "manager");
        let peers = arg_value(c, "--peer");
        let want: Vec<String> = (0..o.managers)
            .map(|i| {
                format!(
                    "{}=ironsan-manager-{i}.{svc}.{}.svc:{}",
                    i + 1,
                    o.namespace,
                    ports::MANAGER
                )
            })
            .collect();
        assert_eq!(peers, want, "{name}");
        let clients = want
            .iter()
            .map(|p| p.split_once('=').expect("id=addr").1)
            .collect::<Vec<_>>()
            .join(",");
        for w in &ws {
            for c in &w.spec.containers {
                for v in arg_value(c, "--manager") {
                    assert_eq!(v, clients, "{name}: {} {}", w.what, c.name);
                }
            }
        }
        assert_eq!(
            arg_value(c, "--advertise"),
            [format!("$(POD_NAME).{svc}.$(POD_NAMESPACE).svc:{}", ports::MANAGER).as_str()]
        );
    }
}

/// Storage pods add up to the option, one StatefulSet per zone pinned to it and registering
/// it; each pod gets its disks.
#[test]
fn storage_spreads_over_zones() {
    for (name, o, b) in renderings() {
        let ws = workloads(&b);
        let storage: Vec<_> = ws
            .iter()
            .filter(|w| w.what.contains("ironsan-storage"))
            .collect();
        if o.storage_host_path.is_some() {
            assert_eq!(storage.len(), 1);
            assert!(storage[0].what.starts_with("DaemonSet"), "{name}");
            continue;
        }
        let total: i32 = b
            .objects()
            .filter_map(|x| match x {
                Object::StatefulSet(s)
                    if s.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("ironsan-storage")) =>
                {
                    s.spec.as_ref().and_then(|s| s.replicas)
                }
                _ => None,
            })
            .sum();
        assert_eq!(total, o.storage as i32, "{name}");
        assert_eq!(storage.len(), o.zones.len().max(1), "{name}");
        for w in &storage {
            let c = container(w, "storage");
            assert_eq!(arg_value(c, "--data-dir").len(), o.storage_disks as usize);
            assert_eq!(w.claims.len(), o.storage_disks as usize);
            let zone = arg_value(c, "--zone");
            let terms = &w
                .spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| {
                    n.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .expect("node affinity")
                .node_selector_terms;
            let pinned: Vec<&str> = terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .filter(|e| e.key == "topology.kubernetes.io/zone")
                .flat_map(|e| e.values.iter().flatten().map(String::as_str))
                .collect();
            assert_eq!(
                zone, pinned,
                "{name}: {} registers the zone it is pinned to",
                w.what
            );
        }
    }
}

#[test]
fn only_the_node_plugin_is_privileged() {
    for (name, _, b) in renderings() {
        for w in workloads(&b) {
            for c in &w.spec.containers {
                let sc = c.security_context.as_ref();
                let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
                assert_eq!(
                    privileged,
                    w.what.contains("csi-node") && c.name == "ironsan-csi",
                    "{name}: {} {}",
                    w.what,
                    c.name
                );
                if !privileged {
                    assert_eq!(
                        sc.and_then(|s| s.allow_privilege_escalation),
                        Some(false),
                        "{name}: {}",
                        c.name
                    );
                }
            }
            let non_root = w
                .spec
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root)
                == Some(true);
            let must = ["ironsan-manager", "ironsan-csi-controller"]
                .iter()
                .any(|n| w.what.ends_with(n))
                || w.what == "StatefulSet ironsan-storage";
            if must {
                assert!(non_root, "{name}: {} runs as root", w.what);
            }
        }
    }
}
