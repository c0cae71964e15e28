//! Real-initiator tests: `ironsan dev` driven by Debian's libiscsi utilities and qemu's iscsi
//! block driver. A missing tool fails the test with the `apt-get install` line that fixes it
//! (`scripts/install-test-deps.sh` installs everything).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The size `iscsi-ls -s` prints: it multiplies READ CAPACITY(10)'s *last* LBA (not the block
/// count) by the block size and divides by 1024 while the value exceeds 1024.
fn iscsi_ls_size(bytes: u64, block: u64) -> String {
    let mut size = (bytes / block - 1) * block;
    let units = ['\0', 'k', 'M', 'G', 'T'];
    let mut i = 0;
    while i < 4 && size > 1024 {
        size /= 1024;
        i += 1;
    }
    if i == 0 {
        size.to_string()
    } else {
        format!("{size}{}", units[i])
    }
}

/// `iscsi-ls -s` output as target -> [(lun, type, size)].
fn parse_iscsi_ls(out: &str) -> BTreeMap<String, Vec<(u32, String, Option<String>)>> {
    let mut map: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Target:") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            map.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(rest) = line.strip_prefix("Lun:") {
            let Some(target) = &current else { continue };
            let mut it = rest.split_whitespace();
            let lun: u32 = it.next().and_then(|l| l.parse().ok()).unwrap_or(u32::MAX);
            let ty = line
                .split("Type:")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("")
                .to_string();
            let size = line
                .split("(Size:")
                .nth(1)
                .and_then(|s| s.split(')').next())
                .map(str::to_string);
            map.entry(target.clone()).or_default().push((lun, ty, size));
        }
    }
    map
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

#[test]
fn discovery_lists_every_volume_with_its_size() {
    let dir = TestDir::new("discovery");
    let server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("vol-a", "64MiB")
            .volume("vol-b", "1GiB"),
    );
    let r = run("iscsi-ls", ["-s", &server.portal_url()])
        .expect_ok("iscsi-ls -s (SendTargets discovery)");
    let targets = parse_iscsi_ls(&r.stdout);
    for (vol, bytes) in [("vol-a", 64 * MIB), ("vol-b", GIB)] {
        let luns = targets
            .get(&iqn(vol))
            .unwrap_or_else(|| panic!("iscsi-ls does not list {}:\n{}", iqn(vol), r.describe()));
        let (_, ty, size) = luns
            .iter()
            .find(|(l, _, _)| *l == lun())
            .unwrap_or_else(|| panic!("{} has no LUN {}:\n{}", iqn(vol), lun(), r.describe()));
        assert_eq!(ty, "DIRECT_ACCESS", "LUN type of {vol}:\n{}", r.describe());
        assert_eq!(
            size.as_deref(),
            Some(iscsi_ls_size(bytes, 512).as_str()),
            "size of {vol} ({bytes} bytes, 512-byte blocks) as iscsi-ls prints it:\n{}",
            r.describe()
        );
    }
    let ours: Vec<_> = targets
        .keys()
        .filter(|t| t.starts_with(IQN_PREFIX))
        .collect();
    assert_eq!(
        ours.len(),
        2,
        "expected exactly the two volumes' targets, got {ours:?}"
    );
    server.stop_clean();
}

/// Raw bytes of the VPD 0x83 output (iscsi-inq prints binary designators with %s).
fn vpd83(url: &str) -> Vec<u8> {
    let r = run("iscsi-inq", ["-e", "1", "-c", "131", url]).expect_ok("iscsi-inq VPD 0x83");
    assert!(
        r.stdout.contains("Designator Type:(3) NAA"),
        "VPD 0x83 has no NAA designator:\n{}",
        r.describe()
    );
    r.stdout_bytes
}

