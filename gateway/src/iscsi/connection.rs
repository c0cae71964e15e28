//! One iSCSI connection from accept to close: login, then Full Feature Phase.
//!
//! Threading model: the connection's reader task owns all per-connection protocol state
//! (CmdSN window, Data-Out collection, R2Ts, text continuations) and is the only task that
//! reads the socket. Each SCSI command executes in its own tokio task so that many are in
//! flight at once; those tasks never touch protocol state. Every outgoing PDU goes through
//! one writer task, which stamps StatSN/ExpCmdSN/MaxCmdSN at send time (so StatSN is in order
//! on the wire whatever task produced the PDU) and batches whatever is queued into one
//! `writev`.
//!
//! Error recovery level 0: a protocol violation (bad DataSN or offset, digest error,
//! oversized segment) gets a Reject where the header is known and closes the connection;
//! the initiator recovers by reinstating the session.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::login::{login, LoginError};
use super::params::{negotiate, Answer, Params};
use super::pdu::{op, reject, Bhs, Framing, OutPdu, Pdu, PduError, StatSn, BHS_LEN, NO_TAG};
use super::session::Session;
use super::text;
use super::wire::{write_parts, PduReader};
use crate::scsi::{self, Command, ResetKind, Response, Status};
use crate::target::{Gateway, Target};

/// CmdSN window we advertise: MaxCmdSN = ExpCmdSN + CMD_WINDOW - 1.
pub const CMD_WINDOW: u32 = 128;
/// Largest Expected Data Transfer Length we accept for one command: twice the 4 MiB maximum
/// transfer the Block Limits page advertises, so that residual cases still execute. With the
/// CmdSN window this bounds the write data one connection can make us buffer.
pub const MAX_TRANSFER: u32 = 8 << 20;
/// How long a connection may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long teardown waits for in-flight commands.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

enum Msg {
    Pdu(OutPdu),
    Close,
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let (r, mut w) = stream.into_split();
    let login_framing = Framing {
        header_digest: false,
        data_digest: false,
        max_data: 8192,
    };
    let mut rd = PduReader::new(r, login_framing);
    let attempt = tokio::time::timeout(LOGIN_TIMEOUT, login(&gw, &mut rd, &mut w, &shutdown));
    let result = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = attempt => r,
    };
    let outcome = match result {
        Ok(Ok(o)) => o,
        Ok(Err(LoginError::Closed)) => return,
        Ok(Err(e)) => {
            crate::metrics::login_failed();
            tracing::warn!(%peer, "login failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "login timed out");
            return;
        }
    };
    let session = outcome.guard.session().clone();
    tracing::info!(
        %peer,
        initiator = %session.key.initiator,
        target = session.key.target.as_deref().unwrap_or("(discovery)"),
        tsih = session.tsih,
        "session logged in"
    );
    let params = outcome.params;
    let framing = Framing {
        header_digest: params.header_digest,
        data_digest: params.data_digest,
        max_data: params.target_mrdsl as usize,
    };
    rd.framing = framing;
    let shared = Arc::new(AtomicU32::new(outcome.exp_cmdsn));
    let (tx, rx) = unbounded_channel();
    let writer = tokio::spawn(writer(w, rx, framing, outcome.statsn, shared.clone()));
    let mut conn = Conn {
        gw: gw.clone(),
        target: session.target.clone(),
        session: session.clone(),
        local,
        params,
        tx,
        shared,
        exp_cmdsn: outcome.exp_cmdsn,
        queued: BTreeMap::new(),
        writes: HashMap::new(),
        discard: HashSet::new(),
        tasks: Arc::new(Mutex::new(HashMap::new())),
        tracker: TaskTracker::new(),
        next_ttt: 1,
        ping: None,
        text_out: None,
        text_in: Vec::new(),
    };
    let end = conn.run(&mut rd).await;
    match &end {
        Ok(()) => tracing::info!(%peer, tsih = session.tsih, "connection closed"),
        Err(e) => tracing::warn!(%peer, tsih = session.tsih, "connection dropped: {e}"),
    }
    conn.writes.clear();
    conn.tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, conn.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!(%peer, "in-flight commands did not finish in {DRAIN_TIMEOUT:?}; aborting them");
        conn.abort_where(|_| true).await;
    }
    let _ = conn.tx.send(Msg::Close);
    let _ = writer.await;
    drop(outcome.guard);
}

/// Why the connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Pdu(#[from] PduError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no answer to NOP-In for {0:?}")]
    PingTimeout(Duration),
}

struct Conn {
    gw: Arc<Gateway>,
    session: Arc<Session>,
    target: Option<Arc<Target>>,
    local: SocketAddr,
    params: Params,
    tx: UnboundedSender<Msg>,
    shared: Arc<AtomicU32>,
    exp_cmdsn: u32,
    /// Non-immediate requests that arrived ahead of a CmdSN gap.
    queued: BTreeMap<u32, Pdu>,
    /// Writes still collecting data, by ITT.
    writes: HashMap<u32, PendingWrite>,
    /// ITTs whose unsolicited Data-Out we drop (command already answered).
    discard: HashSet<u32>,
    /// Executing commands by ITT, with a generation so a finished task never removes a newer
    /// command that reused its ITT.
    tasks: Arc<Mutex<HashMap<u32, Running>>>,
    tracker: TaskTracker,
    next_ttt: u32,
    ping: Option<(u32, Instant)>,
    /// Rest of a Text Response that did not fit one PDU: (TTT, remaining bytes).
    text_out: Option<(u32, Bytes)>,
    /// Text Request collected across C-bit PDUs.
    text_in: Vec<u8>,
}

