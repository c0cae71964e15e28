//! The CSI node plugin on this host, without an iSCSI initiator (this kernel has none): every
//! call's argument errors and their codes (as the kubernetes-csi sanity suite expects them),
//! NodeGetInfo and NodeGetCapabilities, unpublish and stats of things that are not there, a
//! staging record surviving a plugin restart, and the per-volume lock. Logging in for real,
//! mkfs, mounts and expansion are in `csi_vm.rs`, against the kernel initiator in a VM.

#[path = "support/csi.rs"]
mod csi_support;
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use csi::node_service_capability::rpc::Type as NodeCap;
use csi::volume_capability::access_mode::Mode;
use csi_support::*;
use support::*;
use tonic011::Code;

/// Fails (never skips) without iscsiadm: unstage asks it for sessions.
fn require_iscsiadm() {
    let found = ["/usr/sbin/iscsiadm", "/sbin/iscsiadm", "/usr/bin/iscsiadm"]
        .iter()
        .any(|p| Path::new(p).exists());
    assert!(
        found,
        "iscsiadm not found. Fix with:  apt-get install -y open-iscsi   (or run scripts/install-test-deps.sh as root)"
    );
}

struct Plugin {
    _dir: TestDir,
    driver: CsiDriver,
    root: std::path::PathBuf,
    c: Clients,
}

async fn plugin(label: &str, extra: &[&str]) -> Plugin {
    let dir = TestDir::new(label);
    let state = dir.path().join("state");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let state_arg = state.display().to_string();
    let mut args = vec![
        "--mode",
        "node",
        "--node-id",
        "node-a",
        "--state-dir",
        &state_arg,
        "--max-volumes",
        "17",
    ];
    args.extend_from_slice(extra);
    let driver = CsiDriver::start(&endpoint, &args);
    let c = clients(&endpoint).await;
    Plugin {
        root: dir.path().to_path_buf(),
        _dir: dir,
        driver,
        c,
    }
}

fn ctx(volume: &str) -> HashMap<String, String> {
    HashMap::from([
        ("portal".to_string(), "127.0.0.1:3260".to_string()),
        (
            "iqn".to_string(),
            format!("iqn.2026-11.io.ironsan:{volume}"),
        ),
        ("lun".to_string(), "0".to_string()),
        ("gateway".to_string(), "node-a".to_string()),
    ])
}

