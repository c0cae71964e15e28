//! The login phase (RFC 7143 §6): security negotiation (AuthMethod None or CHAP), operational
//! negotiation, and the transition to Full Feature Phase.
//!
//! Login runs before the connection's writer task exists, so it reads and writes the socket
//! directly, one request and one response at a time. Every failure is answered with a login
//! status (class 2 for initiator errors, 3 for target errors) and the connection is closed.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::chap::ChapExchange;
use super::params::{negotiate, Answer, Params};
use super::pdu::{op, Bhs, Framing, OutPdu, StatSn};
use super::session::{SessionGuard, SessionKey};
use super::text::{self, MAX_TEXT};
use super::wire::{write_pdu, PduReader};
use crate::target::{Gateway, Target};

/// Login status (class, detail), RFC 7143 §11.13.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus(pub u8, pub u8);

impl LoginStatus {
    pub const SUCCESS: Self = Self(0, 0);
    pub const AUTH_FAILURE: Self = Self(2, 1);
    pub const AUTHORIZATION_FAILURE: Self = Self(2, 2);
    pub const NOT_FOUND: Self = Self(2, 3);
    pub const UNSUPPORTED_VERSION: Self = Self(2, 5);
    pub const MISSING_PARAMETER: Self = Self(2, 7);
    pub const NO_SESSION: Self = Self(2, 0x0a);
    pub const INVALID_REQUEST: Self = Self(2, 0x0b);
    pub const INITIATOR_ERROR: Self = Self(2, 0);
}

/// Why the login did not reach Full Feature Phase.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("login refused ({:02x}{:02x}): {reason}", status.0, status.1)]
    Refused { status: LoginStatus, reason: String },
    #[error("connection closed during login")]
    Closed,
    #[error("pdu: {0}")]
    Pdu(#[from] super::pdu::PduError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn refuse(status: LoginStatus, reason: impl Into<String>) -> LoginError {
    LoginError::Refused { status, reason: reason.into() }
}

/// What a successful login hands to Full Feature Phase.
pub struct LoginOutcome {
    pub guard: SessionGuard,
    pub params: Params,
    /// StatSN of the next response.
    pub statsn: u32,
    pub exp_cmdsn: u32,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Auth {
    Unset,
    None,
    Chap,
}

struct State {
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    initiator: Option<String>,
    discovery: bool,
    target: Option<Arc<Target>>,
    auth: Auth,
    authenticated: bool,
    chap: Option<ChapExchange>,
    params: Params,
    declared: bool,
    tpgt_sent: bool,
    statsn: u32,
    exp_cmdsn: u32,
}

const LOGIN_FRAMING: Framing = Framing { header_digest: false, data_digest: false, max_data: 8192 };

/// Runs the login phase on a new connection.
pub async fn login<R, W>(
    gw: &Arc<Gateway>,
    rd: &mut PduReader<R>,
    wr: &mut W,
    shutdown: &CancellationToken,
) -> Result<LoginOutcome, LoginError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut st: Option<State> = None;
    let mut pending_text: Vec<u8> = Vec::new();
    loop {
        let pdu = rd.next().await?.ok_or(LoginError::Closed)?;
        let bhs = &pdu.bhs;
        if bhs.opcode() != op::LOGIN_REQ {
            return Err(refuse(LoginStatus::INVALID_REQUEST, format!("opcode {:#x} during login", bhs.opcode())));
        }
        let flags = bhs.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&bhs.0[8..14]);
        let tsih = bhs.u16_at(14);
        let s = st.get_or_insert_with(|| State {
            isid,
            tsih,
            itt: bhs.itt(),
            initiator: None,
            discovery: false,
            target: None,
            auth: Auth::Unset,
            authenticated: false,
            chap: None,
            params: Params::new(&gw.config.limits),
            declared: false,
            tpgt_sent: false,
            statsn: bhs.u32_at(28),
            exp_cmdsn: bhs.u32_at(24),
        });
        s.itt = bhs.itt();
        s.exp_cmdsn = bhs.u32_at(24);
        let outcome = step(gw, s, &pdu.data, &mut pending_text, transit, cont, csg, nsg, isid, tsih, bhs.0[2], bhs.0[3]);
        match outcome {
            Ok(Step::Continue { keys, transit, nsg }) => {
                let data = Bytes::from(text::encode(&keys));
                write_pdu(wr, response(s, transit, false, csg, nsg, 0, LoginStatus::SUCCESS, data), &LOGIN_FRAMING).await?;
                s.statsn = s.statsn.wrapping_add(1);
            }
            Ok(Step::MoreText) => {
                write_pdu(wr, response(s, false, false, csg, csg, 0, LoginStatus::SUCCESS, Bytes::new()), &LOGIN_FRAMING)
                    .await?;
                s.statsn = s.statsn.wrapping_add(1);
            }
            Ok(Step::Done { keys }) => {
                let key = SessionKey {
                    initiator: s.initiator.clone().unwrap_or_default(),
                    isid: s.isid,
                    target: s.target.as_ref().map(|t| t.iqn.clone()),
                };
                if s.tsih != 0 && gw.sessions.find(&key, s.tsih).is_none() {
                    let r = refuse(LoginStatus::NO_SESSION, format!("no session with TSIH {}", s.tsih));
                    return fail(wr, s, csg, r).await;
                }
                let guard = gw.sessions.create(key, s.target.clone(), gw.config.tpgt, shutdown).await;
                let tsih = guard.session().tsih;
                let data = Bytes::from(text::encode(&keys));
                write_pdu(wr, response(s, true, false, csg, 3, tsih, LoginStatus::SUCCESS, data), &LOGIN_FRAMING).await?;
                return Ok(LoginOutcome {
                    guard,
                    params: s.params.clone(),
                    statsn: s.statsn.wrapping_add(1),
                    exp_cmdsn: s.exp_cmdsn,
                });
            }
            Err(e) => return fail(wr, s, csg, e).await,
        }
    }
}