/// An executing command: generation, LUN field, task.
struct Running {
    generation: u64,
    lun: u64,
    handle: JoinHandle<()>,
}

/// A WRITE-type command collecting its data (immediate, unsolicited, then solicited by R2T).
struct PendingWrite {
    cmd: Bhs,
    cdb: Bytes,
    edtl: u32,
    segments: Vec<Bytes>,
    received: u32,
    unsolicited_left: u32,
    unsolicited_datasn: u32,
    r2t_next: u32,
    r2tsn: u32,
    outstanding: VecDeque<R2t>,
}

struct R2t {
    ttt: u32,
    len: u32,
    received: u32,
    datasn: u32,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

impl Conn {
    async fn run<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        rd: &mut PduReader<R>,
    ) -> Result<(), ConnError> {
        let cancel = self.session.cancel.clone();
        let interval = self.gw.config.nop_interval;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = tokio::time::timeout(interval, rd.next()) => r,
            };
            let pdu = match next {
                Err(_idle) => {
                    self.idle_ping()?;
                    continue;
                }
                Ok(Ok(Some(pdu))) => pdu,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => {
                    match &e {
                        PduError::DataTooLong { bhs, .. } => {
                            self.reject(reject::PROTOCOL_ERROR, bhs)
                        }
                        PduError::DataDigest(bhs) => self.reject(reject::DATA_DIGEST, bhs),
                        _ => {}
                    }
                    return Err(e.into());
                }
            };
            self.ping = None;
            if self.handle(pdu).await? {
                return Ok(());
            }
        }
    }

    fn idle_ping(&mut self) -> Result<(), ConnError> {
        if let Some((_, sent)) = self.ping {
            if sent.elapsed() >= self.gw.config.nop_timeout {
                return Err(ConnError::PingTimeout(sent.elapsed()));
            }
            return Ok(());
        }
        let ttt = self.ttt();
        let mut b = Bhs::new(op::NOP_IN);
        b.set_flags(0x80);
        b.set_itt(NO_TAG);
        b.set_u32(20, ttt);
        self.send(OutPdu::new(b, Bytes::new(), StatSn::Current));
        self.ping = Some((ttt, Instant::now()));
        Ok(())
    }

    fn send(&self, pdu: OutPdu) {
        let _ = self.tx.send(Msg::Pdu(pdu));
    }

    fn reject(&self, reason: u8, bad: &Bhs) {
        crate::metrics::pdu_rejected();
        let mut b = Bhs::new(op::REJECT);
        b.set_flags(0x80);
        b.0[2] = reason;
        b.set_itt(NO_TAG);
        self.send(OutPdu::new(
            b,
            Bytes::copy_from_slice(&bad.0),
            StatSn::Advance,
        ));
    }

    fn ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == NO_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// Orders requests by CmdSN; returns `true` when the connection should end.
    async fn handle(&mut self, pdu: Pdu) -> Result<bool, ConnError> {
        let opcode = pdu.bhs.opcode();
        let ordered = matches!(
            opcode,
            op::NOP_OUT | op::SCSI_CMD | op::TMF_REQ | op::TEXT_REQ | op::LOGOUT_REQ
        );
        if !ordered || pdu.bhs.immediate() {
            return self.process(pdu).await;
        }
        let cmdsn = pdu.bhs.u32_at(24);
        let ahead = cmdsn.wrapping_sub(self.exp_cmdsn);
        if ahead >= CMD_WINDOW {
            // RFC 7143 §4.2.2.1: outside [ExpCmdSN, MaxCmdSN] is silently ignored.
            tracing::debug!(
                cmdsn,
                exp = self.exp_cmdsn,
                "dropping command outside the CmdSN window"
            );
            return Ok(false);
        }
        if ahead > 0 {
            self.queued.insert(cmdsn, pdu);
            return Ok(false);
        }
        let mut next = Some(pdu);
        while let Some(p) = next {
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
            self.shared.store(self.exp_cmdsn, Ordering::Release);
            if self.process(p).await? {
                return Ok(true);
            }
            next = self.queued.remove(&self.exp_cmdsn);
        }
        Ok(false)
    }

    async fn process(&mut self, pdu: Pdu) -> Result<bool, ConnError> {
        match pdu.bhs.opcode() {
            op::NOP_OUT => self.nop_out(pdu),
            op::SCSI_CMD if self.target.is_some() => self.scsi_command(pdu)?,
            op::DATA_OUT if self.target.is_some() => self.data_out(pdu)?,
            op::TMF_REQ if self.target.is_some() => return self.task_management(pdu).await,
            op::TEXT_REQ => self.text(pdu),
            op::LOGOUT_REQ => {
                self.logout(pdu).await;
                return Ok(true);
            }
            op::LOGIN_REQ => {
                self.reject(reject::PROTOCOL_ERROR, &pdu.bhs);
                return Err(ConnError::Protocol(
                    "login request in full feature phase".into(),
                ));
            }
            _ => self.reject(reject::NOT_SUPPORTED, &pdu.bhs),
        }
        Ok(false)
    }

    fn nop_out(&mut self, pdu: Pdu) {
        let itt = pdu.bhs.itt();
        if itt == NO_TAG {
            // Answer to our ping (any PDU already counted as a sign of life).
            return;
        }
        let mut b = Bhs::new(op::NOP_IN);
        b.set_flags(0x80);
        b.set_lun(pdu.bhs.lun());
        b.set_itt(itt);
        b.set_u32(20, NO_TAG);
        let echo = pdu
            .data
            .slice(..pdu.data.len().min(self.params.initiator_mrdsl as usize));
        self.send(OutPdu::new(b, echo, StatSn::Advance));
    }

    fn scsi_command(&mut self, pdu: Pdu) -> Result<(), ConnError> {
        let bhs = pdu.bhs;
        let itt = bhs.itt();
        let flags = bhs.flags();
        let write = flags & 0x20 != 0;
        let edtl = bhs.u32_at(20);
        let Some(cdb) = full_cdb(&bhs, &pdu.ahs) else {
            self.reject(reject::INVALID_FIELD, &bhs);
            return Ok(());
        };
        let imm = pdu.data;
        if (!write && !imm.is_empty())
            || imm.len() as u32 > edtl
            || (!imm.is_empty() && !self.params.immediate_data)
            || imm.len() as u32 > self.params.first_burst
        {
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return Ok(());
        }
        if self.writes.contains_key(&itt) {
            self.reject(reject::TASK_IN_PROGRESS, &bhs);
            return Ok(());
        }
        self.discard.remove(&itt);
        if edtl > MAX_TRANSFER {
            if write && !bhs.final_bit() {
                self.discard_itt(itt);
            }
            let resp = Response::check_condition(scsi::sense::key::ILLEGAL_REQUEST, 0x24, 0x00);
            self.responder(bhs.lun(), itt)
                .respond(resp, edtl, flags, None);
            return Ok(());
        }
        if !write || edtl == 0 {
            self.dispatch(bhs, cdb, Bytes::new());
            return Ok(());
        }
        let received = imm.len() as u32;
        let unsolicited_left = if !self.params.initial_r2t && !bhs.final_bit() {
            self.params.first_burst.min(edtl).saturating_sub(received)
        } else {
            0
        };
        let mut pw = PendingWrite {
            cmd: bhs,
            cdb,
            edtl,
            segments: if imm.is_empty() {
                Vec::new()
            } else {
                vec![imm]
            },
            received,
            unsolicited_left,
            unsolicited_datasn: 0,
            r2t_next: 0,
            r2tsn: 0,
            outstanding: VecDeque::new(),
        };
        if received == edtl {
            return self.complete_write(pw);
        }
        if unsolicited_left == 0 {
            pw.r2t_next = received;
            self.issue_r2ts(&mut pw);
        }
        self.writes.insert(itt, pw);
        Ok(())
    }

    fn issue_r2ts(&mut self, pw: &mut PendingWrite) {
        while (pw.outstanding.len() as u32) < self.params.max_outstanding_r2t
            && pw.r2t_next < pw.edtl
        {
            let len = self.params.max_burst.min(pw.edtl - pw.r2t_next);
            let ttt = self.ttt();
            let mut b = Bhs::new(op::R2T);
            b.set_flags(0x80);
            b.set_lun(pw.cmd.lun());
            b.set_itt(pw.cmd.itt());
            b.set_u32(20, ttt);
            b.set_u32(36, pw.r2tsn);
            b.set_u32(40, pw.r2t_next);
            b.set_u32(44, len);
            self.send(OutPdu::new(b, Bytes::new(), StatSn::Current));
            pw.outstanding.push_back(R2t {
                ttt,
                len,
                received: 0,
                datasn: 0,
            });
            pw.r2tsn += 1;
            pw.r2t_next += len;
        }
    }

    fn data_out(&mut self, pdu: Pdu) -> Result<(), ConnError> {
        let bhs = &pdu.bhs;
        let itt = bhs.itt();
        let ttt = bhs.u32_at(20);
        let datasn = bhs.u32_at(36);
        let offset = bhs.u32_at(40);
        let len = pdu.data.len() as u32;
        if self.discard.contains(&itt) {
            return Ok(());
        }
        let Some(mut pw) = self.writes.remove(&itt) else {
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return Ok(());
        };
        if let Err(what) = Self::accept_data(&mut pw, ttt, datasn, offset, len, bhs.final_bit()) {
            // The command fails, the session lives: drop the rest of its data and answer
            // ABORTED COMMAND / DATA PHASE ERROR (SAM-5) instead of tearing down every task.
            tracing::warn!(itt, "Data-Out sequence error: {what}");
            crate::metrics::pdu_rejected();
            self.discard_itt(itt);
            let resp = Response::check_condition(scsi::sense::key::ABORTED_COMMAND, 0x4b, 0x00);
            self.responder(pw.cmd.lun(), itt)
                .respond(resp, pw.edtl, pw.cmd.flags(), None);
            return Ok(());
        }
        if len > 0 {
            pw.segments.push(pdu.data);
        }
        pw.received += len;
        if pw.received == pw.edtl {
            return self.complete_write(pw);
        }
        if pw.unsolicited_left == 0 {
            if pw.r2t_next < pw.received {
                pw.r2t_next = pw.received;
            }
            self.issue_r2ts(&mut pw);
        }
        self.writes.insert(itt, pw);
        Ok(())
    }

    /// Checks one Data-Out against the command's expected offset, DataSN and burst.
    fn accept_data(
        pw: &mut PendingWrite,
        ttt: u32,
        datasn: u32,
        offset: u32,
        len: u32,
        last: bool,
    ) -> Result<(), String> {
        if offset != pw.received || offset as u64 + len as u64 > pw.edtl as u64 {
            return Err(format!(
                "offset {offset}+{len}, expected {} of {}",
                pw.received, pw.edtl
            ));
        }
        if ttt == NO_TAG {
            if datasn != pw.unsolicited_datasn || len > pw.unsolicited_left {
                return Err(format!(
                    "unsolicited DataSN {datasn} (want {}) or length {len}",
                    pw.unsolicited_datasn
                ));
            }
            pw.unsolicited_datasn += 1;
            pw.unsolicited_left -= len;
            if last {
                pw.unsolicited_left = 0;
            }
            return Ok(());
        }
        let Some(r2t) = pw.outstanding.front_mut().filter(|r| r.ttt == ttt) else {
            return Err(format!("unknown or out-of-order TTT {ttt:#x}"));
        };
        if datasn != r2t.datasn
            || r2t.received + len > r2t.len
            || (last && r2t.received + len != r2t.len)
        {
            return Err(format!(
                "DataSN {datasn} (want {}) or burst length",
                r2t.datasn
            ));
        }
        r2t.datasn += 1;
        r2t.received += len;
        if r2t.received == r2t.len {
            pw.outstanding.pop_front();
        }
        Ok(())
    }

    /// Remembers an ITT whose remaining Data-Out is dropped silently (bounded: the oldest
    /// entries go first; initiators reuse ITTs only after a response anyway).
    fn discard_itt(&mut self, itt: u32) {
        if self.discard.len() >= 1024 {
            self.discard.clear();
        }
        self.discard.insert(itt);
    }

    fn complete_write(&mut self, pw: PendingWrite) -> Result<(), ConnError> {
        let data = match pw.segments.len() {
            0 => Bytes::new(),
            1 => pw.segments.into_iter().next().unwrap_or_default(),
            _ => {
                let mut buf = BytesMut::with_capacity(pw.edtl as usize);
                for s in &pw.segments {
                    buf.extend_from_slice(s);
                }
                buf.freeze()
            }
        };
        self.dispatch(pw.cmd, pw.cdb, data);
        Ok(())
    }

    fn responder(&self, lun: u64, itt: u32) -> Responder {
        Responder {
            tx: self.tx.clone(),
            lun,
            itt,
            mrdsl: self.params.initiator_mrdsl,
            max_burst: self.params.max_burst,
        }
    }

    /// Runs a command with all its data in a task of its own.
    fn dispatch(&mut self, cmd: Bhs, cdb: Bytes, data_out: Bytes) {
        let Some(target) = self.target.clone() else {
            return;
        };
        let itt = cmd.itt();
        let lun_field = cmd.lun();
        let flags = cmd.flags();
        let edtl = cmd.u32_at(20);
        let responder = self.responder(lun_field, itt);
        let session = self.session.clone();
        let tasks = self.tasks.clone();
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        // Held while spawning so the task cannot finish (and deregister) before it is registered.
        let Ok(mut table) = self.tasks.lock() else {
            return;
        };
        let handle = self.tracker.spawn(async move {
            let started = Instant::now();
            let out_len = data_out.len();
            let (resp, write_residual) =
                execute(&target, &session, lun_field, &cdb, data_out, edtl, flags).await;
            target
                .metrics
                .command(&cdb, &resp, out_len, started.elapsed());
            if let Ok(mut t) = tasks.lock() {
                if t.get(&itt).is_some_and(|r| r.generation == generation) {
                    t.remove(&itt);
                }
            }
            responder.respond(resp, edtl, flags, write_residual);
        });
        table.insert(
            itt,
            Running {
                generation,
                lun: lun_field,
                handle,
            },
        );
    }

    /// Aborts executing commands matching `pred` (by LUN field) and waits for them to stop.
    async fn abort_where(&mut self, pred: impl Fn(u64) -> bool) -> usize {
        let handles: Vec<JoinHandle<()>> = match self.tasks.lock() {
            Ok(mut t) => {
                let itts: Vec<u32> = t
                    .iter()
                    .filter(|(_, r)| pred(r.lun))
                    .map(|(i, _)| *i)
                    .collect();
                itts.into_iter()
                    .filter_map(|i| t.remove(&i))
                    .map(|r| r.handle)
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        let n = handles.len();
        for h in &handles {
            h.abort();
        }
        for h in handles {
            let _ = h.await;
        }
        let before = self.writes.len();
        self.writes.retain(|_, pw| !pred(pw.cmd.lun()));
        n + before - self.writes.len()
    }

    async fn task_management(&mut self, pdu: Pdu) -> Result<bool, ConnError> {
        let bhs = &pdu.bhs;
        let function = bhs.flags() & 0x7f;
        let lun = bhs.lun();
        let lun_ok = lun_index(lun) == Some(0);
        let rtt = bhs.u32_at(20);
        let Some(target) = self.target.clone() else {
            return Ok(false);
        };
        let mut close = false;
        let response: u8 = match function {
            // ABORT TASK
            1 => {
                let found = self.writes.remove(&rtt).is_some();
                let handle = self.tasks.lock().ok().and_then(|mut t| t.remove(&rtt));
                if let Some(r) = handle {
                    r.handle.abort();
                    let _ = r.handle.await;
                    0
                } else if found {
                    0
                } else {
                    // Already completed (its response is on the wire) or never received.
                    let refcmdsn = bhs.u32_at(32);
                    if self.exp_cmdsn.wrapping_sub(refcmdsn) < CMD_WINDOW
                        && refcmdsn != self.exp_cmdsn
                    {
                        1
                    } else {
                        0
                    }
                }
            }
            // ABORT TASK SET, CLEAR TASK SET
            2 | 4 if lun_ok => {
                self.abort_where(|l| l == lun).await;
                0
            }
            // CLEAR ACA: we never establish ACA.
            3 if lun_ok => 0,
            5 if lun_ok => {
                self.abort_where(|l| l == lun).await;
                target.lun.reset(ResetKind::Lun, Some(&self.session.nexus));
                tracing::info!(tsih = self.session.tsih, "LUN reset");
                0
            }
            6 | 7 => {
                self.abort_where(|_| true).await;
                target
                    .lun
                    .reset(ResetKind::TargetWarm, Some(&self.session.nexus));
                tracing::info!(tsih = self.session.tsih, function, "target reset");
                close = function == 7;
                0
            }
            2..=5 => 2,
            // TASK REASSIGN needs ERL 2.
            8 => 4,
            _ => 255,
        };
        let mut b = Bhs::new(op::TMF_RSP);
        b.set_flags(0x80);
        b.0[2] = response;
        b.set_itt(bhs.itt());
        self.send(OutPdu::new(b, Bytes::new(), StatSn::Advance));
        Ok(close)
    }

    fn text(&mut self, pdu: Pdu) {
        let bhs = &pdu.bhs;
        let itt = bhs.itt();
        let ttt = bhs.u32_at(20);
        if ttt != NO_TAG {
            match self.text_out.take() {
                Some((t, rest)) if t == ttt => return self.text_chunk(itt, bhs.lun(), rest),
                _ => {
                    self.reject(reject::INVALID_FIELD, bhs);
                    return;
                }
            }
        }
        self.text_out = None;
        if self.text_in.len() + pdu.data.len() > text::MAX_TEXT {
            self.text_in.clear();
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return;
        }
        self.text_in.extend_from_slice(&pdu.data);
        if bhs.flags() & 0x40 != 0 {
            // More request text follows: acknowledge with an empty response.
            let tag = self.ttt();
            let mut b = Bhs::new(op::TEXT_RSP);
            b.set_lun(bhs.lun());
            b.set_itt(itt);
            b.set_u32(20, tag);
            self.send(OutPdu::new(b, Bytes::new(), StatSn::Advance));
            return;
        }
        let request = std::mem::take(&mut self.text_in);
        let pairs = match text::parse(&request) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("bad text request: {e}");
                self.reject(reject::PROTOCOL_ERROR, bhs);
                return;
            }
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                out.extend(self.send_targets(v));
                continue;
            }
            // Operational keys are not renegotiated in Full Feature Phase.
            let mut scratch = self.params.clone();
            let answer = match negotiate(&mut scratch, &self.gw.config.limits, k, v) {
                Answer::Reply(r) if r == "NotUnderstood" => r,
                _ => "Reject".to_string(),
            };
            out.push((k.clone(), answer));
        }
        self.text_chunk(itt, bhs.lun(), Bytes::from(text::encode(&out)));
    }

    fn text_chunk(&mut self, itt: u32, lun: u64, body: Bytes) {
        let max = self.params.initiator_mrdsl as usize;
        let mut b = Bhs::new(op::TEXT_RSP);
        b.set_lun(lun);
        b.set_itt(itt);
        let data = if body.len() > max {
            let tag = self.ttt();
            b.set_flags(0x40);
            b.set_u32(20, tag);
            self.text_out = Some((tag, body.slice(max..)));
            body.slice(..max)
        } else {
            b.set_flags(0x80);
            b.set_u32(20, NO_TAG);
            body
        };
        self.send(OutPdu::new(b, data, StatSn::Advance));
    }

    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let initiator = &self.session.key.initiator;
        let targets: Vec<Arc<Target>> = match (which, &self.target) {
            ("All", None) => self.gw.targets(),
            ("All", Some(t)) | ("", Some(t)) => vec![t.clone()],
            (name, _) => self.gw.target(name).into_iter().collect(),
        };
        let address = match self.local {
            SocketAddr::V4(a) => format!("{}:{},{}", a.ip(), a.port(), self.gw.config.tpgt),
            SocketAddr::V6(a) => format!("[{}]:{},{}", a.ip(), a.port(), self.gw.config.tpgt),
        };
        let mut out = Vec::new();
        for t in targets.into_iter().filter(|t| t.allows(initiator)) {
            out.push(("TargetName".to_string(), t.iqn.clone()));
            out.push(("TargetAddress".to_string(), address.clone()));
        }
        out
    }

    async fn logout(&mut self, pdu: Pdu) {
        let reason = pdu.bhs.flags() & 0x7f;
        // Outstanding commands complete (and are answered) before the logout response.
        self.writes.clear();
        self.tracker.close();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait()).await;
        let response = match reason {
            0 | 1 => 0,
            // Connection recovery needs ERL 2.
            _ => 2,
        };
        let mut b = Bhs::new(op::LOGOUT_RSP);
        b.set_flags(0x80);
        b.0[2] = response;
        b.set_itt(pdu.bhs.itt());
        b.set_u16(40, self.params.default_time2wait as u16);
        b.set_u16(42, self.params.default_time2retain as u16);
        self.send(OutPdu::new(b, Bytes::new(), StatSn::Advance));
        tracing::info!(tsih = self.session.tsih, reason, "logout");
    }
}

