//! Protocol tests of the gateway over real sockets, with a minimal iSCSI initiator written
//! here so that every PDU (including malformed ones) is under the test's control. Real
//! initiators (libiscsi, qemu, Linux) are exercised by `cli/tests` and `tests/vm`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ironsan_gateway::device::MemDevice;
use ironsan_gateway::iscsi::chap::{self, Credentials};
use ironsan_gateway::iscsi::pdu::{op, try_parse, Bhs, Framing, OutPdu, Pdu, StatSn, NO_TAG};
use ironsan_gateway::iscsi::text;
use ironsan_gateway::target::{self, Gateway, GatewayConfig, TargetOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TARGET: &str = "iqn.2026-11.io.ironsan:vol";
const INITIATOR: &str = "iqn.2026-11.test:client";
const WAIT: Duration = Duration::from_secs(5);

struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn server(config: GatewayConfig) -> Server {
    let gw = Gateway::new(config).expect("config");
    gw.add_target(
        "vol",
        Arc::new(MemDevice::new(16 << 20)),
        TargetOptions::default(),
    )
    .expect("target");
    gw.add_target(
        "other",
        Arc::new(MemDevice::new(1 << 20)),
        TargetOptions::acl(vec!["iqn.2026-11.test:nobody".into()]),
    )
    .expect("target");
    let listener = target::bind("127.0.0.1:0".parse().unwrap())
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move { gw.serve(listener, s).await });
    Server { addr, shutdown }
}

struct Client {
    io: TcpStream,
    buf: BytesMut,
    framing: Framing,
    itt: u32,
    cmdsn: u32,
    isid: [u8; 6],
}

type Keys = Vec<(String, String)>;

