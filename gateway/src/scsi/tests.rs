//! End-to-end tests of [`Lun::execute`] over MemDevice and FileDevice.

use std::sync::Arc;

use bytes::Bytes;

use super::opcodes::COMMANDS;
use super::*;
use crate::device::FileDevice;

fn nexus(n: u8) -> Nexus {
    Nexus {
        id: u64::from(n),
        initiator: format!("iqn.test:{n}"),
        isid: [n; 6],
        tpgt: 1,
    }
}

fn mem_lun(size: u64) -> Lun {
    Lun::new(
        Arc::new(MemDevice::new(size)),
        LunIdentity {
            name: "vol".into(),
            naa: 42,
        },
    )
}

async fn exec(lun: &Lun, n: &Nexus, cdb: &[u8], data: &[u8]) -> Response {
    lun.execute(Command {
        cdb,
        data_out: Bytes::copy_from_slice(data),
        nexus: n,
    })
    .await
}

/// (sense key, asc, ascq) of a CHECK CONDITION, or None.
fn check(r: &Response) -> Option<(u8, u8, u8)> {
    r.sense.as_ref().map(|s| (s[2] & 0x0f, s[12], s[13]))
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[tokio::test]
async fn read_write_round_trip_and_range_checks() {
    let dir = tempfile::tempdir().unwrap();
    let file: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&dir.path().join("v"), 1 << 20).unwrap());
    for lun in [
        mem_lun(1 << 20),
        Lun::new(
            file,
            LunIdentity {
                name: "f".into(),
                naa: 1,
            },
        ),
    ] {
        let n = nexus(1);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let w = exec(&lun, &n, &rw10(0x2a, 10, 8), &data).await;
        assert_eq!(w.status, Status::Good, "{:?}", check(&w));
        let r = exec(&lun, &n, &rw16(0x88, 10, 8), &[]).await;
        assert_eq!(&r.data[..], &data[..]);
        let r6 = exec(&lun, &n, &[0x08, 0, 0, 10, 1, 0], &[]).await;
        assert_eq!(&r6.data[..], &data[..512]);
        // 2048 blocks: the last one is readable, one past it is not.
        assert_eq!(
            exec(&lun, &n, &rw10(0x28, 2047, 1), &[]).await.status,
            Status::Good
        );
        assert_eq!(
            check(&exec(&lun, &n, &rw10(0x28, 2047, 2), &[]).await),
            Some((5, 0x21, 0))
        );
        assert_eq!(
            check(&exec(&lun, &n, &rw16(0x88, u64::MAX, 1), &[]).await),
            Some((5, 0x21, 0))
        );
        assert_eq!(
            check(&exec(&lun, &n, &rw16(0x8a, 2048, 1), &[0; 512]).await),
            Some((5, 0x21, 0))
        );
        // RDPROTECT, too-long transfer, short data-out.
        let mut c = rw10(0x28, 0, 1);
        c[1] = 0x20;
        assert_eq!(check(&exec(&lun, &n, &c, &[]).await), Some((5, 0x24, 0)));
        assert_eq!(
            check(&exec(&lun, &n, &rw16(0x88, 0, 9000), &[]).await),
            Some((5, 0x24, 0))
        );
        assert_eq!(
            check(&exec(&lun, &n, &rw10(0x2a, 0, 2), &[0; 512]).await),
            Some((5, 0x24, 0))
        );
        // Unknown opcode; short CDB.
        assert_eq!(
            check(&exec(&lun, &n, &[0xc5, 0, 0, 0, 0, 0], &[]).await),
            Some((5, 0x20, 0))
        );
        assert_eq!(
            check(&exec(&lun, &n, &[0x28, 0, 0], &[]).await),
            Some((5, 0x24, 0))
        );
        // A 10-byte command inside a 16-byte CDB field works.
        let mut padded = [0u8; 16];
        padded[..10].copy_from_slice(&rw10(0x28, 10, 1));
        assert_eq!(&exec(&lun, &n, &padded, &[]).await.data[..], &data[..512]);
    }
}