/// The CDB: 16 bytes in the BHS plus an Extended CDB AHS (type 1) for longer ones.
fn full_cdb(bhs: &Bhs, ahs: &Bytes) -> Option<Bytes> {
    let base = &bhs.0[32..BHS_LEN];
    let mut rest = &ahs[..];
    while rest.len() >= 4 {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let kind = rest[2];
        let padded = (len + 3).div_ceil(4) * 4;
        if rest.len() < 3 + len {
            return None;
        }
        if kind == 1 && len >= 1 {
            let mut cdb = Vec::with_capacity(16 + len - 1);
            cdb.extend_from_slice(base);
            cdb.extend_from_slice(&rest[4..3 + len]);
            return Some(Bytes::from(cdb));
        }
        rest = rest.get(padded.min(rest.len())..).unwrap_or(&[]);
    }
    Some(Bytes::copy_from_slice(base))
}

/// LUN number from the 8-byte LUN field (peripheral or flat addressing, single level).
pub fn lun_index(field: u64) -> Option<u16> {
    let b = field.to_be_bytes();
    if b[2..].iter().any(|x| *x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] & 0x3f == 0 => Some(b[1] as u16),
        1 => Some((((b[0] & 0x3f) as u16) << 8) | b[1] as u16),
        _ => None,
    }
}