fn keys(pairs: &[(&str, &str)]) -> Keys {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get(keys: &Keys, k: &str) -> Option<String> {
    keys.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.clone())
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, isid: u8) -> Self {
        let io = TcpStream::connect(addr).await.expect("connect");
        let framing = Framing {
            header_digest: false,
            data_digest: false,
            max_data: 1 << 24,
        };
        Self {
            io,
            buf: BytesMut::new(),
            framing,
            itt: 1,
            cmdsn: 1,
            isid: [0x80, 0, 0, 0, 0, isid],
        }
    }

    async fn send(&mut self, bhs: Bhs, data: Bytes) {
        let mut parts = Vec::new();
        OutPdu::new(bhs, data, StatSn::None).encode(&self.framing, &mut parts);
        for p in parts {
            self.io.write_all(&p).await.expect("send");
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("send");
    }

    /// Next PDU, or None when the target closed the connection.
    async fn recv(&mut self) -> Option<Pdu> {
        loop {
            if let Some(p) =
                try_parse(&mut self.buf, &self.framing).expect("target sent a malformed PDU")
            {
                return Some(p);
            }
            let n = tokio::time::timeout(WAIT, self.io.read_buf(&mut self.buf))
                .await
                .expect("target silent")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    async fn expect_silence(&mut self, d: Duration) {
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(d, self.io.peek(&mut b)).await.is_err(),
            "target answered"
        );
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, data: &Keys) -> (Bhs, Bytes) {
        let mut b = Bhs::new(op::LOGIN_REQ | 0x40);
        b.set_flags((if transit { 0x80 | nsg } else { 0 }) | (csg << 2));
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_itt(self.itt);
        b.set_u32(24, self.cmdsn);
        (b, Bytes::from(text::encode(data)))
    }

    /// One login exchange; returns (status class, detail, transit, keys).
    async fn login_step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        data: Keys,
    ) -> (u8, u8, bool, Keys) {
        let (b, d) = self.login_pdu(csg, nsg, transit, &data);
        self.send(b, d).await;
        let r = self.recv().await.expect("login response");
        assert_eq!(r.bhs.opcode(), op::LOGIN_RSP);
        (
            r.bhs.0[36],
            r.bhs.0[37],
            r.bhs.flags() & 0x80 != 0,
            text::parse(&r.data).expect("response text"),
        )
    }

    /// A complete login without authentication, straight to Full Feature Phase.
    async fn login(&mut self, extra: &[(&str, &str)]) -> Keys {
        let mut k = keys(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ]);
        k.extend(keys(extra));
        let (class, detail, transit, reply) = self.login_step(1, 3, true, k).await;
        assert_eq!((class, detail), (0, 0), "login refused: {reply:?}");
        assert!(transit);
        if get(&reply, "HeaderDigest").as_deref() == Some("CRC32C") {
            self.framing.header_digest = true;
        }
        if get(&reply, "DataDigest").as_deref() == Some("CRC32C") {
            self.framing.data_digest = true;
        }
        reply
    }

    fn command(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool, final_bit: bool) -> Bhs {
        let mut b = Bhs::new(op::SCSI_CMD);
        b.set_flags(
            (if final_bit { 0x80 } else { 0 })
                | (if read { 0x40 } else { 0 })
                | (if write { 0x20 } else { 0 })
                | 1,
        );
        let itt = self.next_itt();
        b.set_itt(itt);
        b.set_u32(20, edtl);
        b.set_u32(24, self.cmdsn);
        self.cmdsn += 1;
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        b
    }

    /// Runs a command to completion, answering R2Ts; returns (status, data-in, sense).
    async fn scsi(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> (u8, Vec<u8>, Vec<u8>) {
        let write = !data_out.is_empty();
        let edtl = if write {
            data_out.len() as u32
        } else {
            read_len
        };
        let b = self.command(cdb, edtl, read_len > 0, write, true);
        let itt = b.itt();
        self.send(b, Bytes::new()).await;
        let mut data = Vec::new();
        loop {
            let p = self.recv().await.expect("response");
            assert_eq!(p.bhs.itt(), itt, "response for another task: {:?}", p.bhs);
            match p.bhs.opcode() {
                op::R2T => {
                    let (ttt, off, len) = (p.bhs.u32_at(20), p.bhs.u32_at(40), p.bhs.u32_at(44));
                    self.data_out(
                        itt,
                        ttt,
                        off,
                        &data_out[off as usize..(off + len) as usize],
                        0,
                    )
                    .await;
                }
                op::DATA_IN => {
                    assert_eq!(p.bhs.u32_at(40) as usize, data.len(), "Data-In offset");
                    data.extend_from_slice(&p.data);
                    if p.bhs.flags() & 0x01 != 0 {
                        return (p.bhs.0[3], data, Vec::new());
                    }
                }
                op::SCSI_RSP => {
                    let sense = if p.data.len() > 2 {
                        p.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (p.bhs.0[3], data, sense);
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// Sends `data` as Data-Out PDUs of at most 8 KiB for one burst.
    async fn data_out(&mut self, itt: u32, ttt: u32, offset: u32, data: &[u8], first_datasn: u32) {
        let chunks: Vec<&[u8]> = data.chunks(8192).collect();
        let n = chunks.len();
        let mut off = offset;
        for (i, c) in chunks.into_iter().enumerate() {
            let mut b = Bhs::new(op::DATA_OUT);
            b.set_flags(if i + 1 == n { 0x80 } else { 0 });
            b.set_itt(itt);
            b.set_u32(20, ttt);
            b.set_u32(36, first_datasn + i as u32);
            b.set_u32(40, off);
            off += c.len() as u32;
            self.send(b, Bytes::copy_from_slice(c)).await;
        }
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn write_with_r2ts_and_read_back() {
    let s = server(GatewayConfig::default()).await;
    let mut c = Client::connect(s.addr, 1).await;
    let reply = c
        .login(&[
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "16384"),
            ("MaxOutstandingR2T", "2"),
        ])
        .await;
    assert_eq!(get(&reply, "MaxOutstandingR2T").as_deref(), Some("2"));
    assert_eq!(get(&reply, "MaxBurstLength").as_deref(), Some("16384"));
    assert!(
        get(&reply, "MaxRecvDataSegmentLength").is_some(),
        "target declares its MRDSL"
    );

    // 64 KiB in 16 KiB bursts: the first two R2Ts arrive before any data is sent.
    let data = pattern(65536, 7);
    let cmd = c.command(&write10(100, 128), 65536, false, true, true);
    let itt = cmd.itt();
    c.send(cmd, Bytes::new()).await;
    let r1 = c.recv().await.unwrap();
    let r2 = c.recv().await.unwrap();
    assert_eq!((r1.bhs.opcode(), r2.bhs.opcode()), (op::R2T, op::R2T));
    assert_eq!((r1.bhs.u32_at(40), r1.bhs.u32_at(44)), (0, 16384));
    assert_eq!((r2.bhs.u32_at(40), r2.bhs.u32_at(36)), (16384, 1));
    c.data_out(itt, r1.bhs.u32_at(20), 0, &data[..16384], 0)
        .await;
    c.data_out(itt, r2.bhs.u32_at(20), 16384, &data[16384..32768], 0)
        .await;
    let mut next = 32768;
    loop {
        let p = c.recv().await.unwrap();
        match p.bhs.opcode() {
            op::R2T => {
                let (ttt, off, len) = (p.bhs.u32_at(20), p.bhs.u32_at(40), p.bhs.u32_at(44));
                assert_eq!(off, next);
                next += len;
                c.data_out(itt, ttt, off, &data[off as usize..(off + len) as usize], 0)
                    .await;
            }
            op::SCSI_RSP => {
                assert_eq!(p.bhs.0[3], 0, "write status");
                break;
            }
            o => panic!("opcode {o:#x}"),
        }
    }
    let (status, back, _) = c.scsi(&read10(100, 128), &[], 65536).await;
    assert_eq!(status, 0);
    assert_eq!(back, data);
}

#[tokio::test]
async fn digests_protect_both_directions() {
    let s = server(GatewayConfig::default()).await;
    let mut c = Client::connect(s.addr, 2).await;
    c.login(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C,None")])
        .await;
    assert!(c.framing.header_digest && c.framing.data_digest);
    let data = pattern(4096, 3);
    let (st, _, _) = c.scsi(&write10(8, 8), &data, 0).await;
    assert_eq!(st, 0);
    let (st, back, _) = c.scsi(&read10(8, 8), &[], 4096).await;
    assert_eq!((st, back), (0, data));

    // A corrupted data digest is rejected and the connection closed; nothing is written.
    let cmd = c.command(&write10(8, 1), 512, false, true, true);
    let mut parts = Vec::new();
    OutPdu::new(cmd, Bytes::from(vec![0xee; 512]), StatSn::None).encode(&c.framing, &mut parts);
    let mut wire: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    c.send_raw(&wire).await;
    let rej = c.recv().await.expect("reject");
    assert_eq!((rej.bhs.opcode(), rej.bhs.0[2]), (op::REJECT, 0x02));
    assert!(
        c.recv().await.is_none(),
        "connection closed after a digest error"
    );
    let mut c2 = Client::connect(s.addr, 3).await;
    c2.login(&[]).await;
    let (_, back, _) = c2.scsi(&read10(8, 1), &[], 512).await;
    assert_eq!(back, pattern(4096, 3)[..512].to_vec());
}

#[tokio::test]
async fn cmdsn_gaps_wait_and_out_of_window_commands_are_dropped() {
    let s = server(GatewayConfig::default()).await;
    let mut c = Client::connect(s.addr, 4).await;
    c.login(&[]).await;
    let tur = [0u8; 6];
    let first = c.command(&tur, 0, false, false, true);
    let second = c.command(&tur, 0, false, false, true);
    // CmdSN+1 first: it must wait for the gap to close.
    c.send(second.clone(), Bytes::new()).await;
    c.expect_silence(Duration::from_millis(300)).await;
    c.send(first.clone(), Bytes::new()).await;
    let a = c.recv().await.unwrap();
    let b = c.recv().await.unwrap();
    assert_eq!(
        (a.bhs.itt(), b.bhs.itt()),
        (first.itt(), second.itt()),
        "executed in CmdSN order"
    );
    assert_eq!(b.bhs.u32_at(28), c.cmdsn, "ExpCmdSN advanced past both");
    let max_cmdsn = b.bhs.u32_at(32);

    // Beyond MaxCmdSN: silently ignored (RFC 7143 4.2.2.1); the session carries on.
    let mut far = c.command(&tur, 0, false, false, true);
    far.set_u32(24, max_cmdsn.wrapping_add(1));
    c.cmdsn -= 1;
    c.send(far, Bytes::new()).await;
    c.expect_silence(Duration::from_millis(300)).await;
    let (st, _, _) = c.scsi(&tur, &[], 0).await;
    assert_eq!(st, 0);
}

#[tokio::test]
async fn malformed_pdus_harm_nothing_else() {
    let s = server(GatewayConfig::default()).await;
    let mut good = Client::connect(s.addr, 5).await;
    good.login(&[]).await;
    let data = pattern(1024, 9);
    assert_eq!(good.scsi(&write10(0, 2), &data, 0).await.0, 0);

    // Unknown opcode: Reject, session continues.
    let mut c = Client::connect(s.addr, 6).await;
    c.login(&[]).await;
    let mut weird = Bhs::new(0x1d);
    weird.set_itt(77);
    c.send(weird, Bytes::new()).await;
    let r = c.recv().await.unwrap();
    assert_eq!((r.bhs.opcode(), r.bhs.0[2]), (op::REJECT, 0x05));
    assert_eq!(c.scsi(&[0u8; 6], &[], 0).await.0, 0);

    // A Data-Out for a task that does not exist: Reject.
    let mut d = Bhs::new(op::DATA_OUT);
    d.set_flags(0x80);
    d.set_itt(0xdead);
    d.set_u32(20, 0x1234);
    c.send(d, Bytes::from_static(&[0; 512])).await;
    assert_eq!(c.recv().await.unwrap().bhs.opcode(), op::REJECT);

    // A bad DataSN fails that command only.
    let cmd = c.command(&write10(0, 2), 1024, false, true, true);
    let itt = cmd.itt();
    c.send(cmd, Bytes::new()).await;
    let r2t = c.recv().await.unwrap();
    assert_eq!(r2t.bhs.opcode(), op::R2T);
    c.data_out(itt, r2t.bhs.u32_at(20), 0, &[0xff; 1024], 5)
        .await;
    let rsp = c.recv().await.unwrap();
    assert_eq!(
        (rsp.bhs.opcode(), rsp.bhs.0[3]),
        (op::SCSI_RSP, 2),
        "CHECK CONDITION"
    );
    assert_eq!(rsp.data[2 + 2] & 0x0f, 0x0b, "ABORTED COMMAND");
    assert_eq!(
        c.scsi(&read10(0, 2), &[], 1024).await.1,
        data,
        "nothing of the bad write landed"
    );

    // An oversized data segment closes that connection only.
    let mut huge = Bhs::new(op::SCSI_CMD);
    huge.set_data_len(0x00ff_ffff);
    c.send_raw(&huge.0).await;
    let r = c.recv().await.expect("reject before close");
    assert_eq!(r.bhs.opcode(), op::REJECT);
    assert!(c.recv().await.is_none());

    // Garbage instead of a login: the connection closes.
    let mut g = Client::connect(s.addr, 7).await;
    g.send_raw(&[0xffu8; 48]).await;
    assert!(
        g.recv().await.is_none(),
        "garbage login closes the connection"
    );

    assert_eq!(
        good.scsi(&read10(0, 2), &[], 1024).await.1,
        data,
        "other session unaffected"
    );
}

type Pairs<'a> = &'a [(&'a str, &'a str)];

/// One login straight to Full Feature Phase on a new connection: (class, detail, keys).
async fn try_login(addr: std::net::SocketAddr, pairs: Pairs<'_>) -> (u8, u8, Keys) {
    let mut c = Client::connect(addr, 8).await;
    let (class, detail, _, reply) = c.login_step(1, 3, true, keys(pairs)).await;
    (class, detail, reply)
}

#[tokio::test]
async fn login_refusals_carry_the_right_status() {
    let s = server(GatewayConfig::default()).await;
    let unknown = [
        ("InitiatorName", INITIATOR),
        ("TargetName", "iqn.2026-11.io.ironsan:nope"),
    ];
    let cases: [(Pairs<'_>, (u8, u8), &str); 3] = [
        (&unknown, (2, 3), "target not found"),
        (&[("TargetName", TARGET)], (2, 7), "missing InitiatorName"),
        (
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2026-11.io.ironsan:other"),
            ],
            (2, 2),
            "ACL refuses",
        ),
    ];
    for (pairs, want, why) in cases {
        let (class, detail, _) = try_login(s.addr, pairs).await;
        assert_eq!((class, detail), want, "{why}");
    }
    let (class, _, reply) = try_login(
        s.addr,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("X-com.example.Foo", "1"),
            ("MaxConnections", "4"),
        ],
    )
    .await;
    assert_eq!(class, 0);
    assert_eq!(
        get(&reply, "X-com.example.Foo").as_deref(),
        Some("NotUnderstood")
    );
    assert_eq!(get(&reply, "MaxConnections").as_deref(), Some("1"));
}

async fn chap_login(
    addr: std::net::SocketAddr,
    secret: &str,
    mutual: Option<&str>,
) -> (u8, u8, Keys) {
    let mut c = Client::connect(addr, 9).await;
    let (class, _, _, reply) = c
        .login_step(
            0,
            1,
            false,
            keys(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ]),
        )
        .await;
    assert_eq!(
        (class, get(&reply, "AuthMethod").as_deref()),
        (0, Some("CHAP"))
    );
    let (_, _, _, reply) = c.login_step(0, 1, false, keys(&[("CHAP_A", "5")])).await;
    let id: u8 = get(&reply, "CHAP_I").unwrap().parse().unwrap();
    let challenge = chap::decode_binary(&get(&reply, "CHAP_C").unwrap()).unwrap();
    let r = chap::response(id, secret.as_bytes(), &challenge);
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let mut k = keys(&[("CHAP_N", "user"), ("CHAP_R", &format!("0x{hex}"))]);
    if mutual.is_some() {
        k.extend(keys(&[
            ("CHAP_I", "42"),
            ("CHAP_C", "0x00112233445566778899aabbccddeeff"),
        ]));
    }
    let (class, detail, _, reply) = c.login_step(0, 1, true, k).await;
    if let (Some(tsecret), 0) = (mutual, class) {
        let want = chap::response(
            42,
            tsecret.as_bytes(),
            &chap::decode_binary("0x00112233445566778899aabbccddeeff").unwrap(),
        );
        assert_eq!(
            chap::decode_binary(&get(&reply, "CHAP_R").unwrap()).unwrap(),
            want.to_vec(),
            "target proves itself"
        );
        assert_eq!(get(&reply, "CHAP_N").as_deref(), Some("target"));
    }
    (class, detail, reply)
}

#[tokio::test]
async fn chap_one_way_and_mutual() {
    let config = GatewayConfig {
        chap: Some(Credentials {
            user: "user".into(),
            secret: "initiator-secret".into(),
        }),
        mutual_chap: Some(Credentials {
            user: "target".into(),
            secret: "target-secret-1".into(),
        }),
        ..Default::default()
    };
    let s = server(config).await;
    assert_eq!(chap_login(s.addr, "initiator-secret", None).await.0, 0);
    assert_eq!(
        chap_login(s.addr, "initiator-secret", Some("target-secret-1"))
            .await
            .0,
        0
    );
    let (class, detail, _) = chap_login(s.addr, "wrong-secret-xx", None).await;
    assert_eq!((class, detail), (2, 1), "authentication failure");
    // Skipping the security stage is not a way around CHAP.
    let mut c = Client::connect(s.addr, 10).await;
    let (class, detail, _, _) = c
        .login_step(
            1,
            3,
            true,
            keys(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]),
        )
        .await;
    assert_eq!((class, detail), (2, 1));
    // Discovery needs no credentials and lists the targets.
    let mut d = Client::connect(s.addr, 11).await;
    let (class, _, _, _) = d
        .login_step(
            1,
            3,
            true,
            keys(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
        )
        .await;
    assert_eq!(class, 0);
    let mut t = Bhs::new(op::TEXT_REQ | 0x40);
    t.set_flags(0x80);
    t.set_itt(5);
    t.set_u32(20, NO_TAG);
    d.send(
        t,
        Bytes::from(text::encode(&keys(&[("SendTargets", "All")]))),
    )
    .await;
    let r = d.recv().await.unwrap();
    let listed = text::parse(&r.data).unwrap();
    assert!(listed.iter().any(|(k, v)| k == "TargetName" && v == TARGET));
    assert!(
        !listed.iter().any(|(_, v)| v.ends_with(":other")),
        "ACL hides targets"
    );
    assert!(get(&listed, "TargetAddress").unwrap().ends_with(",1"));
}

#[tokio::test]
async fn reinstatement_replaces_the_old_connection() {
    let s = server(GatewayConfig::default()).await;
    let mut old = Client::connect(s.addr, 12).await;
    old.login(&[]).await;
    let mut new = Client::connect(s.addr, 12).await;
    new.login(&[]).await;
    assert!(
        old.recv().await.is_none(),
        "old connection closed by reinstatement"
    );
    assert_eq!(new.scsi(&[0u8; 6], &[], 0).await.0, 0);
}

#[tokio::test]
async fn lun_reset_raises_a_unit_attention_and_nops_echo() {
    let s = server(GatewayConfig::default()).await;
    let mut c = Client::connect(s.addr, 13).await;
    c.login(&[]).await;
    let mut tmf = Bhs::new(op::TMF_REQ | 0x40);
    tmf.set_flags(0x80 | 5);
    tmf.set_itt(c.next_itt());
    tmf.set_u32(20, NO_TAG);
    tmf.set_u32(24, c.cmdsn);
    c.send(tmf, Bytes::new()).await;
    let r = c.recv().await.unwrap();
    assert_eq!((r.bhs.opcode(), r.bhs.0[2]), (op::TMF_RSP, 0));
    let (status, _, sense) = c.scsi(&[0u8; 6], &[], 0).await;
    assert_eq!(
        (status, sense[2] & 0x0f, sense[12], sense[13]),
        (2, 6, 0x29, 0x03)
    );
    assert_eq!(c.scsi(&[0u8; 6], &[], 0).await.0, 0, "reported once");

    let mut nop = Bhs::new(op::NOP_OUT | 0x40);
    nop.set_flags(0x80);
    nop.set_itt(c.next_itt());
    nop.set_u32(20, NO_TAG);
    nop.set_u32(24, c.cmdsn);
    c.send(nop, Bytes::from_static(b"ping-data")).await;
    let r = c.recv().await.unwrap();
    assert_eq!(
        (r.bhs.opcode(), &r.data[..]),
        (op::NOP_IN, &b"ping-data"[..])
    );
}

#[tokio::test]
async fn idle_connections_are_pinged_and_dead_ones_closed() {
    let config = GatewayConfig {
        nop_interval: Duration::from_millis(200),
        nop_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let s = server(config).await;
    let mut c = Client::connect(s.addr, 14).await;
    c.login(&[]).await;
    let ping = c.recv().await.expect("NOP-In ping");
    assert_eq!((ping.bhs.opcode(), ping.bhs.itt()), (op::NOP_IN, NO_TAG));
    assert!(c.recv().await.is_none(), "silent initiator is disconnected");
}

#[tokio::test]
async fn connection_and_transfer_limits_hold() {
    let s = server(GatewayConfig {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(s.addr, 15).await;
    a.login(&[]).await;
    let mut b = Client::connect(s.addr, 16).await;
    b.login(&[]).await;
    let mut c = Client::connect(s.addr, 17).await;
    let (bhs, data) = c.login_pdu(
        1,
        3,
        true,
        &keys(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]),
    );
    c.send(bhs, data).await;
    assert!(
        c.recv().await.is_none(),
        "a connection over the limit is closed"
    );

    // An EDTL beyond the transfer limit is refused before any data is solicited.
    let cmd = a.command(&write10(0, 0xffff), 0xffff * 512, false, true, true);
    a.send(cmd, Bytes::new()).await;
    let r = a.recv().await.unwrap();
    assert_eq!((r.bhs.opcode(), r.bhs.0[3]), (op::SCSI_RSP, 2));
    assert_eq!(
        (r.data[2 + 2] & 0x0f, r.data[2 + 12]),
        (0x05, 0x24),
        "ILLEGAL REQUEST, INVALID FIELD IN CDB"
    );
    assert_eq!(a.scsi(&[0u8; 6], &[], 0).await.0, 0, "session still usable");
    drop(b);
}