async fn fail<W: AsyncWrite + Unpin>(wr: &mut W, s: &State, csg: u8, e: LoginError) -> Result<LoginOutcome, LoginError> {
    if let LoginError::Refused { status, .. } = &e {
        let _ = write_pdu(wr, response(s, false, false, csg, csg, 0, *status, Bytes::new()), &LOGIN_FRAMING).await;
    }
    Err(e)
}

#[allow(clippy::too_many_arguments)]
fn response(s: &State, transit: bool, cont: bool, csg: u8, nsg: u8, tsih: u16, status: LoginStatus, data: Bytes) -> OutPdu {
    let mut b = Bhs::new(op::LOGIN_RSP);
    let mut flags = (csg & 3) << 2;
    if transit {
        flags |= 0x80 | (nsg & 3);
    }
    if cont {
        flags |= 0x40;
    }
    b.set_flags(flags);
    b.0[8..14].copy_from_slice(&s.isid);
    b.set_u16(14, tsih);
    b.set_itt(s.itt);
    b.set_u32(24, s.statsn);
    b.set_u32(28, s.exp_cmdsn);
    b.set_u32(32, s.exp_cmdsn.wrapping_add(super::connection::CMD_WINDOW - 1));
    b.0[36] = status.0;
    b.0[37] = status.1;
    OutPdu::new(b, data, StatSn::None)
}

enum Step {
    Continue { keys: Vec<(String, String)>, transit: bool, nsg: u8 },
    MoreText,
    Done { keys: Vec<(String, String)> },
}