/// Bytes of data-out the CDB itself asks for, for the write-type commands whose residuals
/// the transport must report (RFC 7143 §11.4.5.1). `None`: not a write of blocks.
fn write_length(cdb: &[u8]) -> Option<u64> {
    let blocks = |v: u64| Some(v * scsi::LOGICAL_BLOCK);
    let u16_at = |i: usize| {
        cdb.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as u64)
    };
    let u32_at = |i: usize| {
        cdb.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let bytchk = |c: &[u8]| c.get(1).map(|b| (b >> 1) & 3);
    match *cdb.first()? {
        0x0a => cdb
            .get(4)
            .and_then(|n| blocks(if *n == 0 { 256 } else { *n as u64 })),
        0x2a | 0x2e => u16_at(7).and_then(blocks),
        0xaa | 0xae => u32_at(6).and_then(blocks),
        0x8a | 0x8e | 0x8b => u32_at(10).and_then(blocks),
        0x89 => cdb.get(13).and_then(|n| blocks(*n as u64 * 2)),
        0x41 => blocks(1),
        0x93 => blocks(if cdb.get(1)? & 1 != 0 { 0 } else { 1 }),
        0x2f => match bytchk(cdb)? {
            1 => u16_at(7).and_then(blocks),
            3 => blocks(1),
            _ => Some(0),
        },
        0xaf => match bytchk(cdb)? {
            1 => u32_at(6).and_then(blocks),
            3 => blocks(1),
            _ => Some(0),
        },
        0x8f => match bytchk(cdb)? {
            1 => u32_at(10).and_then(blocks),
            3 => blocks(1),
            _ => Some(0),
        },
        _ => None,
    }
}

