//! Thin provisioning as an operator sees it: `ironsan volume get/list` report the space a
//! volume's replicas take, which grows with writes and falls when an initiator unmaps; the
//! manager refuses volumes past `--max-overcommit` times the raw capacity and reports the ratio.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{dev_managers, qemu_io, require_qemu_iscsi, run, Server, ServerConfig, TestDir};

const MIB: u64 = 1 << 20;

fn ironsan(manager: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .args(["--manager", manager])
        .output()
        .expect("ironsan runs")
}

fn json(manager: &str, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ironsan(manager, &a);
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn used(manager: &str, volume: &str) -> u64 {
    json(manager, &["volume", "get", volume])["used_bytes"]
        .as_u64()
        .expect("used_bytes")
}

/// Polls until `ok(used)` (heartbeats carry usage every 5 s), returning the last value.
fn wait_used(manager: &str, volume: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let u = used(manager, volume);
        if ok(u) {
            return u;
        }
        assert!(Instant::now() < deadline, "{what}: used_bytes stays {u}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn used_bytes_follow_writes_and_unmap() {
    require_qemu_iscsi();
    let dir = TestDir::new("space");
    // Three managers: the usage is the leader's soft state, and followers ask it.
    let server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("thin", "256MiB")
            .arg("--managers")
            .arg("3"),
    );
    let m = dev_managers(dir.path());
    let url = server.url("thin");
    let before = wait_used(&m, "thin", "first report", |_| true);
    assert!(
        before < 3 * 8 * MIB,
        "an unwritten volume takes little: {before}"
    );

    qemu_io(&url, &["write -P 0x5c 0 32M".into(), "flush".into()]).expect_ok("write 32 MiB");
    // Three replicas of 32 MiB each.
    let written = wait_used(&m, "thin", "after writing", |u| u >= before + 3 * 32 * MIB);
    let list = json(&m, &["volume", "list"]);
    let row = &list["volumes"].as_array().expect("a list")[0];
    assert_eq!(row["used_bytes"].as_u64(), Some(written), "{list}");

    // UNMAP (qemu's discard through its iSCSI driver) punches the blocks out of every replica.
    run(
        "qemu-io",
        [
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "discard 0 24M",
            url.as_str(),
        ],
    )
    .expect_ok("qemu-io discard 0 24M");
    let after = wait_used(&m, "thin", "after unmap", |u| u + 3 * 20 * MIB <= written);
    eprintln!("used: {before} unwritten, {written} after 32 MiB, {after} after unmapping 24 MiB");
    for member in m.split(',') {
        let u = used(member, "thin");
        assert!(u + 3 * 20 * MIB <= written, "member {member} reports {u}");
    }
    // The rest still reads back; the unmapped range reads zeros.
    qemu_io(
        &url,
        &["read -P 0x5c 24M 8M".into(), "read -P 0 0 24M".into()],
    )
    .expect_ok("data kept, unmapped range zeroed");
    // The table shows the column.
    let out = ironsan(&m, &["volume", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().is_some_and(|h| h.contains("USED")),
        "{text}"
    );
}

#[test]
fn over_commit_is_refused_past_the_ratio() {
    let dir = TestDir::new("overcommit");
    let server = Server::start(
        dir.path(),
        ServerConfig::default().arg("--max-overcommit").arg("1"),
    );
    let m = dev_managers(dir.path());
    let status = json(&m, &["status"]);
    let capacity = status["capacity_bytes"].as_u64().expect("capacity_bytes");
    assert!(capacity > 0, "{status}");
    // Replicas: 3 (the dev cluster's three storage daemons).
    let third = capacity / 3 / MIB * MIB;
    let half = format!("{}MiB", third / 2 / MIB);
    let out = ironsan(&m, &["volume", "create", "fits", "--size", &half]);
    assert!(out.status.success(), "{out:?}");
    // A second one that takes the total past 1x is refused, and nothing is created.
    let big = format!("{}MiB", third / MIB);
    let out = ironsan(&m, &["volume", "create", "toobig", "--size", &big]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("over-commit") && err.contains("--max-overcommit"),
        "{err}"
    );
    let names: Vec<String> = json(&m, &["volume", "list"])["volumes"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["fits"]);
    // Growing past it is refused too; within it is fine.
    let past = format!("{}MiB", third / MIB + 1024);
    let out = ironsan(&m, &["volume", "resize", "fits", &past]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("over-commit"),
        "{out:?}"
    );
    let out = ironsan(
        &m,
        &[
            "volume",
            "resize",
            "fits",
            &format!("{}MiB", third / 2 / MIB + 64),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let status = json(&m, &["status"]);
    assert_eq!(
        status["provisioned_bytes"].as_u64(),
        Some(3 * (third / 2 / MIB + 64) * MIB),
        "{status}"
    );
    let text = String::from_utf8_lossy(&ironsan(&m, &["status"]).stdout).into_owned();
    assert!(
        text.contains("Provisioned:") && text.contains("raw ("),
        "{text}"
    );
    // A bad ratio is refused at start.
    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["manager", "--max-overcommit=-2", "--id", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ratio"));
    drop(server);
}