#[test]
fn inquiry_and_vpd_pages() {
    let dir = TestDir::new("inquiry");
    let config = ServerConfig::default()
        .volume("inq1", "64MiB")
        .volume("inq2", "64MiB");
    let server = Server::start(dir.path(), config);
    let url = server.url("inq1");

    let std = run("iscsi-inq", [url.as_str()]).expect_ok("iscsi-inq standard INQUIRY");
    assert_eq!(
        field(&std.stdout, "Peripheral Qualifier:"),
        Some("CONNECTED"),
        "{}",
        std.describe()
    );
    assert_eq!(
        field(&std.stdout, "Peripheral Device Type:"),
        Some("DIRECT_ACCESS"),
        "{}",
        std.describe()
    );
    assert!(
        field(&std.stdout, "Vendor:").is_some_and(|v| !v.is_empty()),
        "no vendor id:\n{}",
        std.describe()
    );

    let pages =
        run("iscsi-inq", ["-e", "1", "-c", "0", url.as_str()]).expect_ok("iscsi-inq VPD 0x00");
    for p in ["Page:0x80", "Page:0x83", "Page:0xb0", "Page:0xb2"] {
        assert!(
            pages.stdout.contains(p),
            "supported VPD pages lack {p}:\n{}",
            pages.describe()
        );
    }

    let serial = |server: &Server, vol: &str| {
        let r = run("iscsi-inq", ["-e", "1", "-c", "128", &server.url(vol)])
            .expect_ok("iscsi-inq VPD 0x80");
        let s = field(&r.stdout, "Unit Serial Number:").map(|s| {
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .to_string()
        });
        assert_eq!(
            s.as_deref(),
            Some(vol),
            "unit serial number must be the volume name:\n{}",
            r.describe()
        );
    };
    serial(&server, "inq1");
    serial(&server, "inq2");

    let b0 =
        run("iscsi-inq", ["-e", "1", "-c", "176", url.as_str()]).expect_ok("iscsi-inq VPD 0xb0");
    assert!(
        b0.stdout.contains("maximum transfer length:"),
        "{}",
        b0.describe()
    );
    let b2 =
        run("iscsi-inq", ["-e", "1", "-c", "178", url.as_str()]).expect_ok("iscsi-inq VPD 0xb2");
    assert!(b2.stdout.contains("lbpu:"), "{}", b2.describe());

    let id1 = vpd83(&server.url("inq1"));
    let id2 = vpd83(&server.url("inq2"));
    assert_ne!(
        id1, id2,
        "two volumes report the same device identification page"
    );

    let server = server.restart();
    serial(&server, "inq1");
    assert_eq!(
        vpd83(&server.url("inq1")),
        id1,
        "VPD 0x83 (NAA designator) changed across a restart"
    );
    server.stop_clean();
}

#[test]
fn qemu_data_round_trip_survives_restart_and_crash() {
    let dir = TestDir::new("roundtrip");
    let config = ServerConfig::default().volume("data", "1GiB");
    let server = Server::start(dir.path(), config);
    let url = server.url("data");
    let tail = GIB - MIB;

    qemu_io(
        &url,
        &[
            format!("write -P 0x5a 0 {}", 4 * MIB),
            format!("write -P 0xa5 {tail} {MIB}"),
            "flush".into(),
        ],
    )
    .expect_ok("qemu-io write 0x5a at 0 (4M) and 0xa5 in the last MiB");

    let verify_all = |url: &str, when: &str| {
        qemu_verify(url, 0, 4 * MIB, 0x5a).expect_ok(&format!("{when}: read -P 0x5a 0 4M"));
        qemu_verify(url, tail, MIB, 0xa5).expect_ok(&format!("{when}: read -P 0xa5 1G-1M 1M"));
        qemu_verify(url, 512 * MIB, MIB, 0x00)
            .expect_ok(&format!("{when}: never-written blocks read as zeros"));
    };
    verify_all(&url, "after write");
    // The check must bite: a wrong pattern fails.
    qemu_verify(&url, 0, 4 * MIB, 0x5b).expect_fail("read -P 0x5b over data written with 0x5a");

    let server = server.restart();
    let url = server.url("data");
    verify_all(&url, "after SIGTERM + restart");

    // Flushed data survives a crash (SIGKILL).
    qemu_write(&url, 8 * MIB, MIB, 0x3c).expect_ok("qemu-io write 0x3c at 8M + flush");
    let config = server.config().clone();
    server.kill_hard();
    let server = Server::start(dir.path(), config);
    let url = server.url("data");
    verify_all(&url, "after SIGKILL + restart");
    qemu_verify(&url, 8 * MIB, MIB, 0x3c).expect_ok("after SIGKILL + restart: read -P 0x3c 8M 1M");
    server.stop_clean();
}

