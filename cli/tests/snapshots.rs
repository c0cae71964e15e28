//! Snapshots, clones and restores through real iSCSI clients, against a cluster of processes
//! (one manager, four storage daemons, one gateway):
//!
//! - pattern A, snapshot, pattern B: the snapshot's read-only target reads A, the volume B, and
//!   the snapshot target refuses writes;
//! - a clone from the snapshot reads A at once, takes writes of its own without touching its
//!   source, and becomes independent (its chunks filled in the background);
//! - a storage daemon holding the volume is killed after the snapshot: once redundancy is back,
//!   every replica of every chunk (the rebuilt ones included) holds the snapshot, and it still
//!   reads A;
//! - deleting the snapshot frees the space its copies took; restore rolls a detached volume
//!   back; a detached volume is snapshotted through a work attachment that is released after;
//! - bad input: unknown volume, duplicate name, a clone smaller than its source, restore of an
//!   attached volume, deleting a snapshot a clone still copies from;
//! - crash consistency: a writer alternates numbered writes to two chunks while snapshots are
//!   taken; every snapshot holds the two chunks at one point between writes.

mod cluster;
mod support;

#[path = "support/libiscsi.rs"]
mod libiscsi;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterConfig, Node};
use ironsan_common::proto::manager as pb;
use ironsan_storage::{ChunkId, Client, ClientConfig};
use libiscsi::{Session, SessionConfig};
use serde_json::Value;
use support::{iqn, qemu_verify, qemu_write, require_qemu_iscsi};

const MIB: u64 = 1 << 20;

fn url(c: &Cluster, target: &str) -> String {
    format!("iscsi://{}/{}/0", c.portal(1), iqn(target))
}

/// Runs an admin command that must fail with exit 1 and an `error:` line containing `needle`.
fn refused(c: &Cluster, args: &[&str], needle: &str) {
    let r = c.admin(args);
    assert_eq!(r.status.code(), Some(1), "{}", r.describe());
    assert!(
        r.stderr.starts_with("error:") && r.stderr.to_lowercase().contains(needle),
        "{args:?}: expected an error mentioning {needle:?}: {}",
        r.describe()
    );
}

fn snapshots(c: &Cluster, volume: &str) -> Vec<Value> {
    c.admin(&["volume", "snapshot", "list", volume, "--json"])
        .expect_ok("snapshot list")
        .json()["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn snapshot_id(c: &Cluster, volume: &str, name: &str) -> u64 {
    snapshots(c, volume)
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["id"].as_u64())
        .unwrap_or_else(|| panic!("snapshot {volume}@{name} is listed"))
}