fn rw_mount() -> csi::VolumeCapability {
    mount_cap(Mode::SingleNodeWriter, "ext4")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_capabilities() {
    let mut p = plugin("csi-node-info", &["--zone", "zone-1"]).await;
    let info =
        p.c.node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(info.max_volumes_per_node, 17);
    let topo = info.accessible_topology.expect("topology").segments;
    assert_eq!(
        topo,
        HashMap::from([
            (
                "topology.csi.ironsan.io/node".to_string(),
                "node-a".to_string()
            ),
            (
                "topology.csi.ironsan.io/zone".to_string(),
                "zone-1".to_string()
            ),
        ])
    );
    let caps: Vec<i32> =
        p.c.node
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities
            .into_iter()
            .map(|c| match c.r#type {
                Some(csi::node_service_capability::Type::Rpc(r)) => r.r#type,
                None => panic!("capability without a type"),
            })
            .collect();
    for want in [
        NodeCap::StageUnstageVolume,
        NodeCap::GetVolumeStats,
        NodeCap::ExpandVolume,
        NodeCap::VolumeCondition,
        NodeCap::SingleNodeMultiWriter,
    ] {
        assert!(
            caps.contains(&(want as i32)),
            "{want:?} missing from {caps:?}"
        );
    }
    // Without --zone there is no zone segment.
    let mut q = plugin("csi-node-info-nozone", &[]).await;
    let topo =
        q.c.node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .accessible_topology
            .expect("topology")
            .segments;
    assert_eq!(topo.len(), 1, "{topo:?}");
    assert!(p.driver.stop() && q.driver.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors() {
    require_iscsiadm();
    let mut p = plugin("csi-node-args", &[]).await;
    let staging = p.root.join("staging").display().to_string();
    let target = p.root.join("target").display().to_string();
    let n = &mut p.c.node;
    let stage = |f: &dyn Fn(&mut csi::NodeStageVolumeRequest)| {
        let mut r = csi::NodeStageVolumeRequest {
            volume_id: "vol1".into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(rw_mount()),
            publish_context: ctx("vol1"),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let bad_stage: Vec<(&str, csi::NodeStageVolumeRequest)> = vec![
        ("no volume id", stage(&|r| r.volume_id.clear())),
        ("no staging path", stage(&|r| r.staging_target_path.clear())),
        (
            "relative staging path",
            stage(&|r| r.staging_target_path = "rel/path".into()),
        ),
        (
            "staging path with ..",
            stage(&|r| r.staging_target_path = "/a/../b".into()),
        ),
        ("no capability", stage(&|r| r.volume_capability = None)),
        (
            "multi-node writer",
            stage(&|r| r.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter, ""))),
        ),
        (
            "unsupported fs",
            stage(&|r| r.volume_capability = Some(mount_cap(Mode::SingleNodeWriter, "btrfs"))),
        ),
        // The sanity suite's publish context: a device, no iqn.
        (
            "no iqn",
            stage(&|r| r.publish_context = HashMap::from([("device".into(), "/dev/mock".into())])),
        ),
        (
            "iqn of another volume",
            stage(&|r| {
                r.publish_context
                    .insert("iqn".into(), "iqn.2026-11.io.ironsan:other".into());
            }),
        ),
        (
            "bad portal",
            stage(&|r| {
                r.publish_context
                    .insert("portal".into(), "-o update:1".into());
                r.publish_context.insert("gateway".into(), "node-b".into());
            }),
        ),
        (
            "bad lun",
            stage(&|r| {
                r.publish_context.insert("lun".into(), "x".into());
            }),
        ),
        (
            "half a CHAP pair",
            stage(&|r| {
                r.secrets.insert("username".into(), "u".into());
            }),
        ),
        (
            "secret with a newline",
            stage(&|r| {
                r.secrets.insert("username".into(), "u".into());
                r.secrets
                    .insert("password".into(), "p\nnode.startup = automatic".into());
            }),
        ),
        (
            "bad fsType in the volume context",
            stage(&|r| {
                r.volume_capability = Some(mount_cap(Mode::SingleNodeWriter, ""));
                r.volume_context.insert("fsType".into(), "ntfs".into());
            }),
        ),
    ];
    for (what, req) in bad_stage {
        expect_code(
            &format!("NodeStageVolume, {what}"),
            n.node_stage_volume(req).await,
            Code::InvalidArgument,
        );
    }
    expect_code(
        "NodeStageVolume of an id no IronSAN volume can have",
        n.node_stage_volume(stage(&|r| {
            r.volume_id = "Not_A_Volume".into();
            r.publish_context = ctx("Not_A_Volume");
        }))
        .await,
        Code::NotFound,
    );

    for (what, req) in [
        (
            "no volume id",
            csi::NodeUnstageVolumeRequest {
                staging_target_path: staging.clone(),
                ..Default::default()
            },
        ),
        (
            "no staging path",
            csi::NodeUnstageVolumeRequest {
                volume_id: "vol1".into(),
                ..Default::default()
            },
        ),
        (
            "relative staging path",
            csi::NodeUnstageVolumeRequest {
                volume_id: "vol1".into(),
                staging_target_path: "x".into(),
            },
        ),
    ] {
        expect_code(
            &format!("NodeUnstageVolume, {what}"),
            n.node_unstage_volume(req).await,
            Code::InvalidArgument,
        );
    }
    // Never staged here: nothing to undo.
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "vol1".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .expect("NodeUnstageVolume of a volume never staged is OK");

    let publish = |f: &dyn Fn(&mut csi::NodePublishVolumeRequest)| {
        let mut r = csi::NodePublishVolumeRequest {
            volume_id: "vol1".into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(rw_mount()),
            publish_context: ctx("vol1"),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (what, req) in [
        ("no volume id", publish(&|r| r.volume_id.clear())),
        ("no target path", publish(&|r| r.target_path.clear())),
        (
            "relative target path",
            publish(&|r| r.target_path = "t".into()),
        ),
        ("no capability", publish(&|r| r.volume_capability = None)),
        // The sanity suite's order: capability checked before anything about staging.
        (
            "no capability and no staging path",
            publish(&|r| {
                r.volume_capability = None;
                r.staging_target_path.clear();
            }),
        ),
    ] {
        expect_code(
            &format!("NodePublishVolume, {what}"),
            n.node_publish_volume(req).await,
            Code::InvalidArgument,
        );
    }
    for (what, req) in [
        (
            "no staging path",
            publish(&|r| r.staging_target_path.clear()),
        ),
        ("volume not staged", publish(&|_| {})),
    ] {
        expect_code(
            &format!("NodePublishVolume, {what}"),
            n.node_publish_volume(req).await,
            Code::FailedPrecondition,
        );
    }

    for (what, req) in [
        (
            "no volume id",
            csi::NodeUnpublishVolumeRequest {
                target_path: target.clone(),
                ..Default::default()
            },
        ),
        (
            "no target path",
            csi::NodeUnpublishVolumeRequest {
                volume_id: "vol1".into(),
                ..Default::default()
            },
        ),
    ] {
        expect_code(
            &format!("NodeUnpublishVolume, {what}"),
            n.node_unpublish_volume(req).await,
            Code::InvalidArgument,
        );
    }

    for (what, req) in [
        (
            "no volume id",
            csi::NodeGetVolumeStatsRequest {
                volume_path: "some/path".into(),
                ..Default::default()
            },
        ),
        (
            "no volume path",
            csi::NodeGetVolumeStatsRequest {
                volume_id: "vol1".into(),
                ..Default::default()
            },
        ),
    ] {
        expect_code(
            &format!("NodeGetVolumeStats, {what}"),
            n.node_get_volume_stats(req).await,
            Code::InvalidArgument,
        );
    }
    for (what, id, path) in [
        ("unknown volume", "vol1", "some/path"),
        ("unknown volume, existing path", "vol1", staging.as_str()),
        ("id no volume can have", "../../etc", "/"),
    ] {
        expect_code(
            &format!("NodeGetVolumeStats, {what}"),
            n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.into(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
    }

    for (what, req) in [
        (
            "no volume id",
            csi::NodeExpandVolumeRequest {
                volume_path: target.clone(),
                volume_capability: Some(rw_mount()),
                ..Default::default()
            },
        ),
        (
            "no volume path",
            csi::NodeExpandVolumeRequest {
                volume_id: "vol1".into(),
                volume_capability: Some(rw_mount()),
                ..Default::default()
            },
        ),
        (
            "unsupported capability",
            csi::NodeExpandVolumeRequest {
                volume_id: "vol1".into(),
                volume_path: target.clone(),
                volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, "")),
                ..Default::default()
            },
        ),
        (
            "negative capacity",
            csi::NodeExpandVolumeRequest {
                volume_id: "vol1".into(),
                volume_path: target.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                }),
                ..Default::default()
            },
        ),
    ] {
        expect_code(
            &format!("NodeExpandVolume, {what}"),
            n.node_expand_volume(req).await,
            Code::InvalidArgument,
        );
    }
    expect_code(
        "NodeExpandVolume of an unknown volume",
        n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "vol1".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    let log = p.driver.log_text();
    assert!(p.driver.stop(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_removes_what_is_there() {
    let mut p = plugin("csi-node-unpublish", &[]).await;
    let unpublish = |target: &Path| csi::NodeUnpublishVolumeRequest {
        volume_id: "vol1".into(),
        target_path: target.display().to_string(),
    };
    // Nothing there: OK, twice.
    let gone = p.root.join("pods/p1/mount");
    for _ in 0..2 {
        p.c.node
            .node_unpublish_volume(unpublish(&gone))
            .await
            .expect("unpublish of a missing target");
    }
    // An unmounted directory (a publish that failed before its mount) and a block target file.
    let dir = p.root.join("pods/p2/mount");
    std::fs::create_dir_all(&dir).unwrap();
    let file = p.root.join("pods/p3/dev");
    std::fs::create_dir_all(p.root.join("pods/p3")).unwrap();
    std::fs::write(&file, b"").unwrap();
    for t in [&dir, &file] {
        p.c.node
            .node_unpublish_volume(unpublish(t))
            .await
            .unwrap_or_else(|e| panic!("unpublish {}: {e:?}", t.display()));
        assert!(!t.exists(), "{} must be removed", t.display());
    }
    // A directory with something in it is not a target the plugin made: left alone, an error.
    let full = p.root.join("pods/p4/mount");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("data"), b"keep me").unwrap();
    expect_code(
        "unpublish of an unmounted, non-empty directory",
        p.c.node.node_unpublish_volume(unpublish(&full)).await,
        Code::Internal,
    );
    assert_eq!(std::fs::read(full.join("data")).unwrap(), b"keep me");
    assert!(p.driver.stop());
}

/// A staging record left by an earlier life of the plugin (whose session is gone: this host
/// has no initiator) is honoured after a restart: stats know the volume and report it
/// abnormal, publish refuses a different staging path and a volume without its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_record_survives_a_restart() {
    require_iscsiadm();
    let dir = TestDir::new("csi-node-record");
    let state = dir.path().join("state");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    let record = serde_json::json!({
        "version": 1,
        "volume_id": "vol9",
        "portal": "127.0.0.1:3260",
        "iqn": "iqn.2026-11.io.ironsan:vol9",
        "lun": 0,
        "device": "/dev/sdzz",
        "staging_path": staging,
        "staged": {"kind": "filesystem", "fs_type": "ext4", "flags": []},
        "access_mode": "SINGLE_NODE_WRITER",
        "read_only": false,
        "publishes": []
    });
    std::fs::write(state.join("vol9.json"), record.to_string()).unwrap();
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let driver = CsiDriver::start(
        &endpoint,
        &[
            "--mode",
            "node",
            "--node-id",
            "node-a",
            "--state-dir",
            &state.display().to_string(),
        ],
    );
    let mut n = clients(&endpoint).await.node;
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol9".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats of the staging path of a recorded volume")
        .into_inner();
    let cond = stats.volume_condition.expect("a volume condition");
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("no iSCSI session"), "{cond:?}");
    expect_code(
        "stats of a path the volume is not at",
        n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol9".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect_code(
        "stats of an existing path that is not the volume's",
        n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol9".into(),
            volume_path: dir.path().display().to_string(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    let publish = |staging: &Path| csi::NodePublishVolumeRequest {
        volume_id: "vol9".into(),
        staging_target_path: staging.display().to_string(),
        target_path: dir.path().join("target").display().to_string(),
        volume_capability: Some(rw_mount()),
        publish_context: ctx("vol9"),
        ..Default::default()
    };
    let s = expect_code(
        "publish from another staging path",
        n.node_publish_volume(publish(&dir.path().join("elsewhere")))
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("staged at"), "{s:?}");
    let s = expect_code(
        "publish of a volume whose disk is gone",
        n.node_publish_volume(publish(&staging)).await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("no disk"), "{s:?}");
    expect_code(
        "expand of a volume whose disk is gone",
        n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "vol9".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
    );
    expect_code(
        "stage at another staging path",
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "vol9".into(),
            staging_target_path: dir.path().join("elsewhere").display().to_string(),
            volume_capability: Some(rw_mount()),
            publish_context: ctx("vol9"),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    expect_code(
        "stage at the same path as a block volume",
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "vol9".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
            publish_context: ctx("vol9"),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    // Unstage at another path leaves the record; at its path it removes it (no session to
    // log out of), and a second unstage is a no-op.
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "vol9".into(),
        staging_target_path: dir.path().join("elsewhere").display().to_string(),
    })
    .await
    .expect("unstage at a path the volume is not staged at");
    assert!(state.join("vol9.json").exists());
    for _ in 0..2 {
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: "vol9".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage: {e:?}\n{}", driver.log_text()));
    }
    assert!(
        !state.join("vol9.json").exists(),
        "record removed by unstage"
    );
    assert!(driver.stop());
}

/// A stage that cannot reach its portal gives up with UNAVAILABLE (after the ~30 s discovery
/// wait); meanwhile another call on the same volume is ABORTED, and other volumes are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_portal_and_the_volume_lock() {
    require_iscsiadm();
    let mut p = plugin("csi-node-lock", &["--portal", "127.0.0.1:1"]).await;
    let staging = p.root.join("staging").display().to_string();
    let mut n1 = p.c.node.clone();
    let req = csi::NodeStageVolumeRequest {
        volume_id: "vol1".into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(rw_mount()),
        publish_context: ctx("vol1"),
        ..Default::default()
    };
    let t0 = Instant::now();
    let first = tokio::spawn({
        let req = req.clone();
        async move { n1.node_stage_volume(req).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    expect_code(
        "a second stage of the same volume meanwhile",
        p.c.node.node_stage_volume(req.clone()).await,
        Code::Aborted,
    );
    // Another volume is not blocked by vol1's call.
    p.c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: "vol2".into(),
            target_path: p.root.join("t2").display().to_string(),
        })
        .await
        .expect("a call on another volume");
    let r = first.await.unwrap();
    let s = expect_code("stage against a dead portal", r, Code::Unavailable);
    assert!(s.message().contains("127.0.0.1:1"), "{s:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(25) && took < Duration::from_secs(90),
        "gave up after {took:?}"
    );
    assert!(p.driver.stop());
}