#[test]
fn qemu_img_convert_in_and_out_is_byte_identical() {
    let dir = TestDir::new("convert");
    let server = Server::start(dir.path(), ServerConfig::default().volume("conv", "8MiB"));
    let url = server.url("conv");

    let info = run("qemu-img", ["info", "-f", "raw", url.as_str()]).expect_ok("qemu-img info");
    assert!(
        info.stdout.contains("virtual size: 8 MiB (8388608 bytes)"),
        "qemu-img info must report 8 MiB:\n{}",
        info.describe()
    );

    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let data = pseudo_random(8 * MIB as usize, 0x1e0_5a4);
    std::fs::write(&src, &data).expect("write source image");
    run(
        "qemu-img",
        [
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            url.as_str(),
        ],
    )
    .expect_ok("qemu-img convert file -> LUN");
    run(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            url.as_str(),
            back.to_str().unwrap(),
        ],
    )
    .expect_ok("qemu-img convert LUN -> file");
    let got = std::fs::read(&back).expect("read converted image");
    assert_eq!(got.len(), data.len(), "converted image size");
    if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
        panic!(
            "image differs from the source at byte {i} (block {})",
            i / 512
        );
    }
    server.stop_clean();
}

#[test]
fn chap_one_way() {
    let dir = TestDir::new("chap");
    let (user, secret) = ("u", "ironsan-secret-1");
    let mut server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("sec", "64MiB")
            .chap(user, secret),
    );
    let good = server.url_with_auth("sec", user, secret);
    run("iscsi-inq", [good.as_str()]).expect_ok("login with the right CHAP secret");
    qemu_write(&good, 0, MIB, 0x42).expect_ok("qemu-io write with CHAP credentials");
    qemu_verify(&good, 0, MIB, 0x42).expect_ok("qemu-io read with CHAP credentials");
    run(
        "iscsi-ls",
        ["-s", &format!("iscsi://{user}%{secret}@{}", server.addr)],
    )
    .expect_ok("discovery with CHAP credentials");

    let bad = server.url_with_auth("sec", user, "wrong-secret-123");
    run("iscsi-inq", [bad.as_str()]).expect_fail("login with a wrong CHAP secret");
    let bad_user = server.url_with_auth("sec", "someone-else", secret);
    run("iscsi-inq", [bad_user.as_str()]).expect_fail("login with a wrong CHAP user");
    run("iscsi-inq", [server.url("sec").as_str()]).expect_fail("login without credentials");
    qemu_verify(&server.url("sec"), 0, MIB, 0x42).expect_fail("qemu-io read without credentials");

    server.assert_running("after failed logins");
    run("iscsi-inq", [good.as_str()])
        .expect_ok("login with the right secret after failed attempts");
    server.stop_clean();
}

#[test]
fn chap_mutual() {
    let dir = TestDir::new("mutual");
    let (user, secret) = ("u", "ironsan-secret-1");
    let (tuser, tsecret) = ("ironsan-target", "target-secret-2");
    let mut server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("mut", "64MiB")
            .chap(user, secret)
            .mutual_chap(tuser, tsecret),
    );
    let base = server.url_with_auth("mut", user, secret);
    // libiscsi's URL parameters for bidirectional CHAP (lib/init.c: target_user, target_password).
    let with_target = |tu: &str, tp: &str| format!("{base}?target_user={tu}&target_password={tp}");

    run("iscsi-inq", [with_target(tuser, tsecret).as_str()])
        .expect_ok("mutual CHAP login with the right target credentials");
    run(
        "iscsi-inq",
        [with_target(tuser, "not-the-target-secret").as_str()],
    )
    .expect_fail("mutual CHAP: the initiator must refuse a target that proves a different secret");
    run("iscsi-inq", [with_target("impostor", tsecret).as_str()])
        .expect_fail("mutual CHAP: the initiator must refuse a target with a different name");
    let wrong_initiator = format!(
        "{}?target_user={tuser}&target_password={tsecret}",
        server.url_with_auth("mut", user, "wrong-secret-123")
    );
    run("iscsi-inq", [wrong_initiator.as_str()])
        .expect_fail("mutual CHAP with a wrong initiator secret");

    server.assert_running("after mutual CHAP attempts");
    run("iscsi-inq", [with_target(tuser, tsecret).as_str()]).expect_ok("mutual CHAP login again");
    server.stop_clean();
}