/// Polls `check` every 200 ms until it answers true, or panics after `within`.
fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `qemu-io -r` (read-only: a snapshot's LUN is write-protected, which qemu refuses to open
/// read-write) checking `len` bytes of `pattern` at `offset`.
fn verify_ro(url: &str, offset: u64, len: u64, pattern: u8) -> support::Run {
    let r = support::run(
        "qemu-io",
        [
            "-r".to_string(),
            "-f".into(),
            "raw".into(),
            "-c".into(),
            format!("read -P 0x{pattern:02x} {offset} {len}"),
            url.to_string(),
        ],
    );
    assert!(
        !r.ok() || !format!("{}{}", r.stdout, r.stderr).contains("Pattern verification failed"),
        "{}",
        r.describe()
    );
    r
}

/// Waits until the gateway exports `target` (snapshots appear on its next poll).
fn wait_target(c: &Cluster, target: &str) {
    let u = url(c, target);
    wait_for(&format!("target {target}"), Duration::from_secs(15), || {
        support::run(
            "qemu-io",
            ["-r", "-f", "raw", "-c", "read 0 512", u.as_str()],
        )
        .ok()
    });
}

fn used(c: &Cluster, volume: &str) -> u64 {
    c.volume(volume)["used_bytes"].as_u64().unwrap_or(0)
}

/// Every replica of every chunk of `volume` holds snapshot `snap` and it reads `pattern` in
/// `[0, len)` of the volume and zeroes after.
fn check_snapshot_on_every_replica(c: &Cluster, volume: &str, snap: u64, len: u64, pattern: u8) {
    let mgr = c.client();
    c.block_on(async {
        let vref = pb::VolumeRef {
            id: 0,
            name: volume.into(),
        };
        let v = mgr.get_volume(vref.clone()).await.expect("volume");
        let map = mgr
            .get_chunks(pb::GetChunksRequest {
                volume: Some(vref),
                first: 0,
                count: 0,
            })
            .await
            .expect("chunk map");
        for ch in &map.chunks {
            assert!(ch.joining.is_empty(), "chunk {} still rebuilding", ch.index);
            for node in &ch.replicas {
                let addr = &map
                    .nodes
                    .iter()
                    .find(|n| &n.id == node)
                    .expect("node listed")
                    .addr;
                let client = Client::connect(addr, &ClientConfig::default())
                    .await
                    .expect("connect");
                let id = ChunkId::new(v.id, ch.index as u32);
                let list = client.snapshots(id).await.expect("snapshot list");
                assert!(
                    list.iter().any(|s| s.id == snap),
                    "chunk {} on {node} lacks snapshot {snap}: {list:?}",
                    ch.index
                );
                let mut off = 0;
                while off < v.chunk_size {
                    let data = client
                        .snapshot_read(id, snap, off, MIB)
                        .await
                        .expect("snapshot read")
                        .data;
                    let at = ch.index * v.chunk_size + off;
                    let want = if at < len { pattern } else { 0 };
                    assert!(
                        data.iter().all(|&b| b == want),
                        "chunk {} on {node}: snapshot bytes at volume offset {at} are not {want:#x}",
                        ch.index
                    );
                    off += MIB;
                }
            }
        }
    });
}

#[test]
fn snapshot_clone_restore_and_rebuild() {
    require_qemu_iscsi();
    let _serial = cluster::serial();
    let mut c = Cluster::start(ClusterConfig::new("snapshots", 1, 4, 1));
    c.create_volume("base", "64MiB", "16MiB");
    c.attach("base", 1, Duration::from_secs(30));
    let base = url(&c, "base");

    // A, snapshot, B.
    qemu_write(&base, 0, 64 * MIB, 0xaa).expect_ok("pattern A");
    let r = c
        .admin(&["volume", "snapshot", "create", "base", "s1"])
        .expect_ok("snapshot create");
    assert!(r.stdout.contains("ready"), "{}", r.describe());
    qemu_write(&base, 0, 32 * MIB, 0xbb).expect_ok("pattern B");
    let s1 = url(&c, "base:s1");
    wait_target(&c, "base:s1");
    verify_ro(&s1, 0, 64 * MIB, 0xaa).expect_ok("the snapshot reads A");
    qemu_verify(&base, 0, 32 * MIB, 0xbb).expect_ok("the volume reads B");
    qemu_verify(&base, 32 * MIB, 32 * MIB, 0xaa).expect_ok("and A beyond B");
    // Writes get DATA PROTECT.
    let mut ro = Session::connect(
        &c.portal(1),
        &SessionConfig::new("iqn.2026-11.io.ironsan.test:ro", &iqn("base:s1")),
    )
    .expect("login to the snapshot");
    let denied = ro
        .write(0, &[0x11; 4096], false)
        .expect_err("a snapshot refuses writes");
    assert_eq!(denied.sense_key(), Some(7), "{denied}");
    ro.logout();
    let listed = snapshots(&c, "base");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "ready", "{listed:?}");
    assert_eq!(listed[0]["size"].as_u64(), Some(64 * MIB), "{listed:?}");

    // A clone of the snapshot: A at once, its own writes, its source untouched.
    c.admin(&["volume", "clone", "copy", "--from", "base@s1"])
        .expect_ok("clone");
    c.attach("copy", 1, Duration::from_secs(30));
    let copy = url(&c, "copy");
    qemu_verify(&copy, 0, 64 * MIB, 0xaa).expect_ok("the clone reads A");
    qemu_write(&copy, 0, 4 * MIB, 0xcc).expect_ok("write to the clone");
    qemu_verify(&copy, 0, 4 * MIB, 0xcc).expect_ok("the clone's own write");
    qemu_verify(&base, 0, 4 * MIB, 0xbb).expect_ok("the source is untouched");
    wait_for(
        "the clone to be independent",
        Duration::from_secs(60),
        || c.volume("copy")["source"].is_null(),
    );

    // Node loss after the snapshot: rebuilt replicas get the snapshot too.
    let s1_id = snapshot_id(&c, "base", "s1");
    // A node holding chunk 0 of the volume (and so its snapshot) goes.
    let mgr = c.client();
    let map = c
        .block_on(mgr.get_chunks(pb::GetChunksRequest {
            volume: Some(pb::VolumeRef {
                id: 0,
                name: "base".into(),
            }),
            first: 0,
            count: 1,
        }))
        .expect("chunk map");
    let victim: u32 = map.chunks[0].replicas[0]
        .strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .expect("storage node ids are sN");
    c.kill(Node::Storage(victim));
    c.wait_degraded(Duration::from_secs(30))
        .expect("the killed node's chunks degraded");
    c.wait_full_redundancy(Duration::from_secs(120))
        .expect("redundancy restored");
    check_snapshot_on_every_replica(&c, "base", s1_id, 64 * MIB, 0xaa);
    verify_ro(&s1, 0, 64 * MIB, 0xaa).expect_ok("the snapshot still reads A after rebuild");
    qemu_verify(&base, 0, 32 * MIB, 0xbb).expect_ok("the volume still reads B");
    let report = c.compare_replicas("base").expect("compare");
    assert_eq!(report.details, Vec::<String>::new(), "replicas differ");

    // Bad input, nothing half-done.
    refused(
        &c,
        &["volume", "snapshot", "create", "nosuch", "x"],
        "not found",
    );
    refused(
        &c,
        &["volume", "snapshot", "create", "base", "s1"],
        "exists",
    );
    refused(
        &c,
        &[
            "volume", "clone", "small", "--from", "base@s1", "--size", "32MiB",
        ],
        "smaller",
    );
    refused(
        &c,
        &["volume", "snapshot", "restore", "base", "s1"],
        "detach",
    );
    c.admin(&["volume", "clone", "lazy", "--from", "base@s1"])
        .expect_ok("a clone left unattached");
    refused(&c, &["volume", "snapshot", "delete", "base", "s1"], "lazy");
    c.admin(&["volume", "delete", "lazy"])
        .expect_ok("delete the lazy clone");
    let names: Vec<String> = c.admin(&["volume", "list", "--json"]).json()["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!names.contains(&"small".to_string()), "{names:?}");

    // Deleting the snapshot frees what its copies took (3 replicas x the 32 MiB B replaced).
    let with = used(&c, "base");
    c.admin(&["volume", "snapshot", "delete", "base", "s1"])
        .expect_ok("snapshot delete");
    assert!(snapshots(&c, "base").is_empty());
    wait_for("the space to be freed", Duration::from_secs(30), || {
        used(&c, "base") + 3 * 30 * MIB <= with
    });

    // Restore rolls a detached volume back.
    c.admin(&["volume", "snapshot", "create", "base", "s2"])
        .expect_ok("snapshot s2");
    qemu_write(&base, 0, 64 * MIB, 0xdd).expect_ok("overwrite everything");
    c.detach("base", None).expect_ok("detach");
    c.admin(&["volume", "snapshot", "restore", "base", "s2"])
        .expect_ok("restore");
    c.attach("base", 1, Duration::from_secs(30));
    qemu_verify(&base, 0, 32 * MIB, 0xbb).expect_ok("restored B");
    qemu_verify(&base, 32 * MIB, 32 * MIB, 0xaa).expect_ok("restored A");

    // A detached volume is snapshotted through a work attachment, released afterwards.
    c.detach("copy", None).expect_ok("detach the clone");
    c.admin(&["volume", "snapshot", "create", "copy", "c1"])
        .expect_ok("snapshot of a detached volume");
    wait_for("the work attachment to go", Duration::from_secs(15), || {
        c.volume("copy")["attachment"].is_null()
    });
    c.admin(&["volume", "clone", "copy2", "--from", "copy@c1"])
        .expect_ok("clone of the detached volume's snapshot");
    c.attach("copy2", 1, Duration::from_secs(30));
    let copy2 = url(&c, "copy2");
    qemu_verify(&copy2, 0, 4 * MIB, 0xcc).expect_ok("clone of clone: its write");
    qemu_verify(&copy2, 4 * MIB, 60 * MIB, 0xaa).expect_ok("clone of clone: A");
    // A clone of a volume's present content (an internal snapshot, gone once copied).
    c.admin(&["volume", "clone", "now", "--from", "base"])
        .expect_ok("clone of the present");
    c.attach("now", 1, Duration::from_secs(30));
    qemu_verify(&url(&c, "now"), 0, 32 * MIB, 0xbb).expect_ok("clone of the present reads B");
    wait_for(
        "the internal snapshot to go",
        Duration::from_secs(60),
        || snapshots(&c, "base").iter().all(|s| s["name"] == "s2"),
    );
}

/// Block `b`'s counter as the writer wrote it (8 bytes little endian, then the same repeated).
fn counter(buf: &[u8]) -> u64 {
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
}

#[test]
fn snapshots_are_one_point_between_writes() {
    require_qemu_iscsi();
    let _serial = cluster::serial();
    let mut c = Cluster::start(ClusterConfig::new("snapshot-points", 1, 3, 1));
    c.create_volume("pts", "64MiB", "16MiB");
    c.attach("pts", 1, Duration::from_secs(30));
    let portal = c.portal(1);
    // Two blocks in different chunks, on (most likely) different replica sets.
    let (first, second) = (0u64, 48 * MIB);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let cfg = SessionConfig::new("iqn.2026-11.io.ironsan.test:points", &iqn("pts"));
        std::thread::spawn(move || {
            let mut s = Session::connect(&portal, &cfg).expect("login");
            let mut n = 0u64;
            let mut block = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                block[..8].copy_from_slice(&n.to_le_bytes());
                s.write(first, &block, false).expect("write first");
                s.write(second, &block, false).expect("write second");
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut names = Vec::new();
    for i in 0..5 {
        let name = format!("p{i}");
        c.admin(&["volume", "snapshot", "create", "pts", &name])
            .expect_ok("snapshot under writes");
        names.push(name);
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    assert!(writes > 50, "the writer kept writing ({writes} rounds)");
    let cfg = SessionConfig::new("iqn.2026-11.io.ironsan.test:reader", "");
    for name in &names {
        let target = format!("pts:{name}");
        wait_target(&c, &target);
        let mut s = Session::connect(
            &c.portal(1),
            &SessionConfig {
                target: iqn(&target),
                ..cfg.clone()
            },
        )
        .expect("login to the snapshot");
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        s.read(first, &mut a).expect("read first");
        s.read(second, &mut b).expect("read second");
        let (a, b) = (counter(&a), counter(&b));
        // Between two writes the first block is either equal to the second or one ahead.
        assert!(
            a == b || a == b + 1,
            "snapshot {name}: first block {a}, second {b}: not one point between writes"
        );
        assert!(a > 0, "snapshot {name} was taken under writes");
        s.logout();
    }
}
