//! A volume published read-only (the manager's `Publish` with `readonly`, what the CSI driver
//! does for ReadOnlyMany) is served write-protected by the real `ironsan dev` gateway: libiscsi
//! and qemu see WP in MODE SENSE, reads work, every write fails with DATA PROTECT / WRITE
//! PROTECTED, and libiscsi's own read-only conformance test passes. Published read-write again,
//! the volume takes writes.

#[path = "support/libiscsi.rs"]
mod libiscsi;
mod support;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ironsan_common::manager_client::ManagerClient;
use ironsan_common::proto::manager::{PublishRequest, UnpublishRequest, VolumeRef};
use libiscsi::{IscsiError, Sense, Session, SessionConfig};
use support::*;

/// The dev cluster's gateway id, which is also the CSI node id publications name.
const NODE: &str = "dev";
/// How long a change may take to reach the gateway (it polls every second; a reopen attaches).
const SETTLE: Duration = Duration::from_secs(30);
/// ASC/ASCQ of WRITE PROTECTED and MODE PARAMETERS CHANGED.
const WRITE_PROTECTED: u16 = 0x2700;
const MODE_PARAMETERS_CHANGED: u16 = 0x2a01;

struct Manager {
    rt: tokio::runtime::Runtime,
    client: ManagerClient,
}

impl Manager {
    fn new(data_dir: &Path) -> Manager {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = ManagerClient::new(&dev_managers(data_dir)).expect("manager client");
        Manager { rt, client }
    }

    fn volume(name: &str) -> Option<VolumeRef> {
        Some(VolumeRef {
            name: name.into(),
            ..VolumeRef::default()
        })
    }

    fn publish(&self, volume: &str, readonly: bool) {
        let req = PublishRequest {
            volume: Self::volume(volume),
            node: NODE.into(),
            readonly,
            lease_ms: 0,
        };
        let a = self
            .rt
            .block_on(self.client.publish(req))
            .unwrap_or_else(|e| panic!("publish {volume} readonly={readonly}: {e}"));
        assert_eq!((a.readonly, a.gateway.as_str()), (readonly, NODE));
    }

    /// The portal of the volume's attachment: empty after a publish made it, until the gateway
    /// has opened the volume under it (its own attach fills it in).
    fn portal(&self, volume: &str) -> String {
        let v = self
            .rt
            .block_on(
                self.client
                    .get_volume(Self::volume(volume).unwrap_or_default()),
            )
            .unwrap_or_else(|e| panic!("get volume {volume}: {e}"));
        v.attachment.map(|a| a.portal).unwrap_or_default()
    }

    fn unpublish(&self, volume: &str) {
        let req = UnpublishRequest {
            volume: Self::volume(volume),
            node: NODE.into(),
        };
        self.rt
            .block_on(self.client.unpublish(req))
            .unwrap_or_else(|e| panic!("unpublish {volume}: {e}"));
    }
}

fn session(portal: &str, volume: &str, initiator: &str) -> Result<Session, IscsiError> {
    let mut cfg = SessionConfig::new(initiator, &iqn(volume));
    cfg.lun = lun();
    Session::connect(portal, &cfg)
}

fn sense(r: Result<(), IscsiError>) -> Option<(u8, u16)> {
    match r {
        Err(IscsiError::CheckCondition { sense, .. }) => Some((sense.key, sense.asc_ascq)),
        Ok(()) => None,
        Err(e) => panic!("expected GOOD or CHECK CONDITION, got {e}"),
    }
}