#[test]
fn concurrent_sessions_on_two_volumes() {
    let dir = TestDir::new("concurrent");
    let server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("c1", "256MiB")
            .volume("c2", "256MiB"),
    );
    let len = 16 * MIB;
    let jobs: Vec<(String, u64, u8)> = vec![
        (server.url("c1"), 0, 0x11),
        (server.url("c1"), 64 * MIB, 0x22),
        (server.url("c2"), 0, 0x33),
        (server.url("c2"), 64 * MIB, 0x44),
    ];
    let spawn_all = |verify: bool| {
        let handles: Vec<_> = jobs
            .iter()
            .cloned()
            .map(|(url, off, pat)| {
                thread::spawn(move || {
                    if verify {
                        qemu_verify(&url, off, len, pat)
                            .expect_ok(&format!("concurrent verify 0x{pat:02x} at {off} on {url}"));
                    } else {
                        qemu_write(&url, off, len, pat)
                            .expect_ok(&format!("concurrent write 0x{pat:02x} at {off} on {url}"));
                    }
                })
            })
            .collect();
        for h in handles {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    };
    spawn_all(false);
    spawn_all(true);
    // Neighbouring blocks untouched.
    for url in [server.url("c1"), server.url("c2")] {
        qemu_verify(&url, len, MIB, 0).expect_ok("blocks after the first region stay zero");
        qemu_verify(&url, 64 * MIB + len, MIB, 0)
            .expect_ok("blocks after the second region stay zero");
    }
    server.stop_clean();
}

// ------------------------------------------------------------------------------------------
// Bad input over raw TCP

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("set read timeout");
    s.set_write_timeout(Some(Duration::from_secs(15)))
        .expect("set write timeout");
    s
}

/// A Login Request BHS (RFC 7143 11.12), CSG=security, NSG=operational, T=1, plus its data.
fn login_pdu(target: &str, data_segment_length: Option<u32>) -> Vec<u8> {
    let text = format!(
        "InitiatorName=iqn.2026-11.io.ironsan.test:raw-socket\0SessionType=Normal\0TargetName={target}\0AuthMethod=None\0"
    );
    let mut data = text.into_bytes();
    let dsl = data_segment_length.unwrap_or(data.len() as u32);
    while data.len() % 4 != 0 {
        data.push(0);
    }
    let mut bhs = [0u8; 48];
    bhs[0] = 0x40 | 0x03; // immediate, Login Request
    bhs[1] = 0x80 | 0x01; // T=1, CSG=0 (security), NSG=1 (operational)
    bhs[4] = 0; // TotalAHSLength
    bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
    bhs[8..14].copy_from_slice(&[0x80, 0x00, 0x12, 0x34, 0x56, 0x78]); // ISID (random format)
    bhs[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
    bhs[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    let mut pdu = bhs.to_vec();
    pdu.extend_from_slice(&data);
    pdu
}

/// After the client half-closes, the target must close too (not hang on the socket).
fn expect_closed(mut s: TcpStream, what: &str) {
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // a reject / login response is fine; keep reading until it closes
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the target neither answered nor closed the connection: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the target kept the connection open"
        );
    }
}

#[test]
fn bad_input_over_raw_tcp_harms_nothing() {
    let dir = TestDir::new("badinput");
    let mut server = Server::start(dir.path(), ServerConfig::default().volume("bad", "64MiB"));
    let url = server.url("bad");
    qemu_write(&url, 0, MIB, 0x77).expect_ok("seed data");
    let still_fine = |server: &mut Server, after: &str| {
        server.assert_running(after);
        qemu_verify(&url, 0, MIB, 0x77).expect_ok(&format!("normal read {after}"));
    };

    // 1. 48 bytes of garbage instead of a login.
    let mut s = connect(&server.addr);
    let mut garbage = pseudo_random(48, 0xbad);
    garbage[0] = 0x3f; // not a valid initiator opcode
    s.write_all(&garbage).expect("send garbage");
    expect_closed(s, "garbage BHS");
    still_fine(&mut server, "after a garbage BHS");

    // 2. A login PDU announcing a 16 MiB data segment, held open while others work.
    let mut huge = connect(&server.addr);
    let pdu = login_pdu(&iqn("bad"), Some(0x00ff_ffff));
    huge.write_all(&pdu[..48]).expect("send BHS");
    let _ = huge.write_all(&[b'A'; 1024]); // the target may already have hung up
    still_fine(
        &mut server,
        "while a login with a 16 MiB data segment is pending",
    );
    expect_closed(huge, "login with an absurd data segment length");
    still_fine(&mut server, "after a login with a 16 MiB data segment");

    // 3a. Connection dropped in the middle of the first BHS.
    let mut s = connect(&server.addr);
    s.write_all(&login_pdu(&iqn("bad"), None)[..20])
        .expect("send partial BHS");
    drop(s);
    still_fine(&mut server, "after a connection dropped mid-BHS");

    // 3b. A well-formed first login step answered by the target, then the connection drops.
    let mut s = connect(&server.addr);
    s.write_all(&login_pdu(&iqn("bad"), None))
        .expect("send login request");
    let mut rsp = [0u8; 48];
    s.read_exact(&mut rsp).expect("read login response BHS");
    assert_eq!(
        rsp[0] & 0x3f,
        0x23,
        "expected a Login Response (0x23), got opcode {:#04x}",
        rsp[0] & 0x3f
    );
    assert_eq!(
        rsp[36], 0,
        "login status class {} (detail {}), expected success",
        rsp[36], rsp[37]
    );
    drop(s);
    still_fine(&mut server, "after a connection dropped mid-login");

    // 4. Many idle connections do not starve real sessions.
    let idle: Vec<_> = (0..32).map(|_| connect(&server.addr)).collect();
    still_fine(&mut server, "with 32 idle connections open");
    drop(idle);
    still_fine(&mut server, "after 32 idle connections closed");
    server.stop_clean();
}