/// WRITE and WRITE AND VERIFY: the commands that can transfer fewer blocks than asked.
fn is_plain_write(cdb: &[u8]) -> bool {
    matches!(
        cdb.first(),
        Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e)
    )
}

/// Rewrites the TRANSFER LENGTH of a plain write CDB (`blocks` is below the original).
fn set_transfer_blocks(cdb: &mut [u8], blocks: u64) {
    match cdb.first() {
        Some(0x0a) => {
            if let Some(b) = cdb.get_mut(4) {
                *b = blocks as u8;
            }
        }
        Some(0x2a | 0x2e) => {
            if let Some(f) = cdb.get_mut(7..9) {
                f.copy_from_slice(&(blocks as u16).to_be_bytes());
            }
        }
        Some(0xaa | 0xae) => {
            if let Some(f) = cdb.get_mut(6..10) {
                f.copy_from_slice(&(blocks as u32).to_be_bytes());
            }
        }
        Some(0x8a | 0x8e) => {
            if let Some(f) = cdb.get_mut(10..14) {
                f.copy_from_slice(&(blocks as u32).to_be_bytes());
            }
        }
        _ => {}
    }
}

/// Residual of a write-type command: (overflow?, count).
type Residual = Option<(bool, u32)>;

async fn execute(
    target: &Target,
    session: &Session,
    lun_field: u64,
    cdb: &[u8],
    mut data_out: Bytes,
    edtl: u32,
    flags: u8,
) -> (Response, Residual) {
    let mut residual = None;
    let mut cdb_buf;
    let mut cdb = cdb;
    if flags & 0x20 != 0 {
        if let Some(spdtl) = write_length(cdb) {
            let edtl = edtl as u64;
            let residual_of = |d: u64| d.min(u32::MAX as u64) as u32;
            if edtl != spdtl && !is_plain_write(cdb) {
                // COMPARE AND WRITE, WRITE SAME, ORWRITE, VERIFY with data: no partial form.
                let resp = Response::check_condition(scsi::sense::key::ILLEGAL_REQUEST, 0x24, 0x00);
                return (
                    resp,
                    Some((edtl < spdtl, residual_of(edtl.abs_diff(spdtl)))),
                );
            }
            if edtl < spdtl {
                // RFC 7143 §11.4.5.1 / libiscsi: transfer what the initiator sent, whole
                // blocks only, and report the overflow.
                residual = Some((true, residual_of(spdtl - edtl)));
                let blocks = edtl / scsi::LOGICAL_BLOCK;
                if blocks == 0 {
                    return (
                        Response {
                            status: Status::Good,
                            sense: None,
                            data: Bytes::new(),
                        },
                        residual,
                    );
                }
                cdb_buf = cdb.to_vec();
                set_transfer_blocks(&mut cdb_buf, blocks);
                cdb = &cdb_buf;
                data_out.truncate((blocks * scsi::LOGICAL_BLOCK) as usize);
            } else if edtl > spdtl {
                data_out.truncate(spdtl as usize);
                residual = Some((false, residual_of(edtl - spdtl)));
            }
        }
    }
    // REPORT LUNS may be sent to any LUN; INQUIRY to an absent LUN reports "not present".
    let to_lun0 = lun_index(lun_field) == Some(0) || cdb.first() == Some(&0xa0);
    let resp = match cdb.first() {
        _ if to_lun0 => {
            // QoS before the LUN: a throttled command waits here, in its own task, holding
            // nothing (not even the LUN's write-ordering lock).
            if let Some((dir, bytes)) = crate::qos::classify(cdb, data_out.len(), edtl) {
                target.qos.admit(dir, bytes).await;
            }
            let nexus = &session.nexus;
            target
                .lun
                .execute(Command {
                    cdb,
                    data_out,
                    nexus,
                })
                .await
        }
        Some(0x12) => {
            let alloc = cdb
                .get(3..5)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                .unwrap_or(0);
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            d[2] = 0x06;
            d[3] = 0x02;
            d[4] = 31;
            d.truncate(alloc);
            Response {
                status: Status::Good,
                sense: None,
                data: Bytes::from(d),
            }
        }
        _ => Response::check_condition(scsi::sense::key::ILLEGAL_REQUEST, 0x25, 0x00),
    };
    (resp, residual)
}