#[tokio::test]
async fn verify_and_compare_and_write() {
    let lun = mem_lun(1 << 20);
    let n = nexus(1);
    exec(&lun, &n, &rw10(0x2a, 0, 1), &[7; 512]).await;
    let mut v = rw10(0x2f, 0, 1);
    v[1] = 0x02;
    assert_eq!(exec(&lun, &n, &v, &[7; 512]).await.status, Status::Good);
    let mut other = [7u8; 512];
    other[100] = 8;
    let r = exec(&lun, &n, &v, &other).await;
    assert_eq!(check(&r), Some((0x0e, 0x1d, 0)));
    let s = r.sense.unwrap();
    assert_eq!((s[0] & 0x80, &s[3..7]), (0x80, &[0u8, 0, 0, 100][..]));

    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let mut buf = vec![7u8; 512];
    buf.extend_from_slice(&[9u8; 512]);
    assert_eq!(exec(&lun, &n, &caw, &buf).await.status, Status::Good);
    assert_eq!(
        &exec(&lun, &n, &rw10(0x28, 0, 1), &[]).await.data[..],
        &[9u8; 512][..]
    );
    // Same request again: stored data is now 9s, verify data 7s -> miscompare at byte 0.
    let r = exec(&lun, &n, &caw, &buf).await;
    assert_eq!(check(&r), Some((0x0e, 0x1d, 0)));
    assert_eq!(&r.sense.unwrap()[3..7], &[0, 0, 0, 0]);
    caw[13] = 0xff;
    assert_eq!(
        check(&exec(&lun, &n, &caw, &buf).await),
        Some((5, 0x24, 0)),
        "short data-out"
    );
}