// ------------------------------------------------------------------------------------------
// Conformance: libiscsi's iscsi-test-cu, one process per family

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// Parses iscsi-test-cu (CUnit basic interface) verbose output into test -> (outcome, reason).
/// A test that CUnit "passed" but that printed [SKIPPED] counts as a skip.
fn parse_cunit(out: &str) -> Vec<(String, Outcome, String)> {
    struct Cur {
        name: String,
        res: Option<bool>,
        skip: String,
        fail: String,
    }
    fn flush(cur: &mut Option<Cur>, acc: &mut Vec<(String, Outcome, String)>) {
        if let Some(c) = cur.take() {
            let (o, why) = match c.res {
                None => (
                    Outcome::Fail,
                    "no CUnit result (crash/timeout?)".to_string(),
                ),
                Some(false) => (Outcome::Fail, c.fail),
                Some(true) if !c.skip.is_empty() => (Outcome::Skip, c.skip),
                Some(true) => (Outcome::Pass, String::new()),
            };
            acc.push((c.name, o, why));
        }
    }
    fn body(c: &mut Cur, s: &str) {
        if c.res.is_none() {
            if s.starts_with("passed") {
                c.res = Some(true);
            } else if s.starts_with("FAILED") {
                c.res = Some(false);
            } else if (s.contains("[SKIPPED]") || s.contains("[SKIPPING]")) && c.skip.is_empty() {
                c.skip = s.trim().to_string();
            } else if (s.contains("[FAILED]") || s.contains("[FAILURE]")) && c.fail.is_empty() {
                c.fail = s.trim().to_string();
            }
        } else if c.res == Some(false) && c.fail.is_empty() && s.starts_with("    ") {
            c.fail = s.trim().to_string();
        }
    }
    let mut acc = Vec::new();
    let mut cur: Option<Cur> = None;
    for line in out.lines() {
        if line.starts_with("Suite: ") {
            flush(&mut cur, &mut acc);
        } else if line.starts_with("Run Summary:") {
            flush(&mut cur, &mut acc);
            break;
        } else if let Some(rest) = line.strip_prefix("  Test: ") {
            flush(&mut cur, &mut acc);
            let (name, tail) = match rest.find(" ...") {
                Some(p) => (&rest[..p], &rest[p + 4..]),
                None => (rest, ""),
            };
            let mut c = Cur {
                name: name.to_string(),
                res: None,
                skip: String::new(),
                fail: String::new(),
            };
            body(&mut c, tail);
            cur = Some(c);
        } else if let Some(c) = cur.as_mut() {
            body(c, line);
        }
    }
    flush(&mut cur, &mut acc);
    acc
}