/// Sends a command's Data-In and status.
struct Responder {
    tx: UnboundedSender<Msg>,
    lun: u64,
    itt: u32,
    mrdsl: u32,
    max_burst: u32,
}

const FLAG_O: u8 = 0x04;
const FLAG_U: u8 = 0x02;

impl Responder {
    fn respond(&self, resp: Response, edtl: u32, flags: u8, write_residual: Residual) {
        let read = flags & 0x40 != 0;
        let expected_in = if read { edtl as usize } else { 0 };
        let send = resp.data.slice(..resp.data.len().min(expected_in));
        let (overflow, residual) = match write_residual {
            Some(r) => r,
            None if flags & 0x20 != 0 && !read => (false, 0),
            None if resp.data.len() > expected_in => (true, (resp.data.len() - expected_in) as u32),
            None => (false, (expected_in - send.len()) as u32),
        };
        let residual_flags = match (overflow, residual) {
            (_, 0) => 0,
            (true, _) => FLAG_O,
            (false, _) => FLAG_U,
        };
        let collapse = resp.status == Status::Good && resp.sense.is_none();
        let mut offset = 0usize;
        let mut datasn = 0u32;
        let mut burst_left = self.max_burst as usize;
        while offset < send.len() {
            let n = (self.mrdsl as usize)
                .min(send.len() - offset)
                .min(burst_left);
            let last = offset + n == send.len();
            let mut b = Bhs::new(op::DATA_IN);
            let mut f = 0u8;
            if last || n == burst_left {
                f |= 0x80;
            }
            let mut sn = StatSn::None;
            if last && collapse {
                f |= 0x80 | 0x01 | residual_flags;
                b.0[3] = resp.status as u8;
                b.set_u32(44, residual);
                sn = StatSn::Advance;
            }
            b.set_flags(f);
            b.set_lun(self.lun);
            b.set_itt(self.itt);
            b.set_u32(20, NO_TAG);
            b.set_u32(36, datasn);
            b.set_u32(40, offset as u32);
            let _ = self
                .tx
                .send(Msg::Pdu(OutPdu::new(b, send.slice(offset..offset + n), sn)));
            datasn += 1;
            offset += n;
            burst_left = if n == burst_left {
                self.max_burst as usize
            } else {
                burst_left - n
            };
        }
        if collapse && !send.is_empty() {
            return;
        }
        let mut b = Bhs::new(op::SCSI_RSP);
        b.set_flags(0x80 | residual_flags);
        b.0[3] = resp.status as u8;
        b.set_itt(self.itt);
        b.set_u32(36, datasn);
        b.set_u32(44, residual);
        let data = match resp.sense {
            Some(sense) => {
                let mut d = BytesMut::with_capacity(2 + sense.len());
                d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
                d.extend_from_slice(&sense);
                d.freeze()
            }
            None => Bytes::new(),
        };
        let _ = self
            .tx
            .send(Msg::Pdu(OutPdu::new(b, data, StatSn::Advance)));
    }
}