/// Retries `f` every 200 ms until it returns Some, or fails the test after `SETTLE`.
fn eventually<T>(what: &str, server: &mut Server, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        server.assert_running(what);
        assert!(Instant::now() < deadline, "{what}: not within {SETTLE:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn published_read_only_is_write_protected() {
    let dir = TestDir::new("readonly");
    // `--volume` attaches it to the dev gateway as an operator would: read-write.
    let mut server = Server::start(
        dir.path(),
        ServerConfig::default().volume("shared", "64MiB"),
    );
    let url = server.url("shared");
    let portal = server.addr.clone();
    let old = pseudo_random(64 << 10, 1);
    let mut writer = session(&portal, "shared", "iqn.2026-11.test:writer").expect("login");
    assert!(!writer.write_protected().expect("MODE SENSE"), "writable");
    writer
        .write(0, &old, false)
        .expect("write while read-write");
    writer.flush().expect("flush");

    // The read-only publication adopts the attachment (same lease and epoch): the gateway
    // switches the live LUN. The logged-in session learns it from a unit attention, then its
    // writes are refused.
    let mgr = Manager::new(dir.path());
    mgr.publish("shared", true);
    let mut seen_attention = false;
    let first = eventually(
        "writes refused after the read-only publish",
        &mut server,
        || {
            // Away from the data checked below: these land until the switch.
            match sense(writer.write(16 << 20, &[0xee; 4096], false)) {
                None => {
                    assert!(
                        !seen_attention,
                        "a write succeeded after the unit attention"
                    );
                    None
                }
                Some((Sense::UNIT_ATTENTION, MODE_PARAMETERS_CHANGED)) => {
                    seen_attention = true;
                    None
                }
                Some(other) => Some(other),
            }
        },
    );
    assert!(seen_attention, "MODE PARAMETERS CHANGED before the refusal");
    assert_eq!(first, (Sense::DATA_PROTECT, WRITE_PROTECTED));

    // A reader logging in now: WP in MODE SENSE, reads and the rest work, writes do not.
    let mut reader = session(&portal, "shared", "iqn.2026-11.test:reader").expect("login");
    assert!(reader.write_protected().expect("MODE SENSE"), "WP bit");
    let mut back = vec![0u8; old.len()];
    reader.read(0, &mut back).expect("read");
    assert!(
        back == old,
        "reads return the data written before, untouched"
    );
    assert_eq!(reader.capacity().expect("READ CAPACITY"), (128 << 10, 512));
    reader.flush().expect("SYNCHRONIZE CACHE");
    for (offset, fua) in [(0, false), (1 << 20, true)] {
        assert_eq!(
            sense(reader.write(offset, &[0xee; 512], fua)),
            Some((Sense::DATA_PROTECT, WRITE_PROTECTED)),
            "WRITE(16) at {offset}, FUA {fua}"
        );
    }
    run("iscsi-inq", [&url]).expect_ok("iscsi-inq on a write-protected LUN");
    // qemu reads WP from MODE SENSE: it will not open the LUN read-write, and reads with -r.
    let rw = qemu_io(&url, &["read 0 4k".to_string()]);
    assert!(
        !rw.ok() && format!("{}{}", rw.stdout, rw.stderr).contains("write protected"),
        "qemu must refuse a read-write open:\n{}",
        rw.describe()
    );
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "raw".into(), "-c".into()];
    args.push(format!("read -P 0x00 {} 4k", 8 << 20));
    args.push(url.clone());
    run("qemu-io", &args).expect_ok("qemu-io -r read");
    // libiscsi's read-only conformance test: WRITE(10/12/16), WRITE SAME(10/16) with and
    // without UNMAP, UNMAP, WRITE AND VERIFY(10/12/16) and ORWRITE all WRITE PROTECTED.
    let cu = run("iscsi-test-cu", ["-d", "-V", "-t", "SCSI.ReadOnly", &url])
        .expect_ok("iscsi-test-cu SCSI.ReadOnly");
    let text = format!("{}{}", cu.stdout, cu.stderr);
    let summary = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"tests"));
    assert!(
        summary.as_deref() == Some(&["tests", "1", "1", "1", "0", "0"][..])
            && text.contains("WRITE_PROTECTED(0x2700)")
            && !text.contains("SKIPPED"),
        "SCSI.ReadOnly.ReadOnlySBC must run (not skip) and pass:\n{}",
        cu.describe()
    );
    reader.read(0, &mut back).expect("read after the suite");
    assert!(back == old, "nothing the suite sent changed the data");

    // The last node out drops the attachment: the target goes. Published read-write again, the
    // gateway opens it anew and it takes writes.
    mgr.unpublish("shared");
    eventually(
        "target removed after the last unpublish",
        &mut server,
        || {
            session(&portal, "shared", "iqn.2026-11.test:probe")
                .err()
                .map(|_| ())
        },
    );
    mgr.publish("shared", false);
    let new = pseudo_random(64 << 10, 2);
    let mut again = eventually("writable after the read-write publish", &mut server, || {
        let mut s = session(&portal, "shared", "iqn.2026-11.test:again").ok()?;
        match s.write(0, &new, true) {
            Ok(()) => Some(s),
            Err(IscsiError::CheckCondition { sense, .. })
                if sense.key == Sense::DATA_PROTECT || sense.key == Sense::UNIT_ATTENTION =>
            {
                None
            }
            Err(e) if e.breaks_session() => None,
            Err(e) => panic!("write after the read-write publish: {e}"),
        }
    });
    assert!(!again.write_protected().expect("MODE SENSE"), "WP cleared");
    again.read(0, &mut back).expect("read");
    assert!(back == new, "the new data reads back");
    again.logout();

    // Unpublished and published in the other mode at once: the gateway first sees only the flag
    // change (switched live; writes still go out under the old epoch, which no storage node has
    // been told is stale), then the lease keeper meets the new epoch and the volume is reopened.
    // Both states serve the new mode, and MODE SENSE agrees with what writes do.
    for readonly in [true, false] {
        mgr.unpublish("shared");
        mgr.publish("shared", readonly);
        eventually(&format!("serving readonly={readonly}"), &mut server, || {
            let mut s = session(&portal, "shared", "iqn.2026-11.test:flip").ok()?;
            if s.write_protected().ok()? != readonly {
                return None;
            }
            match (readonly, s.write(2 << 20, &[0x77; 4096], false)) {
                (false, Ok(())) => Some(()),
                (true, Err(IscsiError::CheckCondition { sense, .. }))
                    if (sense.key, sense.asc_ascq) == (Sense::DATA_PROTECT, WRITE_PROTECTED) =>
                {
                    Some(())
                }
                _ => None,
            }
        });
    }
    eventually("reopened under the new epoch", &mut server, || {
        (!mgr.portal("shared").is_empty()).then_some(())
    });
    let last = pseudo_random(4096, 3);
    let mut s = eventually("writable after the reopen", &mut server, || {
        let mut s = session(&portal, "shared", "iqn.2026-11.test:last").ok()?;
        s.write(4 << 20, &last, true).ok()?;
        Some(s)
    });
    assert!(!s.write_protected().expect("MODE SENSE"));
    s.read(0, &mut back).expect("read");
    assert!(back == new, "the data survived the switches");
    let mut four = vec![0u8; 4096];
    s.read(4 << 20, &mut four).expect("read");
    assert!(four == last);
    s.logout();
    drop((writer, reader));
    server.stop_clean();
}