#[test]
fn conformance_iscsi_test_cu() {
    require_tool("iscsi-test-cu");
    let required: Vec<&str> = include_str!("data/conformance-required.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let known: Vec<&str> = include_str!("data/conformance-known-failures.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let dir = TestDir::new("conformance");
    let mut server = Server::start(dir.path(), ServerConfig::default().volume("conf", "1GiB"));
    let url = server.url("conf");

    let list = run("iscsi-test-cu", ["--list"]).expect_ok("iscsi-test-cu --list");
    let all: Vec<&str> = list.stdout.lines().map(str::trim).collect();
    let families: Vec<&str> = all
        .iter()
        .copied()
        .filter(|l| {
            (l.starts_with("SCSI.") || l.starts_with("iSCSI.")) && l.matches('.').count() == 1
        })
        .collect();
    assert!(
        families.len() > 30,
        "iscsi-test-cu --list gave too few families:\n{}",
        list.describe()
    );

    // tgt runs the whole suite in ~25 s here; a family that needs 2 minutes is hung.
    let family_timeout = 120;
    let mut results: BTreeMap<String, (Outcome, String)> = BTreeMap::new();
    let mut table =
        String::from("FAMILY                           TESTS  PASS  FAIL  SKIP  NOTE\n");
    for fam in &families {
        let started = Instant::now();
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-k",
            "10",
            &family_timeout.to_string(),
            "iscsi-test-cu",
            "-d",
            "-t",
            fam,
            &url,
        ]);
        if fam.ends_with(".MultipathIO") {
            cmd.arg(&url); // a second session to the same LUN = a second path
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run iscsi-test-cu: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rc = out.status.code().unwrap_or(-1);
        let mut tests = parse_cunit(&text);
        let why_missing = match rc {
            124 | 137 => format!("family timed out after {family_timeout}s"),
            0 | 1 => "not run (suite setup failed?)".to_string(),
            _ => format!(
                "iscsi-test-cu exited {rc}: {}",
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
            ),
        };
        let prefix = format!("{fam}.");
        for t in all
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|t| !t.contains('.'))
        {
            if !tests.iter().any(|(n, _, _)| n == t) {
                tests.push((t.to_string(), Outcome::Fail, why_missing.clone()));
            }
        }
        let count = |o| tests.iter().filter(|(_, x, _)| *x == o).count();
        let note = match rc {
            0 | 1 => format!("{}s", started.elapsed().as_secs()),
            124 | 137 => format!("{}s TIMEOUT", started.elapsed().as_secs()),
            _ => format!("{}s rc={rc}", started.elapsed().as_secs()),
        };
        table.push_str(&format!(
            "{:<32} {:>5} {:>5} {:>5} {:>5}  {note}\n",
            fam,
            tests.len(),
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip)
        ));
        for (name, o, why) in tests {
            results.insert(format!("{fam}.{name}"), (o, why));
        }
        if !server.is_running() {
            break;
        }
    }
    let failed: Vec<_> = results
        .iter()
        .filter(|(name, (o, _))| *o == Outcome::Fail && !known.contains(&name.as_str()))
        .collect();
    for name in &known {
        println!("  known failure {name}: {:?}", results.get(*name));
    }
    let (p, s) = (
        results
            .values()
            .filter(|(o, _)| *o == Outcome::Pass)
            .count(),
        results
            .values()
            .filter(|(o, _)| *o == Outcome::Skip)
            .count(),
    );
    println!(
        "{table}\niscsi-test-cu: {p} passed, {} failed, {s} skipped, {} known failure(s) (cli/tests/data/conformance-known-failures.txt)",
        failed.len(),
        known.iter().filter(|k| matches!(results.get(**k), Some((Outcome::Fail, _)))).count()
    );
    for (name, (_, why)) in &failed {
        println!("  FAIL {name}: {why}");
    }
    let missing: Vec<_> = required
        .iter()
        .filter(|t| !matches!(results.get(**t), Some((Outcome::Pass, _))))
        .map(|t| match results.get(*t) {
            Some((o, why)) => format!("{t} ({o:?}: {why})"),
            None => format!("{t} (not run)"),
        })
        .collect();
    server.assert_running("after the conformance suite");
    assert!(
        failed.is_empty() && missing.is_empty(),
        "conformance: {} failed, {} of the {} required tests (cli/tests/data/conformance-required.txt) did not pass:\n  {}\n{table}",
        failed.len(),
        missing.len(),
        required.len(),
        missing.join("\n  ")
    );
    server.stop_clean();
}

#[test]
fn iscsi_ls_size_matches_libiscsi_formula() {
    assert_eq!(iscsi_ls_size(GIB, 512), "1023M");
    assert_eq!(iscsi_ls_size(64 * MIB, 512), "63M");
}
