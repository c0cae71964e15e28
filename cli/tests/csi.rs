//! The CSI driver's identity and controller services against a real `ironsan dev` cluster,
//! over the driver's unix socket: every call of the volume lifecycle, repeated calls, and the
//! error cases with the codes the CSI spec (and csi-sanity) expect. Publication is checked on
//! the wire too: a published volume's target appears on the gateway's portal, an unpublished
//! one disappears, and an expansion shows in READ CAPACITY.
//!
//! Snapshots and clones go through the same socket: a snapshot is polled until ready as the
//! csi-snapshotter does, listed and paged, cloned into volumes and deleted. What a real
//! cluster does not readily show (a snapshot that fails, one slower than CreateSnapshot
//! waits, a source volume being deleted) is driven by the fake manager of the admin tests.
//!
//! Node operations need the kernel's iSCSI initiator: `csi_node.rs` checks their argument
//! handling here and `csi_vm.rs` runs them for real inside a VM.

#[path = "support/csi.rs"]
mod csi_support;
mod fake_manager;
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use csi::volume_capability::access_mode::Mode;
use csi_support::*;
use support::*;
use tonic011::Code;

const MIB: i64 = 1 << 20;

/// `ironsan dev`, a second gateway (`node-b`, so two nodes exist) and the driver in `all`
/// mode as node `dev` (the dev cluster's gateway id).
struct Cluster {
    c: Clients,
    server: Server,
    managers: String,
    _gateway_b: GatewayProcess,
    driver: Option<CsiDriver>,
    _dir: TestDir,
}