#[allow(clippy::too_many_arguments)]
fn step(
    gw: &Gateway,
    s: &mut State,
    data: &[u8],
    pending: &mut Vec<u8>,
    transit: bool,
    cont: bool,
    csg: u8,
    nsg: u8,
    isid: [u8; 6],
    tsih: u16,
    version_max: u8,
    version_min: u8,
) -> Result<Step, LoginError> {
    if version_min > 0 || version_max < version_min {
        return Err(refuse(LoginStatus::UNSUPPORTED_VERSION, "only iSCSI version 0 is supported"));
    }
    if isid != s.isid || tsih != s.tsih {
        return Err(refuse(LoginStatus::INITIATOR_ERROR, "ISID or TSIH changed during login"));
    }
    if csg == 2 || csg == 3 || (transit && (nsg == 2 || nsg <= csg)) {
        return Err(refuse(LoginStatus::INITIATOR_ERROR, format!("bad stage transition {csg}->{nsg}")));
    }
    if cont && transit {
        return Err(refuse(LoginStatus::INITIATOR_ERROR, "C and T bits both set"));
    }
    if pending.len() + data.len() > MAX_TEXT {
        return Err(refuse(LoginStatus::INITIATOR_ERROR, "login text too long"));
    }
    pending.extend_from_slice(data);
    if cont {
        return Ok(Step::MoreText);
    }
    let pairs = text::parse(pending).map_err(|e| refuse(LoginStatus::INITIATOR_ERROR, e.to_string()))?;
    pending.clear();
    let get = |k: &str| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());

    if s.initiator.is_none() {
        identify(gw, s, &get)?;
    }
    let mut keys: Vec<(String, String)> = Vec::new();
    let chap_required = gw.config.chap.is_some() && !s.discovery;

    for (k, v) in &pairs {
        match k.as_str() {
            "AuthMethod" => {
                if csg != 0 {
                    return Err(refuse(LoginStatus::INITIATOR_ERROR, "AuthMethod outside security stage"));
                }
                let offered: Vec<&str> = v.split(',').map(str::trim).collect();
                let choice = if chap_required {
                    offered.contains(&"CHAP").then_some(Auth::Chap)
                } else if offered.contains(&"None") {
                    Some(Auth::None)
                } else if offered.contains(&"CHAP") && gw.config.chap.is_some() {
                    Some(Auth::Chap)
                } else {
                    None
                };
                match choice {
                    Some(a) => {
                        s.auth = a;
                        s.authenticated = a == Auth::None;
                        keys.push((k.clone(), if a == Auth::Chap { "CHAP" } else { "None" }.into()));
                    }
                    None => return Err(refuse(LoginStatus::AUTH_FAILURE, format!("no acceptable AuthMethod in {v:?}"))),
                }
            }
            "CHAP_A" => {
                if s.auth != Auth::Chap || s.chap.is_some() {
                    return Err(refuse(LoginStatus::INITIATOR_ERROR, "unexpected CHAP_A"));
                }
                let (ex, reply) = ChapExchange::start(v).map_err(|e| refuse(LoginStatus::AUTH_FAILURE, e.to_string()))?;
                s.chap = Some(ex);
                keys.extend(reply);
            }
            "CHAP_N" => {
                let (Some(ex), Some(creds)) = (s.chap.take(), gw.config.chap.as_ref()) else {
                    return Err(refuse(LoginStatus::AUTH_FAILURE, "CHAP response without a challenge"));
                };
                let reply = ex
                    .finish(&get, creds, gw.config.mutual_chap.as_ref())
                    .map_err(|e| refuse(LoginStatus::AUTH_FAILURE, e.to_string()))?;
                s.authenticated = true;
                keys.extend(reply);
            }
            "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                if s.auth != Auth::Chap || !pairs.iter().any(|(k, _)| k == "CHAP_N") {
                    return Err(refuse(LoginStatus::AUTH_FAILURE, format!("unexpected {k}")));
                }
            }
            "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => {}
            _ => match negotiate(&mut s.params, &gw.config.limits, k, v) {
                Answer::Reply(r) => keys.push((k.clone(), r)),
                Answer::Silent | Answer::NotOperational => {}
            },
        }
    }

    // Leaving the security stage, or skipping it, needs a finished authentication.
    let leaving_security = csg == 0 && transit;
    if (leaving_security || csg == 1) && !s.authenticated {
        let chap_pending = s.auth == Auth::Chap || chap_required;
        if chap_pending && (csg == 1 || s.auth == Auth::Unset) {
            return Err(refuse(LoginStatus::AUTH_FAILURE, "authentication required"));
        }
        if s.auth == Auth::Unset {
            // No AuthMethod offered and none required: the default (None) applies.
            s.authenticated = true;
        }
        // Otherwise CHAP is still under way: answer without transit.
    }

    if !s.discovery && !s.tpgt_sent {
        keys.push(("TargetPortalGroupTag".into(), gw.config.tpgt.to_string()));
        s.tpgt_sent = true;
    }
    let going_ffp = transit && nsg == 3 && s.authenticated;
    if (csg == 1 || going_ffp) && !s.declared {
        s.declared = true;
        keys.push(("MaxRecvDataSegmentLength".into(), s.params.target_mrdsl.to_string()));
        if let Some(t) = &s.target {
            keys.push(("TargetAlias".into(), t.name.clone()));
        }
    }
    if going_ffp {
        return Ok(Step::Done { keys });
    }
    let may_transit = transit && s.authenticated;
    Ok(Step::Continue { keys, transit: may_transit, nsg: if may_transit { nsg } else { csg } })
}

/// First PDU: who is this and what do they want?
fn identify(gw: &Gateway, s: &mut State, get: &impl Fn(&str) -> Option<String>) -> Result<(), LoginError> {
    let initiator = get("InitiatorName").ok_or_else(|| refuse(LoginStatus::MISSING_PARAMETER, "InitiatorName missing"))?;
    s.discovery = match get("SessionType").as_deref() {
        None | Some("Normal") => false,
        Some("Discovery") => true,
        Some(other) => return Err(refuse(LoginStatus::INITIATOR_ERROR, format!("SessionType {other:?}"))),
    };
    if !s.discovery {
        let name = get("TargetName").ok_or_else(|| refuse(LoginStatus::MISSING_PARAMETER, "TargetName missing"))?;
        let target = gw.target(&name).ok_or_else(|| refuse(LoginStatus::NOT_FOUND, format!("no target {name}")))?;
        if !target.allows(&initiator) {
            return Err(refuse(LoginStatus::AUTHORIZATION_FAILURE, format!("{initiator} is not in the ACL of {name}")));
        }
        s.target = Some(target);
    }
    s.initiator = Some(initiator);
    Ok(())
}
