//! Online resize through a logged-in initiator: `ironsan volume resize` grows a volume while a
//! libiscsi session keeps writing; the session gets CAPACITY DATA HAS CHANGED, READ CAPACITY
//! reports the new size and the new blocks take writes, all without logging in again.
//! Shrinking, unknown volumes and bad sizes are refused with one clear line.

#[path = "support/libiscsi.rs"]
mod libiscsi;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use libiscsi::{IscsiError, Sense, Session, SessionConfig};
use support::{dev_managers, iqn, lun, Server, ServerConfig, TestDir};

const MIB: u64 = 1 << 20;
/// ASC/ASCQ of CAPACITY DATA HAS CHANGED.
const CAPACITY_CHANGED: u16 = 0x2a09;

fn resize(manager: &str, volume: &str, size: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["volume", "resize", volume, size, "--manager", manager])
        .output()
        .expect("ironsan runs")
}

/// A 4 KiB block naming its LBA and a generation, so a read-back proves where it landed.
fn block(lba: u64, generation: u8) -> Vec<u8> {
    let mut b = vec![generation; 4096];
    b[..8].copy_from_slice(&lba.to_be_bytes());
    b
}

#[test]
fn grows_under_writes_without_a_new_login() {
    let dir = TestDir::new("resize");
    let server = Server::start(dir.path(), ServerConfig::default().volume("grow", "64MiB"));
    let m = dev_managers(dir.path());
    let mut cfg = SessionConfig::new("iqn.2026-11.io.ironsan:test-resize", &iqn("grow"));
    cfg.lun = lun();
    let mut s = Session::connect(&server.addr, &cfg).expect("login");
    assert_eq!(s.capacity().expect("READ CAPACITY"), (64 * MIB / 512, 512));

    // Writes spread over the old size; the resize lands after 200 of them, and the writes go
    // on until the gateway has picked the new size up (it follows the manager).
    let mut unit_attentions = 0;
    let mut written = Vec::new();
    let mut resized_at = None;
    let mut i = 0u64;
    while i < 400 || unit_attentions == 0 {
        if i == 200 {
            let out = resize(&m, "grow", "128MiB");
            assert!(out.status.success(), "resize: {out:?}");
            resized_at = Some(Instant::now());
        }
        if let Some(t) = resized_at {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no unit attention 30 s after the resize"
            );
        }
        let offset = (i * 37 % (64 * MIB / 4096)) * 4096;
        let data = block(offset / 512, (i % 250) as u8 + 1);
        match s.write(offset, &data, false) {
            Ok(()) => written.push((offset, data)),
            // The unit attention is reported once, on the next command; the initiator
            // retries the command as a kernel would.
            Err(IscsiError::CheckCondition { sense, .. })
                if (sense.key, sense.asc_ascq) == (Sense::UNIT_ATTENTION, CAPACITY_CHANGED) =>
            {
                unit_attentions += 1;
                s.write(offset, &data, false).expect("the retried write");
                written.push((offset, data));
            }
            Err(e) => panic!("write {i} at {offset}: {e:?}"),
        }
        i += 1;
    }
    let picked_up = resized_at.map(|t| t.elapsed());
    eprintln!("{i} writes; the unit attention came within {picked_up:?} of the resize");
    assert_eq!(
        unit_attentions, 1,
        "one CAPACITY DATA HAS CHANGED for the session"
    );
    assert_eq!(s.capacity().expect("READ CAPACITY"), (128 * MIB / 512, 512));
    // The new space takes writes, at its very end too, on the same session.
    let last = 128 * MIB - 4096;
    for offset in [64 * MIB, 100 * MIB, last] {
        let data = block(offset / 512, 0xee);
        s.write(offset, &data, true)
            .expect("write in the new space");
        written.push((offset, data));
    }
    s.flush().expect("SYNCHRONIZE CACHE");
    // Later writes to a block win; every block reads what was last written there.
    let mut last_of = std::collections::BTreeMap::new();
    for (offset, data) in written {
        last_of.insert(offset, data);
    }
    let mut buf = vec![0u8; 4096];
    for (offset, data) in &last_of {
        s.read(*offset, &mut buf).expect("read back");
        assert!(buf == *data, "block at {offset} differs");
    }
    // Past the new end is still out of range.
    assert!(s.write(128 * MIB, &block(0, 1), false).is_err());
    s.logout();
    drop(server);
}

#[test]
fn shrinking_and_bad_resizes_are_refused() {
    let dir = TestDir::new("resize-bad");
    let server = Server::start(dir.path(), ServerConfig::default().volume("keep", "64MiB"));
    let m = dev_managers(dir.path());
    for (volume, size, why) in [
        ("keep", "32MiB", "shrinking is not supported"),
        ("nosuch", "128MiB", "nosuch"),
        ("keep", "0", "size"),
    ] {
        let out = resize(&m, volume, size);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{volume} {size}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(why),
            "{volume} {size}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // A size that does not parse is a usage error (clap's exit status 2), naming the value.
    let out = resize(&m, "keep", "lots");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"lots\" has no number"));
    // Nothing changed.
    let mut cfg = SessionConfig::new("iqn.2026-11.io.ironsan:test-resize-bad", &iqn("keep"));
    cfg.lun = lun();
    let mut s = Session::connect(&server.addr, &cfg).expect("login");
    assert_eq!(s.capacity().expect("READ CAPACITY"), (64 * MIB / 512, 512));
    s.logout();
}