#[tokio::test]
async fn concurrent_compare_and_write_is_atomic() {
    let lun = Arc::new(mem_lun(1 << 20));
    let mut tasks = Vec::new();
    for p in 0..4u8 {
        let lun = lun.clone();
        tasks.push(tokio::spawn(async move {
            let n = nexus(p);
            let mut caw = [0u8; 16];
            caw[0] = 0x89;
            caw[13] = 1;
            let mut wins = 0;
            for round in 0..50u8 {
                let mut buf = vec![round; 512];
                buf.extend_from_slice(&[round.wrapping_add(1); 512]);
                if exec(&lun, &n, &caw, &buf).await.status == Status::Good {
                    wins += 1;
                }
            }
            wins
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 50, "exactly one CAW per round succeeds");
}

#[tokio::test]
async fn unmap_frees_space_and_lba_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&dir.path().join("v"), 4 << 20).unwrap());
    let lun = Lun::new(
        dev,
        LunIdentity {
            name: "f".into(),
            naa: 1,
        },
    );
    let n = nexus(1);
    exec(&lun, &n, &rw10(0x2a, 0, 264), &vec![b'A'; 264 * 512]).await;
    let mut list = vec![0u8; 24];
    list[1] = 22;
    list[3] = 16;
    list[8..16].copy_from_slice(&8u64.to_be_bytes());
    list[16..20].copy_from_slice(&8u32.to_be_bytes());
    let mut cdb = [0u8; 10];
    cdb[0] = 0x42;
    cdb[8] = 24;
    assert_eq!(exec(&lun, &n, &cdb, &list).await.status, Status::Good);
    let mut gls = [0u8; 16];
    gls[0] = 0x9e;
    gls[1] = 0x12;
    gls[13] = 24;
    gls[9] = 8;
    let r = exec(&lun, &n, &gls, &[]).await;
    assert_eq!(r.data.len(), 24);
    assert_eq!(
        (&r.data[8..16], r.data[20]),
        (&8u64.to_be_bytes()[..], 1),
        "deallocated at 8"
    );
    assert_eq!(&r.data[16..20], &8u32.to_be_bytes());
    gls[9] = 16;
    let r = exec(&lun, &n, &gls, &[]).await;
    assert_eq!(
        (&r.data[8..16], r.data[20]),
        (&16u64.to_be_bytes()[..], 0),
        "mapped at 16"
    );
    assert_eq!(
        &exec(&lun, &n, &rw10(0x28, 8, 1), &[]).await.data[..],
        &[0u8; 512][..]
    );
    // Beyond the end.
    gls[2..10].copy_from_slice(&8192u64.to_be_bytes());
    assert_eq!(check(&exec(&lun, &n, &gls, &[]).await), Some((5, 0x21, 0)));
    gls[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(check(&exec(&lun, &n, &gls, &[]).await), Some((5, 0x21, 0)));
    // Zero-length descriptors, at the end too, and an empty list are fine; out of range is not.
    list[8..16].copy_from_slice(&8192u64.to_be_bytes());
    list[16..20].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(exec(&lun, &n, &cdb, &list).await.status, Status::Good);
    let mut empty = cdb;
    empty[8] = 8;
    assert_eq!(
        exec(&lun, &n, &empty, &[0, 6, 0, 0, 0, 0, 0, 0])
            .await
            .status,
        Status::Good
    );
    assert_eq!(
        check(&exec(&lun, &n, &empty, &[0, 6, 0, 16, 0, 0, 0, 0]).await),
        Some((5, 0x26, 0))
    );
    list[16..20].copy_from_slice(&1u32.to_be_bytes());
    assert_eq!(
        check(&exec(&lun, &n, &cdb, &list).await),
        Some((5, 0x21, 0))
    );
    // WRITE SAME with UNMAP to the end of the medium (number of blocks 0).
    exec(&lun, &n, &rw10(0x2a, 8190, 2), &[0xff; 1024]).await;
    let mut ws = rw10(0x41, 8190, 0);
    ws[1] = 0x08;
    assert_eq!(exec(&lun, &n, &ws, &[0xff; 512]).await.status, Status::Good);
    assert_eq!(
        &exec(&lun, &n, &rw10(0x28, 8190, 2), &[]).await.data[..],
        &[0u8; 1024][..]
    );
    ws[1] = 0x10; // ANCHOR
    assert_eq!(
        check(&exec(&lun, &n, &ws, &[0; 512]).await),
        Some((5, 0x24, 0))
    );
    // WRITE SAME of a pattern.
    let ws = rw10(0x41, 100, 3);
    assert_eq!(exec(&lun, &n, &ws, &[5; 512]).await.status, Status::Good);
    assert_eq!(
        &exec(&lun, &n, &rw10(0x28, 100, 3), &[]).await.data[..],
        &[5u8; 1536][..]
    );
}

#[tokio::test]
async fn unit_attention_after_reset_reported_once() {
    let lun = mem_lun(1 << 20);
    let (a, b) = (nexus(1), nexus(2));
    exec(&lun, &a, &[0; 6], &[]).await;
    exec(&lun, &b, &[0; 6], &[]).await;
    lun.reset(ResetKind::Lun, Some(&a));
    // INQUIRY does not consume it.
    assert_eq!(
        exec(&lun, &a, &[0x12, 0, 0, 0, 36, 0], &[]).await.status,
        Status::Good
    );
    assert_eq!(
        check(&exec(&lun, &a, &[0; 6], &[]).await),
        Some((6, 0x29, 0x03))
    );
    assert_eq!(exec(&lun, &a, &[0; 6], &[]).await.status, Status::Good);
    // REQUEST SENSE returns and clears it.
    let rs = exec(&lun, &b, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_eq!((rs.data[2], rs.data[12], rs.data[13]), (6, 0x29, 0x03));
    assert_eq!(exec(&lun, &b, &[0; 6], &[]).await.status, Status::Good);
    let rs = exec(&lun, &b, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_eq!(rs.data[2], 0);
    // Nexuses not seen before the reset get nothing.
    assert_eq!(
        exec(&lun, &nexus(3), &[0; 6], &[]).await.status,
        Status::Good
    );
    lun.capacity_changed();
    assert_eq!(
        check(&exec(&lun, &a, &[0; 6], &[]).await),
        Some((6, 0x2a, 0x09))
    );
}

#[tokio::test]
async fn spc2_reservation_two_initiators() {
    let lun = mem_lun(1 << 20);
    let (a, b) = (nexus(1), nexus(2));
    assert_eq!(
        exec(&lun, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        Status::ReservationConflict
    );
    assert_eq!(
        exec(&lun, &b, &[0x17, 0, 0, 0, 0, 0], &[]).await.status,
        Status::Good
    );
    let ms = [0x1a, 0, 0x3f, 0, 255, 0];
    assert_eq!(exec(&lun, &a, &ms, &[]).await.status, Status::Good);
    assert_eq!(
        exec(&lun, &b, &ms, &[]).await.status,
        Status::ReservationConflict
    );
    assert_eq!(
        exec(&lun, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await.status,
        Status::Good
    );
    exec(&lun, &a, &[0x17, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(
        exec(&lun, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        Status::Good
    );
    lun.nexus_gone(&b);
    assert_eq!(exec(&lun, &a, &ms, &[]).await.status, Status::Good);
    exec(&lun, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await;
    lun.reset(ResetKind::TargetWarm, None);
    exec(&lun, &b, &[0; 6], &[]).await; // consumes the reset UA
    assert_eq!(
        exec(&lun, &b, &ms, &[]).await.status,
        Status::Good,
        "reset released it"
    );
}

#[tokio::test]
async fn persistent_reservation_through_execute() {
    let lun = mem_lun(1 << 20);
    let (a, b) = (nexus(1), nexus(2));
    let prout = |sa: u8, kind: u8| [0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let params = |key: u64, sa_key: u64| {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    };
    assert_eq!(
        exec(&lun, &a, &prout(6, 0), &params(0, 0xa)).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &b, &prout(6, 0), &params(0, 0xb)).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &a, &prout(1, 3), &params(0xa, 0)).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &b, &rw10(0x28, 0, 1), &[]).await.status,
        Status::ReservationConflict
    );
    assert_eq!(
        exec(&lun, &b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .await
            .status,
        Status::Good
    );
    // b preempts a: a gets REGISTRATIONS PREEMPTED.
    assert_eq!(
        exec(&lun, &b, &prout(4, 1), &params(0xb, 0xa)).await.status,
        Status::Good
    );
    assert_eq!(
        check(&exec(&lun, &a, &[0; 6], &[]).await),
        Some((6, 0x2a, 0x05))
    );
    assert_eq!(
        exec(&lun, &a, &rw10(0x28, 0, 1), &[]).await.status,
        Status::Good,
        "WE lets reads through"
    );
    assert_eq!(
        exec(&lun, &a, &rw10(0x2a, 0, 1), &[0; 512]).await.status,
        Status::ReservationConflict
    );
    // PR IN service action range.
    for sa in 0..0x20u8 {
        let r = exec(&lun, &a, &[0x5e, sa, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]).await;
        assert_eq!(r.status == Status::Good, sa < 4, "sa {sa}");
    }
}

#[tokio::test]
async fn misc_commands() {
    let lun = mem_lun(1 << 20);
    let n = nexus(1);
    let rl = exec(&lun, &n, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]).await;
    assert_eq!(
        &rl.data[..],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        check(&exec(&lun, &n, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0], &[]).await),
        Some((5, 0x24, 0))
    );
    assert_eq!(
        check(&exec(&lun, &n, &[0xa0, 0, 3, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]).await),
        Some((5, 0x24, 0))
    );
    let rc = exec(&lun, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&rc.data[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut sai = [0u8; 16];
    sai[0] = 0x9e;
    sai[1] = 0x1f;
    assert_eq!(
        check(&exec(&lun, &n, &sai, &[]).await),
        Some((5, 0x24, 0)),
        "unknown service action"
    );
    assert_eq!(
        exec(&lun, &n, &rw10(0x35, 0, 0), &[]).await.status,
        Status::Good
    );
    assert_eq!(
        exec(&lun, &n, &rw10(0x34, 2040, 8), &[]).await.status,
        Status::Good
    );
    assert_eq!(
        check(&exec(&lun, &n, &rw10(0x34, 2041, 8), &[]).await),
        Some((5, 0x21, 0))
    );
}

/// Every command REPORT SUPPORTED OPERATION CODES advertises is accepted by `execute`.
#[tokio::test]
async fn advertised_opcodes_are_implemented() {
    let lun = mem_lun(1 << 20);
    let n = nexus(1);
    let r = exec(
        &lun,
        &n,
        &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
        &[],
    )
    .await;
    assert_eq!(r.status, Status::Good);
    let len = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]) as usize;
    assert_eq!(len / 8, COMMANDS.len());
    for d in r.data[4..4 + len].chunks(8) {
        let mut cdb = vec![0u8; usize::from(u16::from_be_bytes([d[6], d[7]]))];
        cdb[0] = d[0];
        if d[5] & 1 != 0 {
            cdb[1] = d[3];
        }
        let resp = exec(&lun, &nexus(9), &cdb, &[0; 4096]).await;
        assert_ne!(
            check(&resp).map(|c| (c.1, c.2)),
            Some((0x20, 0)),
            "opcode {:#x}",
            d[0]
        );
        if d[5] & 1 != 0 {
            assert_ne!(
                check(&resp),
                Some((5, 0x24, 0)),
                "opcode {:#x}/{:#x} rejected",
                d[0],
                d[3]
            );
        }
    }
}

#[test]
fn fuzz_entry_survives_garbage() {
    let mut seed = 0x1234_5678u32;
    for len in 0..400usize {
        let data: Vec<u8> = (0..len % 80)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        fuzz_execute(&data);
    }
    for c in COMMANDS {
        let mut data = vec![3u8, c.opcode, c.service_action.unwrap_or(0xff)];
        data.extend_from_slice(&[0xff; 40]);
        fuzz_execute(&data);
    }
}

// ---------- write protection ----------

/// Every medium-changing command, with a CDB and data-out that succeed on a writable LUN
/// whose blocks 0..8 hold 0x5a, and that would change those blocks.
fn medium_changing_commands() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let one = vec![0xa5; 512];
    let w12 = vec![0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    let mut wv12 = w12.clone();
    wv12[0] = 0xae;
    let mut ws10_unmap = rw10(0x41, 0, 8).to_vec();
    ws10_unmap[1] = 0x08;
    let mut ws16_unmap = rw16(0x93, 0, 8).to_vec();
    ws16_unmap[1] = 0x08;
    let mut ws16_ndob = rw16(0x93, 0, 8).to_vec();
    ws16_ndob[1] = 0x01;
    let unmap = vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let mut unmap_list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    unmap_list.extend_from_slice(&0u64.to_be_bytes());
    unmap_list.extend_from_slice(&8u32.to_be_bytes());
    unmap_list.extend_from_slice(&[0; 4]);
    let mut caw = rw16(0x89, 0, 0).to_vec();
    caw[13] = 1;
    let mut caw_data = vec![0x5a; 512];
    caw_data.extend_from_slice(&one);
    vec![
        ("WRITE(6)", vec![0x0a, 0, 0, 0, 1, 0], one.clone()),
        ("WRITE(10)", rw10(0x2a, 0, 1).to_vec(), one.clone()),
        ("WRITE(12)", w12, one.clone()),
        ("WRITE(16)", rw16(0x8a, 0, 1).to_vec(), one.clone()),
        (
            "WRITE AND VERIFY(10)",
            rw10(0x2e, 0, 1).to_vec(),
            one.clone(),
        ),
        ("WRITE AND VERIFY(12)", wv12, one.clone()),
        (
            "WRITE AND VERIFY(16)",
            rw16(0x8e, 0, 1).to_vec(),
            one.clone(),
        ),
        ("WRITE SAME(10)", rw10(0x41, 0, 8).to_vec(), one.clone()),
        ("WRITE SAME(10) UNMAP", ws10_unmap, vec![0; 512]),
        ("WRITE SAME(16)", rw16(0x93, 0, 8).to_vec(), one.clone()),
        ("WRITE SAME(16) UNMAP", ws16_unmap, vec![0; 512]),
        ("WRITE SAME(16) NDOB", ws16_ndob, Vec::new()),
        ("UNMAP", unmap, unmap_list),
        ("COMPARE AND WRITE", caw, caw_data),
        ("ORWRITE(16)", rw16(0x8b, 0, 1).to_vec(), one),
    ]
}

async fn fill(lun: &Lun, n: &Nexus) {
    let r = exec(lun, n, &rw10(0x2a, 0, 8), &[0x5a; 4096]).await;
    assert_eq!(r.status, Status::Good, "{:?}", check(&r));
}

async fn first_blocks(lun: &Lun, n: &Nexus) -> Bytes {
    let r = exec(lun, n, &rw10(0x28, 0, 8), &[]).await;
    assert_eq!(r.status, Status::Good, "{:?}", check(&r));
    r.data
}

/// The table's medium-changing commands are exactly the ones exercised here.
#[test]
fn medium_changing_commands_cover_the_table() {
    let mut tested: Vec<u8> = medium_changing_commands()
        .iter()
        .map(|(_, cdb, _)| cdb[0])
        .collect();
    tested.sort_unstable();
    tested.dedup();
    let table: Vec<u8> = COMMANDS
        .iter()
        .filter(|c| c.medium != opcodes::Medium::Unchanged)
        .map(|c| c.opcode)
        .collect();
    assert_eq!(tested, table);
}

#[tokio::test]
async fn write_protected_lun_refuses_every_medium_change() {
    let lun = mem_lun(1 << 20);
    let n = nexus(1);
    fill(&lun, &n).await;
    let before = first_blocks(&lun, &n).await;
    assert!(lun.set_write_protected(true).await);
    assert!(
        !lun.set_write_protected(true).await,
        "no change, no second switch"
    );
    assert_eq!(
        check(&exec(&lun, &n, &[0, 0, 0, 0, 0, 0], &[]).await),
        Some((6, 0x2a, 0x01)),
        "MODE PARAMETERS CHANGED once"
    );
    for (name, cdb, data) in medium_changing_commands() {
        let r = exec(&lun, &n, &cdb, &data).await;
        assert_eq!(check(&r), Some((7, 0x27, 0)), "{name}");
        assert_eq!(
            first_blocks(&lun, &n).await,
            before,
            "{name} changed nothing"
        );
    }
    // Refused before any field is looked at: a zero-length WRITE too.
    assert_eq!(
        check(&exec(&lun, &n, &rw10(0x2a, 0, 0), &[]).await),
        Some((7, 0x27, 0))
    );
    // And the same commands work once the protection is lifted (the CDBs are valid).
    assert!(lun.set_write_protected(false).await);
    assert_eq!(
        check(&exec(&lun, &n, &[0, 0, 0, 0, 0, 0], &[]).await),
        Some((6, 0x2a, 0x01))
    );
    for (name, cdb, data) in medium_changing_commands() {
        fill(&lun, &n).await;
        let r = exec(&lun, &n, &cdb, &data).await;
        assert_eq!(r.status, Status::Good, "{name}: {:?}", check(&r));
        assert_ne!(first_blocks(&lun, &n).await, before, "{name} wrote");
    }
}

#[tokio::test]
async fn write_protected_lun_serves_everything_else() {
    let lun = mem_lun(1 << 20).with_write_protect(true);
    let n = nexus(1);
    let good = [
        ("TEST UNIT READY", vec![0, 0, 0, 0, 0, 0], Vec::new()),
        ("INQUIRY", vec![0x12, 0, 0, 0, 96, 0], Vec::new()),
        ("READ(6)", vec![0x08, 0, 0, 0, 1, 0], Vec::new()),
        ("READ(10)", rw10(0x28, 0, 8).to_vec(), Vec::new()),
        ("READ(16)", rw16(0x88, 0, 8).to_vec(), Vec::new()),
        ("VERIFY(10)", rw10(0x2f, 0, 8).to_vec(), Vec::new()),
        ("PRE-FETCH(10)", rw10(0x34, 0, 8).to_vec(), Vec::new()),
        (
            "SYNCHRONIZE CACHE(10)",
            rw10(0x35, 0, 0).to_vec(),
            Vec::new(),
        ),
        (
            "SYNCHRONIZE CACHE(16)",
            rw16(0x91, 0, 0).to_vec(),
            Vec::new(),
        ),
        (
            "READ CAPACITY(10)",
            vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Vec::new(),
        ),
        (
            "READ CAPACITY(16)",
            {
                let mut c = rw16(0x9e, 0, 32).to_vec();
                c[1] = 0x10;
                c
            },
            Vec::new(),
        ),
        (
            "GET LBA STATUS",
            {
                let mut c = rw16(0x9e, 0, 64).to_vec();
                c[1] = 0x12;
                c
            },
            Vec::new(),
        ),
        (
            "REPORT LUNS",
            vec![0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0],
            Vec::new(),
        ),
        ("START STOP UNIT", vec![0x1b, 0, 0, 0, 1, 0], Vec::new()),
        ("RESERVE(6)", vec![0x16, 0, 0, 0, 0, 0], Vec::new()),
        ("RELEASE(6)", vec![0x17, 0, 0, 0, 0, 0], Vec::new()),
    ];
    for (name, cdb, data) in good {
        let r = exec(&lun, &n, &cdb, &data).await;
        assert_eq!(r.status, Status::Good, "{name}: {:?}", check(&r));
    }
    let six = exec(&lun, &n, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await;
    assert_eq!(six.data[2] & 0x80, 0x80, "MODE SENSE(6) WP");
    let ten = exec(&lun, &n, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 0xff, 0], &[]).await;
    assert_eq!(ten.data[3] & 0x80, 0x80, "MODE SENSE(10) WP");
    // A MODE SELECT restating the current page is still accepted.
    let page = exec(&lun, &n, &[0x1a, 0x08, 0x08, 0, 0xff, 0], &[]).await;
    let mut list = page.data.to_vec();
    list[0] = 0;
    let r = exec(&lun, &n, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await;
    assert_eq!(r.status, Status::Good, "MODE SELECT: {:?}", check(&r));
    // Writable LUNs report no WP.
    let rw = mem_lun(1 << 20);
    let six = exec(&rw, &n, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await;
    assert_eq!(six.data[2] & 0x80, 0);
}

/// A device whose writes wait for a permit, to hold one in flight.
struct GatedDevice {
    inner: MemDevice,
    entered: tokio::sync::Semaphore,
    gate: tokio::sync::Semaphore,
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, DeviceError>> {
        self.inner.read(offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.entered.add_permits(1);
            self.gate.acquire().await.expect("gate open").forget();
            self.inner.write(offset, data, fua).await
        })
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        self.inner.flush()
    }
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> futures::future::BoxFuture<'_, Result<crate::device::Extent, DeviceError>> {
        self.inner.allocation(offset, len)
    }
}

/// Switching protection on waits for the write in flight, and no write starts after it.
#[tokio::test]
async fn switching_protection_on_drains_writes_in_flight() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(1 << 20),
        entered: tokio::sync::Semaphore::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    let lun = Arc::new(Lun::new(
        dev.clone(),
        LunIdentity {
            name: "vol".into(),
            naa: 42,
        },
    ));
    let n = nexus(1);
    let writer = {
        let (lun, n) = (lun.clone(), n.clone());
        tokio::spawn(async move { exec(&lun, &n, &rw10(0x2a, 0, 1), &[1; 512]).await })
    };
    dev.entered.acquire().await.expect("write entered").forget();
    let switch = {
        let lun = lun.clone();
        tokio::spawn(async move { lun.set_write_protected(true).await })
    };
    let late = {
        let (lun, n) = (lun.clone(), nexus(2));
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            exec(&lun, &n, &rw10(0x2a, 1, 1), &[2; 512]).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !switch.is_finished(),
        "the switch waits for the write in flight"
    );
    dev.gate.add_permits(1);
    assert_eq!(writer.await.unwrap().status, Status::Good);
    assert!(switch.await.unwrap());
    assert_eq!(check(&late.await.unwrap()), Some((7, 0x27, 0)));
    let r = exec(&lun, &n, &rw10(0x28, 0, 2), &[]).await;
    assert_eq!(check(&r), Some((6, 0x2a, 0x01)));
    let r = exec(&lun, &n, &rw10(0x28, 0, 2), &[]).await;
    assert_eq!(&r.data[..512], &[1; 512][..]);
    assert_eq!(&r.data[512..], &[0; 512][..], "the late write never landed");
}