/// The connection's only writer: stamps sequence numbers and batches PDUs into `writev`s.
async fn writer(
    mut w: OwnedWriteHalf,
    mut rx: UnboundedReceiver<Msg>,
    framing: Framing,
    mut statsn: u32,
    exp_cmdsn: Arc<AtomicU32>,
) {
    let mut parts: Vec<Bytes> = Vec::with_capacity(64);
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        let mut msg = Some(first);
        let mut batched = 0;
        while let Some(m) = msg.take() {
            match m {
                Msg::Close => {
                    closing = true;
                    break;
                }
                Msg::Pdu(mut p) => {
                    match p.statsn {
                        StatSn::None => {}
                        StatSn::Current => p.bhs.set_u32(24, statsn),
                        StatSn::Advance => {
                            p.bhs.set_u32(24, statsn);
                            statsn = statsn.wrapping_add(1);
                        }
                    }
                    if p.stamp_cmdsn {
                        let exp = exp_cmdsn.load(Ordering::Acquire);
                        p.bhs.set_u32(28, exp);
                        p.bhs.set_u32(32, exp.wrapping_add(CMD_WINDOW - 1));
                    }
                    p.encode(&framing, &mut parts);
                }
            }
            batched += 1;
            if batched < 256 {
                msg = rx.try_recv().ok();
            }
        }
        if write_parts(&mut w, &mut parts).await.is_err() {
            return;
        }
        if closing {
            let _ = w.shutdown().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_field_decoding() {
        assert_eq!(lun_index(0), Some(0));
        assert_eq!(lun_index(0x0001_0000_0000_0000), Some(1));
        assert_eq!(lun_index(0x4005_0000_0000_0000), Some(5));
        assert_eq!(lun_index(0x0000_0000_0000_0001), None);
        assert_eq!(lun_index(0xc000_0000_0000_0000), None);
    }

    #[test]
    fn write_lengths_from_cdbs() {
        assert_eq!(write_length(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0]), Some(4096));
        assert_eq!(write_length(&[0x0a, 0, 0, 0, 0, 0]), Some(256 * 512));
        assert_eq!(
            write_length(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            Some(1024)
        );
        assert_eq!(
            write_length(&[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 2, 0]),
            Some(1024)
        );
        assert_eq!(write_length(&[0x2f, 0x00, 0, 0, 0, 0, 0, 0, 2, 0]), Some(0));
        assert_eq!(write_length(&[0x2a, 0]), None);
        assert_eq!(write_length(&[0x12, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn extended_cdb_from_ahs() {
        let mut bhs = Bhs::new(op::SCSI_CMD);
        bhs.0[32] = 0x7f;
        // AHS: length 17 (reserved byte + 16 CDB bytes), type 1.
        let mut ahs = vec![0, 17, 1, 0];
        ahs.extend_from_slice(&[0xaa; 16]);
        let cdb = full_cdb(&bhs, &Bytes::from(ahs)).unwrap();
        assert_eq!(cdb.len(), 32);
        assert_eq!(cdb[0], 0x7f);
        assert_eq!(&cdb[16..], &[0xaa; 16]);
        assert!(full_cdb(&bhs, &Bytes::from_static(&[0, 200, 1, 0])).is_none());
    }
}
