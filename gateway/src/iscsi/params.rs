//! Operational parameters of a session and their negotiation (RFC 7143 §13).
//!
//! The initiator offers, we answer: list keys pick the first value we support, numeric keys
//! take the minimum (or maximum) with our limit, boolean keys combine with AND or OR. Keys
//! we do not know are answered `NotUnderstood`; known keys with values out of range
//! `Reject`.

/// What this target supports and prefers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_outstanding_r2t: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_recv_data_segment: 256 * 1024, max_burst: 1024 * 1024, first_burst: 256 * 1024, max_outstanding_r2t: 8 }
    }
}

/// The negotiated state of one connection/session.
#[derive(Debug, Clone)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest Data-In/response segment the initiator accepts.
    pub initiator_mrdsl: u32,
    /// Largest segment we accept.
    pub target_mrdsl: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

impl Params {
    /// RFC defaults, before any negotiation.
    pub fn new(limits: &Limits) -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: 8192,
            target_mrdsl: limits.max_recv_data_segment,
            max_burst: 262_144.min(limits.max_burst),
            first_burst: 65_536.min(limits.first_burst),
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// Outcome of one offered key.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send `key=value` back.
    Reply(String),
    /// Declarative key or one we take silently.
    Silent,
    /// Not an operational key: the login/text layer handles it.
    NotOperational,
}

fn number(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u64 = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (lo as u64..=hi as u64).contains(&n).then_some(n as u32)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

fn digest(v: &str) -> Option<bool> {
    // First value in the initiator's preference order that we support (both).
    v.split(',').find_map(|d| match d.trim() {
        "CRC32C" => Some(true),
        "None" => Some(false),
        _ => None,
    })
}

const REJECT: &str = "Reject";

/// Negotiates one operational key offered by the initiator, updating `p`.
pub fn negotiate(p: &mut Params, limits: &Limits, key: &str, value: &str) -> Answer {
    use Answer::*;
    let reply = |v: Option<String>| Reply(v.unwrap_or_else(|| REJECT.to_string()));
    match key {
        "HeaderDigest" => reply(digest(value).map(|d| {
            p.header_digest = d;
            if d { "CRC32C" } else { "None" }.to_string()
        })),
        "DataDigest" => reply(digest(value).map(|d| {
            p.data_digest = d;
            if d { "CRC32C" } else { "None" }.to_string()
        })),
        "MaxRecvDataSegmentLength" => match number(value, 512, 0x00ff_ffff) {
            Some(n) => {
                p.initiator_mrdsl = n;
                Silent
            }
            None => Reply(REJECT.into()),
        },
        "MaxBurstLength" => reply(number(value, 512, 0x00ff_ffff).map(|n| {
            p.max_burst = n.min(limits.max_burst);
            p.first_burst = p.first_burst.min(p.max_burst);
            p.max_burst.to_string()
        })),
        "FirstBurstLength" => reply(number(value, 512, 0x00ff_ffff).map(|n| {
            p.first_burst = n.min(limits.first_burst).min(p.max_burst);
            p.first_burst.to_string()
        })),
        "MaxOutstandingR2T" => reply(number(value, 1, 65535).map(|n| {
            p.max_outstanding_r2t = n.min(limits.max_outstanding_r2t);
            p.max_outstanding_r2t.to_string()
        })),
        // AND with our Yes.
        "ImmediateData" => reply(boolean(value).map(|b| {
            p.immediate_data = b;
            yes_no(b)
        })),
        // OR with our No: the initiator decides.
        "InitialR2T" => reply(boolean(value).map(|b| {
            p.initial_r2t = b;
            yes_no(b)
        })),
        // OR with our Yes: we only deliver and accept data in order.
        "DataPDUInOrder" | "DataSequenceInOrder" => reply(boolean(value).map(|_| yes_no(true))),
        "ErrorRecoveryLevel" => reply(number(value, 0, 2).map(|_| "0".to_string())),
        "MaxConnections" => reply(number(value, 1, 65535).map(|_| "1".to_string())),
        "DefaultTime2Wait" => reply(number(value, 0, 3600).map(|n| {
            p.default_time2wait = n.max(p.default_time2wait);
            p.default_time2wait.to_string()
        })),
        "DefaultTime2Retain" => reply(number(value, 0, 3600).map(|n| {
            p.default_time2retain = n.min(p.default_time2retain);
            p.default_time2retain.to_string()
        })),
        // Markers were removed in RFC 7143; older initiators still offer them.
        "IFMarker" | "OFMarker" => reply(boolean(value).map(|_| yes_no(false))),
        "IFMarkInt" | "OFMarkInt" => Reply("Irrelevant".into()),
        "iSCSIProtocolLevel" => reply(number(value, 0, 31).map(|n| n.min(1).to_string())),
        "TaskReporting" => Reply("RFC3720".into()),
        "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" | "AuthMethod" | "SendTargets" => NotOperational,
        k if k.starts_with("CHAP_") => NotOperational,
        // TargetAlias, TargetAddress, TargetPortalGroupTag are ours to declare.
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => Reply("Irrelevant".into()),
        _ => Reply("NotUnderstood".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_like_the_rfc() {
        let l = Limits::default();
        let mut p = Params::new(&l);
        assert_eq!(negotiate(&mut p, &l, "HeaderDigest", "CRC32C,None"), Answer::Reply("CRC32C".into()));
        assert!(p.header_digest);
        assert_eq!(negotiate(&mut p, &l, "DataDigest", "None"), Answer::Reply("None".into()));
        assert_eq!(negotiate(&mut p, &l, "DataDigest", "MD5"), Answer::Reply("Reject".into()));
        assert_eq!(negotiate(&mut p, &l, "MaxRecvDataSegmentLength", "65536"), Answer::Silent);
        assert_eq!(p.initiator_mrdsl, 65536);
        assert_eq!(negotiate(&mut p, &l, "MaxRecvDataSegmentLength", "100"), Answer::Reply("Reject".into()));
        assert_eq!(negotiate(&mut p, &l, "MaxBurstLength", "16776192"), Answer::Reply("1048576".into()));
        assert_eq!(negotiate(&mut p, &l, "FirstBurstLength", "16776192"), Answer::Reply("262144".into()));
        assert_eq!(negotiate(&mut p, &l, "MaxOutstandingR2T", "1"), Answer::Reply("1".into()));
        assert_eq!(negotiate(&mut p, &l, "InitialR2T", "No"), Answer::Reply("No".into()));
        assert!(!p.initial_r2t);
        assert_eq!(negotiate(&mut p, &l, "ImmediateData", "maybe"), Answer::Reply("Reject".into()));
        assert_eq!(negotiate(&mut p, &l, "ErrorRecoveryLevel", "2"), Answer::Reply("0".into()));
        assert_eq!(negotiate(&mut p, &l, "MaxConnections", "8"), Answer::Reply("1".into()));
        assert_eq!(negotiate(&mut p, &l, "DefaultTime2Wait", "0"), Answer::Reply("2".into()));
        assert_eq!(negotiate(&mut p, &l, "DefaultTime2Retain", "0"), Answer::Reply("0".into()));
        assert_eq!(negotiate(&mut p, &l, "X-com.example.Foo", "1"), Answer::Reply("NotUnderstood".into()));
        assert_eq!(negotiate(&mut p, &l, "InitiatorName", "iqn.x"), Answer::NotOperational);
    }
}
