//! The operator commands as a process: `ironsan volume|node|status` against a fake manager in
//! the test process. Requests carry the parsed values, tables have their columns, `--json`
//! parses with the documented fields, and manager errors give one readable line and a
//! non-zero exit. Snapshot commands wait as the fake's snapshots progress (READY after a few
//! listings, or FAILED).

mod fake_manager;

use std::process::{Command, Output};

use fake_manager::FakeManager;
use ironsan_common::proto::manager as pb;
use serde_json::Value;
use tonic::Code;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn ironsan(fake: &FakeManager, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .args(["--manager", &fake.addr])
        .env_remove("IRONSAN_MANAGER")
        .env_remove("RUST_LOG")
        .output()
        .expect("run ironsan")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(fake: &FakeManager, args: &[&str]) -> String {
    let out = ironsan(fake, args);
    assert!(
        out.status.success(),
        "ironsan {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a command that must fail; returns its stderr.
fn fails(fake: &FakeManager, args: &[&str]) -> String {
    let out = ironsan(fake, args);
    assert!(
        !out.status.success(),
        "ironsan {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// Runs a command that must exit with `code` (1: refused, 2: usage); returns its stderr.
fn exits(fake: &FakeManager, code: i32, args: &[&str]) -> String {
    let out = ironsan(fake, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ironsan {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The table's rows (header first), each split into its cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn volume_commands() {
    let fake = FakeManager::start();

    let out = ok(
        &fake,
        &[
            "volume",
            "create",
            "vol1",
            "--size",
            "10GiB",
            "--replicas",
            "2",
            "--chunk-size",
            "32MiB",
        ],
    );
    assert!(out.contains("Name:") && out.contains("vol1"), "{out}");
    assert!(out.contains("10GiB"), "{out}");
    let out = ok(
        &fake,
        &["volume", "create", "vol2", "--size", "1536MiB", "--json"],
    );
    assert_eq!(json(&out)["name"], "vol2");
    assert_eq!(
        fake.state()
            .requests::<pb::CreateVolumeRequest>("create_volume"),
        vec![
            pb::CreateVolumeRequest {
                name: "vol1".into(),
                size: 10 * GIB,
                replicas: 2,
                chunk_size: 32 * MIB,
                qos: None,
            },
            pb::CreateVolumeRequest {
                name: "vol2".into(),
                size: 1536 * MIB,
                replicas: 0,
                chunk_size: 0,
                qos: None,
            },
        ]
    );

    // vol2 is attached, published read-only to two nodes, and degraded.
    {
        let mut s = fake.state();
        let v = s.volumes.iter_mut().find(|v| v.name == "vol2").unwrap();
        v.degraded_chunks = 4;
        v.used_bytes = 3 * GIB;
        v.attachment = Some(pb::Attachment {
            volume_id: v.id,
            gateway: "gw-a".into(),
            writer_epoch: 9,
            lease_expires_ms: 1_700_000_010_000,
            lease_ms: 10_000,
            portal: "10.0.0.1:3260".into(),
            readonly: true,
            published: vec!["gw-a".into(), "node-b".into()],
            work: false,
        });
    }
    let table = ok(&fake, &["volume", "list"]);
    assert_eq!(
        rows(&table),
        vec![
            vec![
                "NAME",
                "ID",
                "SIZE",
                "USED",
                "REPLICAS",
                "CHUNK",
                "STATE",
                "DEGRADED",
                "ATTACHED",
                "PORTAL",
                "PUBLISHED",
                "SOURCE",
                "QOS"
            ],
            vec![
                "vol1",
                "1",
                "10GiB",
                "0B",
                "2",
                "32MiB",
                "available",
                "0",
                "-",
                "-",
                "-",
                "-",
                "-"
            ],
            vec![
                "vol2",
                "2",
                "1.5GiB",
                "3GiB",
                "3",
                "64MiB",
                "available",
                "4",
                "gw-a",
                "10.0.0.1:3260",
                "ro:gw-a,node-b",
                "-",
                "-"
            ],
        ],
        "{table}"
    );
    // Columns line up: every row's second column starts where the header's does.
    let lines: Vec<&str> = table.lines().collect();
    let id_col = lines[0].find("ID").unwrap();
    assert!(lines[1..]
        .iter()
        .all(|l| l[id_col..].starts_with(char::is_numeric)));

    let list = json(&ok(&fake, &["volume", "list", "--json"]));
    let vols = list["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0]["name"], "vol1");
    assert_eq!(vols[0]["size"], 10 * GIB);
    assert_eq!(vols[0]["chunk_size"], 32 * MIB);
    assert_eq!(vols[0]["state"], "available");
    assert_eq!(vols[0]["attachment"], Value::Null);
    assert_eq!(vols[1]["degraded_chunks"], 4);
    assert_eq!(vols[1]["attachment"]["gateway"], "gw-a");
    assert_eq!(vols[1]["attachment"]["writer_epoch"], 9);
    assert_eq!(vols[1]["attachment"]["portal"], "10.0.0.1:3260");
    assert_eq!(vols[1]["attachment"]["readonly"], true);
    assert_eq!(
        vols[1]["attachment"]["published"],
        serde_json::json!(["gw-a", "node-b"])
    );

    let v = json(&ok(&fake, &["volume", "get", "vol2", "--json"]));
    assert_eq!(
        (v["id"].as_u64(), v["replicas"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(
        fake.state().requests::<pb::VolumeRef>("get_volume"),
        vec![pb::VolumeRef {
            id: 0,
            name: "vol2".into()
        }]
    );
    let out = ok(&fake, &["volume", "get", "vol2"]);
    assert!(
        out.contains("Attached to:") && out.contains("gw-a"),
        "{out}"
    );
    assert!(
        out.contains("Portal:") && out.contains("10.0.0.1:3260"),
        "{out}"
    );
    assert!(
        out.contains("Published to:") && out.contains("gw-a, node-b (read-only)"),
        "{out}"
    );

    let out = ok(&fake, &["volume", "resize", "vol1", "20GiB"]);
    assert!(out.contains("20GiB"), "{out}");
    let resizes = fake
        .state()
        .requests::<pb::ResizeVolumeRequest>("resize_volume");
    assert_eq!(resizes.len(), 1);
    assert_eq!(resizes[0].size, 20 * GIB);
    assert_eq!(resizes[0].volume.as_ref().unwrap().name, "vol1");

    // Manager refusals: one readable line, non-zero exit.
    let err = fails(&fake, &["volume", "resize", "vol1", "1GiB"]);
    assert_eq!(err.trim(), r#"error: volume "vol1": volumes cannot shrink"#);
    let err = fails(&fake, &["volume", "create", "vol1", "--size", "1GiB"]);
    assert_eq!(err.trim(), r#"error: volume "vol1" already exists"#);

    let out = ok(&fake, &["volume", "delete", "vol2"]);
    assert_eq!(out.trim(), r#"volume "vol2" deleted"#);
    let err = fails(&fake, &["volume", "get", "vol2"]);
    assert_eq!(err.trim(), r#"error: volume "vol2" not found"#);
    let err = fails(&fake, &["volume", "delete", "vol2", "--json"]);
    assert_eq!(err.trim(), r#"error: volume "vol2" not found"#);

    // Other statuses keep the manager's message.
    fake.state()
        .fail
        .insert("list_volumes", (Code::Internal, "disk on fire".into()));
    let err = fails(&fake, &["volume", "list"]);
    assert!(err.contains("disk on fire"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_input_fails_before_any_call() {
    let fake = FakeManager::start();
    let err = fails(&fake, &["volume", "create", "x", "--size", "10XB"]);
    assert!(
        err.contains("--size") && err.contains("unknown unit"),
        "{err}"
    );
    let err = fails(
        &fake,
        &["volume", "create", "x", "--size", "1GiB", "--replicas", "0"],
    );
    assert!(err.contains("--replicas"), "{err}");
    let err = fails(&fake, &["volume", "resize", "x", "big"]);
    assert!(err.contains("big"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["volume", "list", "--manager", "127.0.0.1:1,,b:2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty entry"), "{err}");
    assert!(fake.state().calls.is_empty(), "a call was made");
}

#[test]
fn manager_address_from_the_environment() {
    let fake = FakeManager::start();
    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["volume", "list", "--json"])
        .env("IRONSAN_MANAGER", format!(" 127.0.0.1:1 , {} ", fake.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout))["volumes"],
        serde_json::json!([])
    );
    assert_eq!(fake.state().count("list_volumes"), 1);
}

fn disk(path: &str, state: pb::DiskState, capacity: u64, free: u64) -> pb::Disk {
    pb::Disk {
        path: path.into(),
        state: state as i32,
        capacity,
        free,
    }
}

#[test]
fn node_and_status_commands() {
    let fake = FakeManager::start();
    {
        let mut s = fake.state();
        s.nodes = vec![
            pb::Node {
                id: "s2".into(),
                addr: "10.0.0.2:7500".into(),
                zone: "b".into(),
                state: pb::NodeState::NodeDown as i32,
                capacity: 100 * GIB,
                free: 0,
                disks: vec![disk("/d0", pb::DiskState::DiskFailed, 100 * GIB, 0)],
                allocated: 10 * GIB,
                chunks: 160,
                last_seen_ms_ago: 192_000,
            },
            pb::Node {
                id: "s1".into(),
                addr: "10.0.0.1:7500".into(),
                zone: "a".into(),
                state: pb::NodeState::NodeUp as i32,
                capacity: 2048 * GIB,
                free: 1536 * GIB + 100 * MIB,
                disks: vec![
                    disk("/d0", pb::DiskState::DiskHealthy, 1024 * GIB, 768 * GIB),
                    disk(
                        "/d1",
                        pb::DiskState::DiskFull,
                        1024 * GIB,
                        768 * GIB + 100 * MIB,
                    ),
                ],
                allocated: 64 * GIB,
                chunks: 1024,
                last_seen_ms_ago: 850,
            },
        ];
        s.status = pb::ClusterStatus {
            answered_by: 2,
            leader: 1,
            term: 7,
            commit_index: 1200,
            applied_index: 1199,
            members: vec![
                pb::Member {
                    id: 1,
                    addr: "10.0.0.11:7400".into(),
                    leader: true,
                    matched: 1200,
                    voter: true,
                },
                pb::Member {
                    id: 2,
                    addr: "10.0.0.12:7400".into(),
                    leader: false,
                    matched: 1199,
                    voter: true,
                },
            ],
            nodes_up: 1,
            nodes_down: 1,
            nodes_draining: 0,
            provisioned_bytes: 30 * GIB,
            capacity_bytes: 200 * GIB,
            volumes: 3,
            chunks: 480,
            degraded_chunks: 160,
            recovery_tasks: 12,
            recovery_bytes_copied: 192 << 20,
            recovery_bytes_total: 768 << 20,
            snapshot_index: 1000,
            members_seen: vec![1, 2],
        };
    }

    let table = ok(&fake, &["node", "list"]);
    assert_eq!(
        rows(&table),
        vec![
            vec![
                "ID",
                "ADDR",
                "ZONE",
                "STATE",
                "CAPACITY",
                "FREE",
                "ALLOCATED",
                "CHUNKS",
                "LAST",
                "SEEN"
            ],
            vec![
                "s1",
                "10.0.0.1:7500",
                "a",
                "up",
                "2TiB",
                "1.5TiB",
                "64GiB",
                "1024",
                "850ms"
            ],
            vec![
                "s2",
                "10.0.0.2:7500",
                "b",
                "down",
                "100GiB",
                "0B",
                "10GiB",
                "160",
                "3m12s"
            ],
        ],
        "{table}"
    );
    let nodes = json(&ok(&fake, &["node", "list", "--json"]));
    let n = &nodes["nodes"][0];
    assert_eq!(n["id"], "s1");
    assert_eq!(n["state"], "up");
    assert_eq!(n["capacity"], 2048 * GIB);
    assert_eq!(n["last_seen_ms_ago"], 850);
    assert_eq!(n["disks"][1]["state"], "full");
    assert_eq!(n["disks"][1]["path"], "/d1");

    let drained = json(&ok(&fake, &["node", "drain", "s1", "--json"]));
    assert_eq!(drained["state"], "draining");
    assert_eq!(
        fake.state().requests::<pb::DrainNodeRequest>("drain_node"),
        vec![pb::DrainNodeRequest { id: "s1".into() }]
    );
    let err = fails(&fake, &["node", "drain", "s9"]);
    assert_eq!(err.trim(), r#"error: node "s9" not found"#);

    let text = ok(&fake, &["status"]);
    let line = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in:\n{text}"))
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_string()
    };
    assert_eq!(line("Leader"), "1 (term 7)");
    assert_eq!(line("Raft log"), "commit 1200, applied 1199, snapshot 1000");
    assert_eq!(line("Nodes"), "1 up, 1 down, 0 draining");
    assert_eq!(line("Chunks"), "480 (160 degraded)");
    assert_eq!(line("Recovery tasks"), "12 (192MiB of 768MiB copied, 25%)");
    assert_eq!(line("Provisioned"), "30GiB of 200GiB raw (0.15x)");
    let members: Vec<Vec<String>> = rows(&text)
        .into_iter()
        .skip_while(|r| r.first().map(String::as_str) != Some("MEMBER"))
        .collect();
    assert_eq!(
        members,
        vec![
            vec!["MEMBER", "ADDR", "ROLE", "MATCHED"],
            vec!["1", "10.0.0.11:7400", "leader", "1200"],
            vec!["2", "10.0.0.12:7400", "follower", "1199"],
        ],
        "{text}"
    );
    let st = json(&ok(&fake, &["status", "--json"]));
    assert_eq!(st["leader"], 1);
    assert_eq!(st["term"], 7);
    assert_eq!(st["commit_index"], 1200);
    assert_eq!(st["applied_index"], 1199);
    assert_eq!(st["nodes_up"], 1);
    assert_eq!(st["nodes_down"], 1);
    assert_eq!(st["degraded_chunks"], 160);
    assert_eq!(st["recovery_tasks"], 12);
    assert_eq!(st["recovery_bytes_copied"], 192u64 << 20);
    assert_eq!(st["recovery_bytes_total"], 768u64 << 20);
    assert_eq!(st["members"][0]["leader"], true);
    assert_eq!(st["members"][1]["matched"], 1199);
}

#[test]
fn volume_qos_commands() {
    let fake = FakeManager::start();
    let out = ok(
        &fake,
        &[
            "volume",
            "create",
            "lim",
            "--size",
            "1GiB",
            "--write-iops",
            "200",
            "--read-bps",
            "100MiB",
            "--burst",
            "2s",
        ],
    );
    assert!(
        out.contains("QoS:") && out.contains("read 100MiB/s, write 200 IOPS, burst 2s"),
        "{out}"
    );
    let want = pb::VolumeQos {
        read_iops: 0,
        write_iops: 200,
        read_bps: 100 * MIB,
        write_bps: 0,
        burst_ms: Some(2000),
    };
    let creates = fake
        .state()
        .requests::<pb::CreateVolumeRequest>("create_volume");
    assert_eq!(creates[0].qos, Some(want));
    let table = ok(&fake, &["volume", "list"]);
    assert_eq!(
        rows(&table)[1].last().map(String::as_str),
        Some("read:100MiB/s,write:200iops,burst:2s"),
        "{table}"
    );

    // A live change keeps the limits it does not name.
    let v = json(&ok(
        &fake,
        &["volume", "qos", "lim", "--write-iops", "500", "--json"],
    ));
    assert_eq!(v["qos"]["write_iops"], 500);
    assert_eq!(v["qos"]["read_bps"], 100 * MIB);
    assert_eq!(v["qos"]["burst_ms"], 2000);
    let sets = fake
        .state()
        .requests::<pb::SetVolumeQosRequest>("set_volume_qos");
    assert_eq!(
        sets[0].qos,
        Some(pb::VolumeQos {
            write_iops: 500,
            ..want
        })
    );
    // --clear sends no limits at all.
    let v = json(&ok(&fake, &["volume", "qos", "lim", "--clear", "--json"]));
    assert_eq!(v["qos"], Value::Null);
    let sets = fake
        .state()
        .requests::<pb::SetVolumeQosRequest>("set_volume_qos");
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[1].qos, None);
    let out = ok(&fake, &["volume", "get", "lim"]);
    assert!(out.contains("unlimited"), "{out}");

    // Nothing named: refused before any request.
    let err = fails(&fake, &["volume", "qos", "lim"]);
    assert!(
        err.trim().starts_with("error: nothing to change") && err.trim().lines().count() == 1,
        "{err}"
    );
    let err = fails(&fake, &["volume", "qos", "missing", "--write-iops", "1"]);
    assert_eq!(err.trim(), r#"error: volume "missing" not found"#);
}

/// The fake's snapshot `name` of volume `volume`.
fn fake_snapshot<'a>(
    s: &'a mut fake_manager::State,
    volume: &str,
    name: &str,
) -> &'a mut pb::Snapshot {
    s.volumes
        .iter_mut()
        .find(|v| v.name == volume)
        .and_then(|v| v.snapshots.iter_mut().find(|x| x.name == name))
        .unwrap_or_else(|| panic!("no snapshot {volume}@{name}"))
}

#[test]
fn snapshot_commands() {
    let fake = FakeManager::start();
    ok(&fake, &["volume", "create", "vol1", "--size", "1GiB"]);

    // Waits until READY: the fake keeps it CREATING for three listings, polled every 100 ms.
    let out = ok(&fake, &["volume", "snapshot", "create", "vol1", "s1"]);
    let secs = out
        .trim()
        .strip_prefix("snapshot vol1@s1 ready in ")
        .and_then(|r| r.strip_suffix(" s"))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(secs >= 0.3, "{out}");
    {
        let s = fake.state();
        assert_eq!(
            s.requests::<pb::CreateSnapshotRequest>("create_snapshot"),
            vec![pb::CreateSnapshotRequest {
                volume: Some(pb::VolumeRef {
                    id: 0,
                    name: "vol1".into()
                }),
                name: "s1".into(),
            }]
        );
        let times = s.times("list_snapshots");
        assert_eq!(times.len(), 4, "three CREATING listings, then READY");
        assert!(times
            .windows(2)
            .all(|w| w[1] - w[0] >= std::time::Duration::from_millis(95)));
    }

    // --no-wait returns once requested, without polling.
    let out = ok(
        &fake,
        &["volume", "snapshot", "create", "vol1", "s2", "--no-wait"],
    );
    assert_eq!(out.trim(), "snapshot vol1@s2 requested (creating)");
    assert_eq!(fake.state().count("list_snapshots"), 4);

    fake_snapshot(&mut fake.state(), "vol1", "s1").dependents = vec![7];
    let table = ok(&fake, &["volume", "snapshot", "list", "vol1"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows(lines[0]),
        vec![vec!["NAME", "ID", "STATE", "SIZE", "CREATED", "NOTE"]],
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].starts_with("s1  ")
            && lines[1].contains(" ready ")
            && lines[1].contains(" 1GiB ")
            && lines[1].contains("2023-11-14 22:13:21 UTC")
            && lines[1].ends_with("1 volume(s) still copying from it"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("s2  ") && lines[2].contains(" creating "),
        "{table}"
    );
    let list = json(&ok(
        &fake,
        &["volume", "snapshot", "list", "vol1", "--json"],
    ));
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["volume_name"], "vol1");
    assert_eq!(snaps[0]["state"], "ready");
    assert_eq!(snaps[0]["size"], GIB);
    assert_eq!(snaps[0]["created_ms"], 1_700_000_001_000u64);
    assert_eq!(snaps[0]["ready_ms"], 1_700_000_001_420u64);
    assert_eq!(snaps[0]["dependents"], serde_json::json!([7]));
    let v = json(&ok(&fake, &["volume", "get", "vol1", "--json"]));
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["source"], Value::Null);
    let out = ok(&fake, &["volume", "get", "vol1"]);
    assert!(
        out.contains("Snapshots:") && out.contains("2 (1 ready)"),
        "{out}"
    );

    // A snapshot that cannot be taken, one that takes too long.
    fake.state().snapshot_error = Some("replica s3 did not answer".into());
    let err = exits(&fake, 1, &["volume", "snapshot", "create", "vol1", "bad"]);
    assert_eq!(
        err.trim(),
        r#"error: snapshot "vol1@bad" failed: replica s3 did not answer"#
    );
    {
        let mut s = fake.state();
        s.snapshot_error = None;
        s.snapshot_polls = 1000;
    }
    let err = exits(
        &fake,
        1,
        &[
            "volume",
            "snapshot",
            "create",
            "vol1",
            "slow",
            "--timeout",
            "300ms",
        ],
    );
    assert!(
        err.starts_with(r#"error: snapshot "vol1@slow" is still being taken after 300ms"#)
            && err.trim().lines().count() == 1,
        "{err}"
    );
    fake.state().snapshot_polls = 3;

    // Refusals: one line, exit 1.
    let err = exits(&fake, 1, &["volume", "snapshot", "create", "vol1", "s1"]);
    assert_eq!(err.trim(), r#"error: snapshot "vol1@s1" already exists"#);
    let err = exits(&fake, 1, &["volume", "snapshot", "create", "nope", "s1"]);
    assert_eq!(err.trim(), r#"error: volume "nope" not found"#);
    let err = exits(&fake, 1, &["volume", "snapshot", "list", "nope"]);
    assert_eq!(err.trim(), r#"error: volume "nope" not found"#);
    let err = exits(
        &fake,
        1,
        &["volume", "snapshot", "delete", "vol1", "nosuch"],
    );
    assert_eq!(err.trim(), r#"error: snapshot "vol1@nosuch" not found"#);
    let err = exits(&fake, 1, &["volume", "snapshot", "delete", "vol1", "s1"]);
    assert_eq!(
        err.trim(),
        r#"error: snapshot "vol1@s1": volumes [7] still copy from it"#
    );

    // Delete waits until the record is gone; --no-wait only marks.
    fake_snapshot(&mut fake.state(), "vol1", "s1")
        .dependents
        .clear();
    let out = ok(&fake, &["volume", "snapshot", "delete", "vol1", "s1"]);
    assert_eq!(out.trim(), "snapshot vol1@s1 deleted");
    let list = json(&ok(
        &fake,
        &["volume", "snapshot", "list", "vol1", "--json"],
    ));
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(!names.contains(&"s1"), "{list}");
    let out = ok(
        &fake,
        &["volume", "snapshot", "delete", "vol1", "s2", "--no-wait"],
    );
    assert_eq!(out.trim(), "snapshot vol1@s2 marked for deletion");
    assert_eq!(
        fake.state()
            .requests::<pb::SnapshotRef>("delete_snapshot")
            .last(),
        Some(&pb::SnapshotRef {
            id: 0,
            volume: Some(pb::VolumeRef {
                id: 0,
                name: "vol1".into()
            }),
            name: "s2".into(),
        })
    );

    // Restore rolls a detached volume back.
    ok(&fake, &["volume", "snapshot", "create", "vol1", "s3"]);
    let out = ok(&fake, &["volume", "snapshot", "restore", "vol1", "s3"]);
    assert_eq!(
        out.trim(),
        r#"volume "vol1" restored to snapshot "s3" (chunks are refilled before their next I/O)"#
    );
    let out = ok(&fake, &["volume", "get", "vol1"]);
    assert!(
        out.contains("Source:") && out.contains("restore of snapshot s3, 16 chunks left"),
        "{out}"
    );
    fake.state().volumes[0].attachment = Some(pb::Attachment {
        gateway: "gw-a".into(),
        ..Default::default()
    });
    let err = exits(&fake, 1, &["volume", "snapshot", "restore", "vol1", "s3"]);
    assert_eq!(
        err.trim(),
        r#"error: snapshot "vol1@s3": the volume is attached"#
    );
}

#[test]
fn clone_commands() {
    let fake = FakeManager::start();
    ok(&fake, &["volume", "create", "src", "--size", "10GiB"]);
    ok(&fake, &["volume", "snapshot", "create", "src", "s1"]);

    let out = ok(&fake, &["volume", "clone", "c1", "--from", "src@s1"]);
    assert!(
        out.contains("Source:") && out.contains("clone of src@s1, 160 chunks left"),
        "{out}"
    );
    assert!(
        out.contains("Snapshots:") && out.contains("0 (0 ready)"),
        "{out}"
    );
    let v = json(&ok(
        &fake,
        &[
            "volume",
            "clone",
            "c2",
            "--from",
            "src",
            "--size",
            "20GiB",
            "--replicas",
            "2",
            "--write-iops",
            "100",
            "--json",
        ],
    ));
    assert_eq!(v["size"], 20 * GIB);
    assert_eq!(v["replicas"], 2);
    assert_eq!(v["qos"]["write_iops"], 100);
    assert_eq!(v["source"]["volume_name"], "src");
    assert_eq!(v["source"]["chunks_left"], 320);
    let src = pb::VolumeRef {
        id: 0,
        name: "src".into(),
    };
    assert_eq!(
        fake.state()
            .requests::<pb::CloneVolumeRequest>("clone_volume"),
        vec![
            pb::CloneVolumeRequest {
                name: "c1".into(),
                source: Some(src.clone()),
                snapshot: "s1".into(),
                size: 0,
                replicas: 0,
                qos: None,
            },
            pb::CloneVolumeRequest {
                name: "c2".into(),
                source: Some(src),
                snapshot: String::new(),
                size: 20 * GIB,
                replicas: 2,
                qos: Some(pb::VolumeQos {
                    write_iops: 100,
                    ..Default::default()
                }),
            },
        ]
    );
    let table = rows(&ok(&fake, &["volume", "list"]));
    let source_col = table[0].iter().position(|h| h == "SOURCE").unwrap();
    let cell = |name: &str| {
        table
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[source_col].clone())
    };
    assert_eq!(cell("c1").as_deref(), Some("src@s1"));
    assert_eq!(cell("src").as_deref(), Some("-"));
    let out = ok(&fake, &["volume", "get", "src"]);
    assert!(out.contains("1 (1 ready)"), "{out}");

    // --from is VOLUME or VOLUME@SNAPSHOT: anything else is a usage error, before any call.
    let calls = fake.state().calls.len();
    for bad in ["", "@s1", "src@", "src@s1@s2", "@"] {
        let err = exits(&fake, 2, &["volume", "clone", "c9", "--from", bad]);
        assert!(err.contains("--from"), "{bad:?}: {err}");
    }
    assert_eq!(fake.state().calls.len(), calls, "a call was made");

    let err = exits(&fake, 1, &["volume", "clone", "c3", "--from", "nope"]);
    assert_eq!(err.trim(), r#"error: volume "nope" not found"#);
    let err = exits(&fake, 1, &["volume", "clone", "c3", "--from", "src@nope"]);
    assert_eq!(err.trim(), r#"error: snapshot "src@nope" not found"#);
    let err = exits(&fake, 1, &["volume", "clone", "c1", "--from", "src"]);
    assert_eq!(err.trim(), r#"error: volume "c1" already exists"#);
    let err = exits(
        &fake,
        1,
        &[
            "volume", "clone", "c3", "--from", "src@s1", "--size", "1GiB",
        ],
    );
    assert!(err.starts_with("error: invalid request: size"), "{err}");
}