/// A second `ironsan gateway` process, killed on drop.
struct GatewayProcess(std::process::Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn cluster(label: &str) -> Cluster {
    let dir = TestDir::new(label);
    let server = Server::start(&dir.path().join("data"), ServerConfig::default());
    let managers = dev_managers(&server.data_dir);
    let gateway_b = std::process::Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["gateway", "--manager", &managers, "--portal", "127.0.0.1:0"])
        .args(["--node-id", "node-b"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a second gateway");
    let sock = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let state = dir.path().join("csi-state");
    let driver = CsiDriver::start(
        &endpoint,
        &[
            "--mode",
            "all",
            "--node-id",
            "dev",
            "--manager",
            &managers,
            "--state-dir",
            &state.display().to_string(),
            "--lease",
            "5s",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let c = clients(&endpoint).await;
    let cl = Cluster {
        c,
        server,
        managers,
        _gateway_b: GatewayProcess(gateway_b),
        driver: Some(driver),
        _dir: dir,
    };
    // The second gateway registers with the manager as it starts.
    wait_for(
        "gateway node-b to register",
        Duration::from_secs(30),
        || admin(&cl.managers, &["node", "list", "--gateways"]).contains("node-b"),
    )
    .await;
    cl
}

fn admin(managers: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .args(["--manager", managers])
        .output()
        .expect("run ironsan");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rwo() -> csi::VolumeCapability {
    mount_cap(Mode::SingleNodeWriter, "")
}

fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn publish_req(
    volume: &str,
    node: &str,
    cap: csi::VolumeCapability,
    ro: bool,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: node.to_string(),
        volume_capability: Some(cap),
        readonly: ro,
        ..Default::default()
    }
}

fn unpublish_req(volume: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: node.to_string(),
        ..Default::default()
    }
}

fn snapshot_req(volume: &str, name: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: volume.to_string(),
        name: name.to_string(),
        ..Default::default()
    }
}

/// A CreateVolume request of `bytes` (0: no range) with a content source.
fn clone_req(
    name: &str,
    bytes: i64,
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, bytes, &[]);
    if bytes == 0 {
        req.capacity_range = None;
    }
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

fn from_volume(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

impl Cluster {
    /// CreateSnapshot, repeated as the csi-snapshotter does until the answer is ready to use;
    /// every answer names the same snapshot.
    async fn snapshot(&mut self, volume: &str, name: &str) -> csi::Snapshot {
        let start = Instant::now();
        let mut first: Option<String> = None;
        loop {
            let called = Instant::now();
            let snap = self
                .c
                .controller
                .create_snapshot(snapshot_req(volume, name))
                .await
                .unwrap_or_else(|s| panic!("CreateSnapshot {volume} {name}: {s:?}"))
                .into_inner()
                .snapshot
                .expect("CreateSnapshot answers a snapshot");
            assert!(
                called.elapsed() < Duration::from_secs(5),
                "CreateSnapshot blocked for {:?}",
                called.elapsed()
            );
            let id = first.get_or_insert_with(|| snap.snapshot_id.clone());
            assert_eq!(
                &snap.snapshot_id, id,
                "a repeated CreateSnapshot names another snapshot"
            );
            if snap.ready_to_use {
                return snap;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "snapshot {id} not ready to use after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn list_snapshots(
        &mut self,
        req: csi::ListSnapshotsRequest,
    ) -> csi::ListSnapshotsResponse {
        self.c
            .controller
            .list_snapshots(req)
            .await
            .unwrap_or_else(|s| panic!("ListSnapshots: {s:?}"))
            .into_inner()
    }

    /// Snapshot ids ListSnapshots answers for `req`, following the pages.
    async fn snapshot_ids(&mut self, mut req: csi::ListSnapshotsRequest) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let r = self.list_snapshots(req.clone()).await;
            if req.max_entries > 0 {
                assert!(
                    r.entries.len() <= req.max_entries as usize,
                    "page larger than max_entries"
                );
            }
            ids.extend(
                r.entries
                    .into_iter()
                    .filter_map(|e| e.snapshot.map(|s| s.snapshot_id)),
            );
            if r.next_token.is_empty() {
                return ids;
            }
            req.starting_token = r.next_token;
        }
    }

    async fn create(&mut self, name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::Volume {
        self.c
            .controller
            .create_volume(create_req(name, bytes, params))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
            .into_inner()
            .volume
            .expect("CreateVolume answers a volume")
    }

    async fn volume_ids(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .c
                .controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            assert!(r.entries.len() <= 2, "page larger than max_entries");
            ids.extend(
                r.entries
                    .into_iter()
                    .filter_map(|e| e.volume.map(|v| v.volume_id)),
            );
            if r.next_token.is_empty() {
                return ids;
            }
            token = r.next_token;
        }
    }

    async fn published_nodes(&mut self, volume: &str) -> Vec<String> {
        let r = self
            .c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: volume.to_string(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        let mut nodes = r.status.expect("status").published_node_ids;
        nodes.sort();
        nodes
    }

    /// The driver's Prometheus text.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let log = self.driver.as_ref().expect("driver").log_text();
        let addr = log
            .lines()
            .find(|l| l.contains("metrics ready"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `metrics ready` line in:\n{log}"))
            .to_string();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read /metrics");
        text
    }

    /// Whether the dev gateway's portal lists the volume's target.
    fn served(&self, volume: &str) -> bool {
        let r = run("iscsi-ls", [self.server.portal_url()]);
        r.ok() && r.stdout.contains(&iqn(volume))
    }

    /// READ CAPACITY (16) through the target: the volume's size in bytes.
    fn capacity(&self, volume: &str) -> u64 {
        let r = run("iscsi-readcapacity16", [self.server.url(volume)])
            .expect_ok("iscsi-readcapacity16");
        r.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("Total size:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no total size in:\n{}", r.describe()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_capabilities() {
    let mut cl = cluster("csi-identity").await;
    let info =
        cl.c.identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
    assert_eq!(info.name, "csi.ironsan.io");
    assert!(!info.vendor_version.is_empty());

    let caps =
        cl.c.identity
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner();
    let text = format!("{caps:?}");
    for want in ["ControllerService", "VolumeAccessibilityConstraints"] {
        assert!(text.contains(want), "capabilities lack {want}: {text}");
    }
    assert!(
        text.contains("VolumeExpansion"),
        "no online expansion: {text}"
    );

    let probe =
        cl.c.identity
            .probe(csi::ProbeRequest {})
            .await
            .expect("Probe")
            .into_inner();
    assert_eq!(probe.ready, Some(true));

    use csi::controller_service_capability::rpc::Type as T;
    let caps: Vec<i32> =
        cl.c.controller
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| {
                c.r#type
                    .map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
            })
            .collect();
    for want in [
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::ExpandVolume,
        T::PublishReadonly,
        // Without these the csi-snapshotter sidecar exits at start.
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
    ] {
        assert!(caps.contains(&(want as i32)), "controller lacks {want:?}");
    }

    // The probe follows the manager: stop the cluster and it must fail.
    let driver = cl.driver.take().expect("driver");
    cl.server.stop_clean();
    expect_code(
        "Probe without a manager",
        cl.c.identity.probe(csi::ProbeRequest {}).await,
        Code::FailedPrecondition,
    );
    assert!(driver.stop(), "the driver must exit 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_validate_delete() {
    let mut cl = cluster("csi-create").await;
    let before = cl.volume_ids().await;

    // Create: the name is the id; parameters land on the volume; repeating is idempotent.
    let name = "pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let v = cl
        .create(name, 60 * MIB + 1, &[("replicas", "2"), ("fsType", "xfs")])
        .await;
    assert_eq!(v.volume_id, name);
    assert_eq!(v.capacity_bytes, 61 * MIB, "rounded up to whole MiB");
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    let again = cl
        .create(name, 60 * MIB + 1, &[("replicas", "2"), ("fsType", "xfs")])
        .await;
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, v.capacity_bytes);
    let listed = admin(&cl.managers, &["volume", "list", "--json"]);
    let vols: serde_json::Value = serde_json::from_str(&listed).expect("volume list --json");
    let made = vols["volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("{name} not in {listed}"));
    assert_eq!(made["replicas"], 2, "{made}");

    // QoS parameters become the volume's limits, as `ironsan volume get` shows them.
    let limited_name = "pvc-qos";
    cl.create(
        limited_name,
        16 * MIB,
        &[
            ("writeIOPS", "250"),
            ("readBandwidth", "64MiB"),
            ("qosBurst", "2s"),
        ],
    )
    .await;
    let got = admin(&cl.managers, &["volume", "get", limited_name, "--json"]);
    let got: serde_json::Value = serde_json::from_str(&got).expect("volume get --json");
    assert_eq!(got["qos"]["write_iops"], 250, "{got}");
    assert_eq!(got["qos"]["read_bps"], 64 * MIB, "{got}");
    assert_eq!(got["qos"]["burst_ms"], 2000, "{got}");

    // Same name, incompatible: ALREADY_EXISTS.
    expect_code(
        "CreateVolume with a bigger size",
        cl.c.controller
            .create_volume(create_req(name, 200 * MIB, &[("replicas", "2")]))
            .await,
        Code::AlreadyExists,
    );
    expect_code(
        "CreateVolume with other replicas",
        cl.c.controller
            .create_volume(create_req(name, 61 * MIB, &[("replicas", "3")]))
            .await,
        Code::AlreadyExists,
    );

    // Names that are not IronSAN names map to a stable id; the longest CSI name works.
    let odd = "sanity-Controller Service CreateVolume ÄÖ";
    let odd_v = cl.create(odd, 16 * MIB, &[]).await;
    assert!(odd_v.volume_id.starts_with("csi-"), "{}", odd_v.volume_id);
    assert_eq!(
        cl.create(odd, 16 * MIB, &[]).await.volume_id,
        odd_v.volume_id
    );
    let long = format!("long-{}", "x".repeat(123));
    assert_eq!(long.len(), 128);
    assert_eq!(cl.create(&long, 16 * MIB, &[]).await.volume_id, long);
    // No capacity range: the documented default (1 GiB, thin).
    let mut req = create_req("defaulted", 0, &[]);
    req.capacity_range = None;
    let d =
        cl.c.controller
            .create_volume(req)
            .await
            .expect("create without a range")
            .into_inner();
    assert_eq!(d.volume.expect("volume").capacity_bytes, 1 << 30);

    // Bad input: the right code, and nothing created.
    let count = cl.volume_ids().await.len();
    let mut bad = create_req("", 16 * MIB, &[]);
    expect_code(
        "no name",
        cl.c.controller.create_volume(bad.clone()).await,
        Code::InvalidArgument,
    );
    bad.name = "no-caps".into();
    bad.volume_capabilities.clear();
    expect_code(
        "no capabilities",
        cl.c.controller.create_volume(bad).await,
        Code::InvalidArgument,
    );
    let mut multi = create_req("multi-writer", 16 * MIB, &[]);
    multi.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter, "")];
    expect_code(
        "multi-node writer",
        cl.c.controller.create_volume(multi).await,
        Code::InvalidArgument,
    );
    let mut btrfs = create_req("btrfs", 16 * MIB, &[]);
    btrfs.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, "btrfs")];
    expect_code(
        "unsupported fs",
        cl.c.controller.create_volume(btrfs).await,
        Code::InvalidArgument,
    );
    for params in [
        &[("replica", "3")][..],
        &[("replicas", "0")],
        &[("chunkSize", "big")],
        &[("fsType", "ntfs")],
        &[("writeIOPS", "fast")],
        // Parsed here, refused by the manager's limits: nothing is created either way.
        &[("writeIOPS", "99999999999")],
        &[("writeIOPS", "10"), ("qosBurst", "0s")],
    ] {
        expect_code(
            &format!("parameters {params:?}"),
            cl.c.controller
                .create_volume(create_req("bad-params", 16 * MIB, params))
                .await,
            Code::InvalidArgument,
        );
    }
    expect_code(
        "beyond the largest volume",
        cl.c.controller
            .create_volume(create_req("huge", 17 << 40, &[]))
            .await,
        Code::OutOfRange,
    );
    let mut limited = create_req("limited", MIB + 1, &[]);
    limited.capacity_range = Some(csi::CapacityRange {
        required_bytes: MIB + 1,
        limit_bytes: MIB + 100,
    });
    expect_code(
        "rounding above the limit",
        cl.c.controller.create_volume(limited).await,
        Code::OutOfRange,
    );
    let mut source = create_req("from-source", 16 * MIB, &[]);
    source.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: name.into(),
            },
        )),
    });
    expect_code(
        "a clone smaller than its source",
        cl.c.controller.create_volume(source).await,
        Code::OutOfRange,
    );
    // Placement impossible (5 replicas on 3 storage daemons): refused, and no volume left.
    expect_code(
        "more replicas than nodes",
        cl.c.controller
            .create_volume(create_req("too-wide", 16 * MIB, &[("replicas", "5")]))
            .await,
        Code::ResourceExhausted,
    );
    assert_eq!(
        cl.volume_ids().await.len(),
        count,
        "a refused create left a volume behind"
    );

    // ListVolumes: pages of 2 list every volume once, in order; bad tokens are ABORTED.
    let ids = cl.volume_ids().await;
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "pages overlap or are out of order");
    for want in [
        name,
        limited_name,
        odd_v.volume_id.as_str(),
        long.as_str(),
        "defaulted",
    ] {
        assert!(
            ids.iter().any(|i| i == want),
            "{want} not listed in {ids:?}"
        );
    }
    assert_eq!(ids.len(), before.len() + 5);
    expect_code(
        "invalid token",
        cl.c.controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: "invalid-token".into(),
            })
            .await,
        Code::Aborted,
    );
    expect_code(
        "negative max_entries",
        cl.c.controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );

    // ValidateVolumeCapabilities.
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.to_string(),
            volume_capabilities: caps,
            ..Default::default()
        };
    let ok =
        cl.c.controller
            .validate_volume_capabilities(validate(
                name,
                vec![rwo(), block_cap(Mode::MultiNodeReaderOnly)],
            ))
            .await
            .expect("validate")
            .into_inner();
    assert!(
        ok.confirmed.is_some(),
        "supported capabilities not confirmed: {ok:?}"
    );
    let no =
        cl.c.controller
            .validate_volume_capabilities(validate(
                name,
                vec![mount_cap(Mode::MultiNodeMultiWriter, "")],
            ))
            .await
            .expect("validate")
            .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    expect_code(
        "validate unknown",
        cl.c.controller
            .validate_volume_capabilities(validate("nope", vec![rwo()]))
            .await,
        Code::NotFound,
    );
    expect_code(
        "validate no id",
        cl.c.controller
            .validate_volume_capabilities(validate("", vec![rwo()]))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        "validate no caps",
        cl.c.controller
            .validate_volume_capabilities(validate(name, vec![]))
            .await,
        Code::InvalidArgument,
    );

    // GetCapacity: what fits, less with more replicas.
    let cap = |r: &'static str| csi::GetCapacityRequest {
        volume_capabilities: vec![rwo()],
        parameters: HashMap::from([("replicas".to_string(), r.to_string())]),
        accessible_topology: None,
    };
    let one =
        cl.c.controller
            .get_capacity(cap("1"))
            .await
            .expect("GetCapacity")
            .into_inner();
    let three =
        cl.c.controller
            .get_capacity(cap("3"))
            .await
            .expect("GetCapacity")
            .into_inner();
    assert!(three.available_capacity > 0, "{three:?}");
    assert!(
        one.available_capacity > three.available_capacity * 2,
        "{one:?} vs {three:?}"
    );
    assert_eq!(one.maximum_volume_size, Some(16 << 40));

    // Delete: idempotent; unknown ids are fine; no id is not.
    let del = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.to_string(),
        ..Default::default()
    };
    for id in [name, name, "never-existed", "Not A Volume Id"] {
        cl.c.controller
            .delete_volume(del(id))
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {id}: {s:?}"));
    }
    expect_code(
        "delete no id",
        cl.c.controller.delete_volume(del("")).await,
        Code::InvalidArgument,
    );
    assert!(
        !cl.volume_ids().await.iter().any(|i| i == name),
        "{name} still listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_expand_unpublish() {
    let mut cl = cluster("csi-publish").await;
    let vol = cl.create("pub-vol", 32 * MIB, &[]).await.volume_id;

    // Bad input first.
    let ctl = &mut cl.c.controller;
    expect_code(
        "publish no volume",
        ctl.controller_publish_volume(publish_req("", "dev", rwo(), false))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        "publish no node",
        ctl.controller_publish_volume(publish_req(&vol, "", rwo(), false))
            .await,
        Code::InvalidArgument,
    );
    let mut no_cap = publish_req(&vol, "dev", rwo(), false);
    no_cap.volume_capability = None;
    expect_code(
        "publish no capability",
        ctl.controller_publish_volume(no_cap).await,
        Code::InvalidArgument,
    );
    expect_code(
        "publish unknown volume",
        ctl.controller_publish_volume(publish_req("no-such-volume", "dev", rwo(), false))
            .await,
        Code::NotFound,
    );
    expect_code(
        "publish unknown node",
        ctl.controller_publish_volume(publish_req(&vol, "no-such-node", rwo(), false))
            .await,
        Code::NotFound,
    );
    expect_code(
        "publish multi-node writer",
        ctl.controller_publish_volume(publish_req(
            &vol,
            "dev",
            mount_cap(Mode::MultiNodeMultiWriter, ""),
            false,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert!(!cl.served(&vol), "a refused publish served the volume");

    // Publish to `dev`: the context names its gateway's portal, the IQN and LUN 0, and the
    // gateway serves the target.
    let ctx =
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "dev", rwo(), false))
            .await
            .expect("ControllerPublishVolume")
            .into_inner()
            .publish_context;
    assert_eq!(ctx.get("portal"), Some(&cl.server.addr), "{ctx:?}");
    assert_eq!(ctx.get("iqn"), Some(&iqn(&vol)));
    assert_eq!(ctx.get("lun").map(String::as_str), Some("0"));
    assert_eq!(ctx.get("gateway").map(String::as_str), Some("dev"));
    wait_for(
        "the published volume's target",
        Duration::from_secs(20),
        || cl.served(&vol),
    )
    .await;
    assert_eq!(cl.capacity(&vol), 32 << 20);
    // Again: the same answer (and no new writer epoch: the session would be fenced otherwise).
    let again =
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "dev", rwo(), false))
            .await
            .expect("repeated publish")
            .into_inner()
            .publish_context;
    assert_eq!(again, ctx);
    assert_eq!(cl.published_nodes(&vol).await, vec!["dev".to_string()]);
    // Incompatible with the existing publication: ALREADY_EXISTS; another node: FAILED_PRECONDITION.
    expect_code(
        "publish read-only over read-write",
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "dev", rwo(), true))
            .await,
        Code::AlreadyExists,
    );
    expect_code(
        "second node for RWO",
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "node-b", rwo(), false))
            .await,
        Code::FailedPrecondition,
    );
    expect_code(
        "second node reading an RWO volume",
        cl.c.controller
            .controller_publish_volume(publish_req(
                &vol,
                "node-b",
                mount_cap(Mode::MultiNodeReaderOnly, ""),
                true,
            ))
            .await,
        Code::FailedPrecondition,
    );
    // A published volume is not deleted.
    expect_code(
        "delete while published",
        cl.c.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );

    // Expand while published: the initiator sees the new size.
    let expand =
        |bytes: i64, cap: Option<csi::VolumeCapability>| csi::ControllerExpandVolumeRequest {
            volume_id: vol.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capability: cap,
            ..Default::default()
        };
    let r =
        cl.c.controller
            .controller_expand_volume(expand(48 * MIB, Some(rwo())))
            .await
            .expect("expand")
            .into_inner();
    assert_eq!(r.capacity_bytes, 48 * MIB);
    assert!(
        r.node_expansion_required,
        "a filesystem volume needs the node to grow it"
    );
    wait_for(
        "READ CAPACITY to show 48 MiB",
        Duration::from_secs(20),
        || cl.capacity(&vol) == 48 << 20,
    )
    .await;
    let same =
        cl.c.controller
            .controller_expand_volume(expand(48 * MIB, Some(block_cap(Mode::SingleNodeWriter))))
            .await
            .expect("repeat")
            .into_inner();
    assert_eq!(same.capacity_bytes, 48 * MIB);
    assert!(
        !same.node_expansion_required,
        "a raw block volume needs nothing from the node"
    );
    let smaller =
        cl.c.controller
            .controller_expand_volume(expand(8 * MIB, None))
            .await
            .expect("smaller")
            .into_inner();
    assert_eq!(smaller.capacity_bytes, 48 * MIB, "volumes never shrink");
    let mut no_id = expand(64 * MIB, None);
    no_id.volume_id.clear();
    expect_code(
        "expand no id",
        cl.c.controller.controller_expand_volume(no_id).await,
        Code::InvalidArgument,
    );
    let mut no_range = expand(64 * MIB, None);
    no_range.capacity_range = None;
    expect_code(
        "expand no range",
        cl.c.controller.controller_expand_volume(no_range).await,
        Code::InvalidArgument,
    );
    let mut unknown = expand(64 * MIB, None);
    unknown.volume_id = "no-such-volume".into();
    expect_code(
        "expand unknown",
        cl.c.controller.controller_expand_volume(unknown).await,
        Code::NotFound,
    );
    expect_code(
        "expand beyond the limit",
        cl.c.controller
            .controller_expand_volume(expand(17 << 40, None))
            .await,
        Code::OutOfRange,
    );

    // Unpublish: the target goes away; repeating, or naming unknown things, is fine.
    expect_code(
        "unpublish no volume",
        cl.c.controller
            .controller_unpublish_volume(unpublish_req("", "dev"))
            .await,
        Code::InvalidArgument,
    );
    for (v, n) in [
        (vol.as_str(), "dev"),
        (vol.as_str(), "dev"),
        ("no-such-volume", "dev"),
        (vol.as_str(), "no-such-node"),
    ] {
        cl.c.controller
            .controller_unpublish_volume(unpublish_req(v, n))
            .await
            .unwrap_or_else(|s| panic!("unpublish {v} from {n}: {s:?}"));
    }
    assert!(cl.published_nodes(&vol).await.is_empty());
    wait_for(
        "the unpublished volume's target to go",
        Duration::from_secs(20),
        || !cl.served(&vol),
    )
    .await;

    // Now the other node may have it, and then it may be deleted once unpublished (no node id:
    // from every node).
    cl.c.controller
        .controller_publish_volume(publish_req(&vol, "node-b", rwo(), false))
        .await
        .expect("publish to node-b");
    assert_eq!(cl.published_nodes(&vol).await, vec!["node-b".to_string()]);
    cl.c.controller
        .controller_unpublish_volume(unpublish_req(&vol, ""))
        .await
        .expect("unpublish everywhere");
    assert!(cl.published_nodes(&vol).await.is_empty());
    cl.c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");

    // Every call was counted by method and code.
    let m = cl.metrics();
    for want in [
        r#"ironsan_csi_requests_total{method="ControllerPublishVolume",code="Ok"}"#,
        r#"ironsan_csi_requests_total{method="ControllerPublishVolume",code="FailedPrecondition"}"#,
        r#"ironsan_csi_requests_total{method="ControllerExpandVolume",code="OutOfRange"} 1"#,
        "ironsan_csi_request_seconds",
    ] {
        assert!(m.contains(want), "/metrics lacks {want}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_many_and_read_write_once_pod() {
    let mut cl = cluster("csi-rox").await;
    let vol = cl.create("rox-vol", 16 * MIB, &[]).await.volume_id;
    let rox = || mount_cap(Mode::MultiNodeReaderOnly, "");

    // Two readers: the first node's gateway serves, the second is pointed at it.
    let a =
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "dev", rox(), true))
            .await
            .expect("first reader")
            .into_inner()
            .publish_context;
    let b =
        cl.c.controller
            .controller_publish_volume(publish_req(&vol, "node-b", rox(), true))
            .await
            .expect("second reader")
            .into_inner()
            .publish_context;
    assert_eq!(a.get("gateway").map(String::as_str), Some("dev"));
    assert_eq!(b.get("gateway").map(String::as_str), Some("dev"), "{b:?}");
    assert_eq!(b.get("portal"), Some(&cl.server.addr));
    assert_eq!(
        cl.published_nodes(&vol).await,
        vec!["dev".to_string(), "node-b".to_string()]
    );
    wait_for("the shared target", Duration::from_secs(20), || {
        cl.served(&vol)
    })
    .await;
    // A writer cannot join readers.
    let late = publish_req(&vol, "node-b", rwo(), false);
    expect_code(
        "writer joining readers",
        cl.c.controller.controller_publish_volume(late).await,
        Code::AlreadyExists,
    );

    // The serving node leaves first: the other reader keeps the target.
    cl.c.controller
        .controller_unpublish_volume(unpublish_req(&vol, "dev"))
        .await
        .expect("unpublish dev");
    assert_eq!(cl.published_nodes(&vol).await, vec!["node-b".to_string()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(cl.served(&vol), "the last reader's target went away");
    cl.c.controller
        .controller_unpublish_volume(unpublish_req(&vol, "node-b"))
        .await
        .expect("unpublish node-b");
    assert!(cl.published_nodes(&vol).await.is_empty());
    wait_for("the target to go", Duration::from_secs(20), || {
        !cl.served(&vol)
    })
    .await;

    // ReadWriteOncePod: one node.
    let pod = cl.create("rwop-vol", 16 * MIB, &[]).await.volume_id;
    let rwop = || mount_cap(Mode::SingleNodeSingleWriter, "ext4");
    cl.c.controller
        .controller_publish_volume(publish_req(&pod, "dev", rwop(), false))
        .await
        .expect("RWOP publish");
    expect_code(
        "RWOP on a second node",
        cl.c.controller
            .controller_publish_volume(publish_req(&pod, "node-b", rwop(), false))
            .await,
        Code::FailedPrecondition,
    );
    cl.c.controller
        .controller_unpublish_volume(unpublish_req(&pod, "dev"))
        .await
        .expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lifecycle() {
    let mut cl = cluster("csi-snapshots").await;
    let vol = "pvc-snap-source";
    let other = "pvc-snap-other";
    cl.create(vol, 64 * MIB, &[]).await;
    cl.create(other, 16 * MIB, &[]).await;

    // CreateSnapshot: Kubernetes' name is the snapshot name; polled until ready to use.
    let name = "snapshot-0a1b2c3d-1111-2222-3333-444455556666";
    let id = format!("{vol}@{name}");
    let snap = cl.snapshot(vol, name).await;
    assert_eq!(snap.snapshot_id, id);
    assert_eq!(snap.source_volume_id, vol);
    assert_eq!(snap.size_bytes, 64 * MIB);
    assert!(
        snap.creation_time
            .as_ref()
            .is_some_and(|t| t.seconds > 1_700_000_000),
        "{snap:?}"
    );
    // Repeated once ready: the same snapshot, still ready.
    assert_eq!(cl.snapshot(vol, name).await, snap);
    // Another CSI name maps to `csi-<md5>`.
    let odd = cl.snapshot(vol, "Odd Snapshot Name").await;
    assert!(
        odd.snapshot_id.starts_with(&format!("{vol}@csi-")),
        "{}",
        odd.snapshot_id
    );
    let shown = admin(&cl.managers, &["volume", "snapshot", "list", vol, "--json"]);
    assert!(shown.contains(name), "{shown}");

    // The errors: the same name on another volume, an unknown volume, no name.
    expect_code(
        "CreateSnapshot of that name on another volume",
        cl.c.controller
            .create_snapshot(snapshot_req(other, name))
            .await,
        Code::AlreadyExists,
    );
    expect_code(
        "CreateSnapshot of an unknown volume",
        cl.c.controller
            .create_snapshot(snapshot_req("pvc-nosuch", "snapshot-x"))
            .await,
        Code::NotFound,
    );
    expect_code(
        "CreateSnapshot without a name",
        cl.c.controller.create_snapshot(snapshot_req(vol, "")).await,
        Code::InvalidArgument,
    );

    // ListSnapshots: by id, by source volume, all, in pages of one.
    let by_id = cl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_id.entries.len(), 1, "{by_id:?}");
    assert_eq!(by_id.entries[0].snapshot.as_ref(), Some(&snap));
    for unknown in [
        format!("{vol}@nosuch"),
        "pvc-nosuch@x".into(),
        "garbage".into(),
    ] {
        let r = cl
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: unknown.clone(),
                ..Default::default()
            })
            .await;
        assert!(r.entries.is_empty(), "{unknown}: {r:?}");
    }
    let mut want = vec![id.clone(), odd.snapshot_id.clone()];
    want.sort();
    let by_source = cl
        .snapshot_ids(csi::ListSnapshotsRequest {
            source_volume_id: vol.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_source, want);
    let none = cl
        .snapshot_ids(csi::ListSnapshotsRequest {
            source_volume_id: other.into(),
            ..Default::default()
        })
        .await;
    assert!(none.is_empty(), "{none:?}");
    let paged = cl
        .snapshot_ids(csi::ListSnapshotsRequest {
            max_entries: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(paged, want, "every snapshot once, in id order");
    expect_code(
        "ListSnapshots with a token it never gave",
        cl.c.controller
            .list_snapshots(csi::ListSnapshotsRequest {
                starting_token: "page-2".into(),
                ..Default::default()
            })
            .await,
        Code::Aborted,
    );

    // CreateVolume from the snapshot: its size at least, the source in the answer.
    let restored =
        cl.c.controller
            .create_volume(clone_req("pvc-from-snap", 64 * MIB, from_snapshot(&id)))
            .await
            .expect("CreateVolume from a snapshot")
            .into_inner()
            .volume
            .expect("volume");
    assert_eq!(restored.volume_id, "pvc-from-snap");
    assert_eq!(restored.capacity_bytes, 64 * MIB);
    assert_eq!(
        restored.content_source,
        Some(csi::VolumeContentSource {
            r#type: Some(from_snapshot(&id))
        })
    );
    let again =
        cl.c.controller
            .create_volume(clone_req("pvc-from-snap", 64 * MIB, from_snapshot(&id)))
            .await
            .expect("CreateVolume from a snapshot, repeated")
            .into_inner()
            .volume
            .expect("volume");
    assert_eq!(again, restored);
    let got = admin(&cl.managers, &["volume", "get", "pvc-from-snap", "--json"]);
    let got: serde_json::Value = serde_json::from_str(&got).expect("volume get --json");
    // Detached, the clone is not filled in the background: it keeps its source.
    assert_eq!(got["source"]["volume_name"], vol, "{got}");
    assert_eq!(got["source"]["snapshot_name"], name, "{got}");
    expect_code(
        "CreateVolume of that name from another source",
        cl.c.controller
            .create_volume(clone_req("pvc-from-snap", 64 * MIB, from_volume(other)))
            .await,
        Code::AlreadyExists,
    );
    // No size asked: the source's.
    let sized =
        cl.c.controller
            .create_volume(clone_req("pvc-from-snap-unsized", 0, from_snapshot(&id)))
            .await
            .expect("CreateVolume from a snapshot without a range")
            .into_inner()
            .volume
            .expect("volume");
    assert_eq!(sized.capacity_bytes, 64 * MIB);
    // Smaller than the source: OUT_OF_RANGE; unknown sources: NOT_FOUND.
    expect_code(
        "CreateVolume smaller than its snapshot",
        cl.c.controller
            .create_volume(clone_req("pvc-too-small", 32 * MIB, from_snapshot(&id)))
            .await,
        Code::OutOfRange,
    );
    for (what, source) in [
        (
            "an unknown snapshot",
            from_snapshot(&format!("{vol}@nosuch")),
        ),
        ("a malformed snapshot id", from_snapshot("garbage")),
        ("an unknown volume", from_volume("pvc-nosuch")),
    ] {
        expect_code(
            &format!("CreateVolume from {what}"),
            cl.c.controller
                .create_volume(clone_req("pvc-orphan", 64 * MIB, source))
                .await,
            Code::NotFound,
        );
    }
    assert!(!cl.volume_ids().await.contains(&"pvc-orphan".to_string()));

    // CreateVolume from a volume: its present content.
    let copy =
        cl.c.controller
            .create_volume(clone_req("pvc-from-vol", 128 * MIB, from_volume(vol)))
            .await
            .expect("CreateVolume from a volume")
            .into_inner()
            .volume
            .expect("volume");
    assert_eq!(copy.capacity_bytes, 128 * MIB);
    assert_eq!(
        copy.content_source,
        Some(csi::VolumeContentSource {
            r#type: Some(from_volume(vol))
        })
    );
    expect_code(
        "CreateVolume smaller than its source volume",
        cl.c.controller
            .create_volume(clone_req("pvc-too-small", 16 * MIB, from_volume(vol)))
            .await,
        Code::OutOfRange,
    );

    // DeleteSnapshot: refused while clones copy from it, then done, and repeatable.
    expect_code(
        "DeleteSnapshot while a clone copies from it",
        cl.c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    for v in ["pvc-from-snap", "pvc-from-snap-unsized"] {
        cl.c.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {v}: {s:?}"));
    }
    let start = Instant::now();
    loop {
        let r =
            cl.c.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await;
        match r {
            Ok(_) => break,
            // The deleted clones' dependency may take a moment to go.
            Err(s) if s.code() == Code::FailedPrecondition => {
                assert!(start.elapsed() < Duration::from_secs(30), "{s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("DeleteSnapshot: {s:?}"),
        }
    }
    for again in [id.clone(), format!("{vol}@nosuch"), "garbage".into()] {
        cl.c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: again.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteSnapshot {again} again: {s:?}"));
    }
    let left = cl
        .snapshot_ids(csi::ListSnapshotsRequest {
            source_volume_id: vol.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        left,
        vec![odd.snapshot_id.clone()],
        "a deleted snapshot is not listed"
    );
    expect_code(
        "DeleteSnapshot without an id",
        cl.c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_outcomes_from_a_fake_manager() {
    use ironsan_common::proto::manager as pb;
    let fake = fake_manager::FakeManager::start();
    {
        let mut s = fake.state();
        for (id, name, state) in [
            (1, "pvc-a", pb::VolumeState::VolumeAvailable),
            (2, "pvc-going", pb::VolumeState::VolumeDeleting),
        ] {
            s.volumes.push(pb::Volume {
                id,
                name: name.into(),
                size: 64 << 20,
                replicas: 3,
                chunk_size: 64 << 20,
                state: state as i32,
                ..Default::default()
            });
        }
    }
    let dir = TestDir::new("csi-fake-snapshots");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let _driver = CsiDriver::start(
        &endpoint,
        &[
            "--mode",
            "controller",
            "--node-id",
            "ctl",
            "--manager",
            &fake.addr,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let mut c = clients(&endpoint).await;

    // Slower than CreateSnapshot waits: answered not ready, in about 2 s, and again the same.
    fake.state().snapshot_polls = 1000;
    for _ in 0..2 {
        let start = Instant::now();
        let snap = c
            .controller
            .create_snapshot(snapshot_req("pvc-a", "snapshot-slow"))
            .await
            .expect("CreateSnapshot of a slow snapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        let took = start.elapsed();
        assert!(!snap.ready_to_use, "{snap:?}");
        assert_eq!(snap.snapshot_id, "pvc-a@snapshot-slow");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    assert_eq!(fake.state().count("create_snapshot"), 1);
    // Listed while being taken, not ready to use.
    let listed = c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner();
    assert_eq!(listed.entries.len(), 1, "{listed:?}");
    assert_eq!(
        listed.entries[0].snapshot.as_ref().map(|s| s.ready_to_use),
        Some(false)
    );

    // FAILED: INTERNAL with the reason, and deleted so that the retry starts afresh.
    {
        let mut s = fake.state();
        s.snapshot_polls = 0;
        s.snapshot_error = Some("replica node2 refused it".into());
    }
    let r = c
        .controller
        .create_snapshot(snapshot_req("pvc-a", "snapshot-bad"))
        .await;
    let status = r.expect_err("CreateSnapshot of a failing snapshot");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("replica node2 refused it"),
        "{status:?}"
    );
    let deleted = fake.state().requests::<pb::SnapshotRef>("delete_snapshot");
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_ne!(deleted[0].id, 0, "deleted by id");
    fake.state().snapshot_error = None;
    let retried = c
        .controller
        .create_snapshot(snapshot_req("pvc-a", "snapshot-bad"))
        .await
        .expect("CreateSnapshot retried")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert!(retried.ready_to_use, "{retried:?}");
    assert_eq!(fake.state().count("create_snapshot"), 3);

    // The source volume being deleted: the manager's FAILED_PRECONDITION passes through.
    expect_code(
        "CreateSnapshot of a volume being deleted",
        c.controller
            .create_snapshot(snapshot_req("pvc-going", "snapshot-late"))
            .await,
        Code::FailedPrecondition,
    );

    // A snapshot clones still copy from: DeleteSnapshot is FAILED_PRECONDITION.
    {
        let mut s = fake.state();
        let snap = s.volumes[0]
            .snapshots
            .iter_mut()
            .find(|x| x.name == "snapshot-bad")
            .expect("the retried snapshot");
        snap.dependents = vec![9];
    }
    expect_code(
        "DeleteSnapshot with dependents",
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: "pvc-a@snapshot-bad".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
}
