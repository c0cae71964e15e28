//! CHAP with MD5 (RFC 1994 as profiled by RFC 7143 §12.1.3), one-way and mutual.
//!
//! The target sends a fresh random identifier and challenge on every login, so a response
//! captured from an earlier login never verifies again. The initiator's own challenge (mutual
//! CHAP) must differ from ours, which stops a reflection attack.

use md5::{Digest, Md5};
use rand::RngCore;

/// One user/secret pair.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.user)
    }
}

/// Why a CHAP exchange failed. All map to the "authentication failure" login status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChapError {
    #[error("initiator offered no supported CHAP algorithm (need 5 = MD5)")]
    NoAlgorithm,
    #[error("CHAP_{0} missing or malformed")]
    Malformed(&'static str),
    #[error("unknown CHAP user {0:?}")]
    UnknownUser(String),
    #[error("wrong CHAP response")]
    WrongResponse,
    #[error("initiator asked for mutual CHAP, which is not configured")]
    MutualNotConfigured,
    #[error("initiator reflected the target's challenge")]
    Reflected,
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 2048 {
            return None;
        }
        let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_string() };
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect()
    } else if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b64)
    } else {
        None
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    if s.len() > 2048 {
        return None;
    }
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// MD5(id || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Target side of one CHAP exchange.
pub struct ChapExchange {
    id: u8,
    challenge: [u8; 16],
}

impl ChapExchange {
    /// Answers the initiator's `CHAP_A` list: returns the keys to send (A, I, C).
    pub fn start(algorithms: &str) -> Result<(Self, Vec<(String, String)>), ChapError> {
        if !algorithms.split(',').any(|a| a.trim() == "5") {
            return Err(ChapError::NoAlgorithm);
        }
        let mut rng = rand::rng();
        let mut challenge = [0u8; 16];
        rng.fill_bytes(&mut challenge);
        let id = (rng.next_u32() & 0xff) as u8;
        let keys = vec![
            ("CHAP_A".to_string(), "5".to_string()),
            ("CHAP_I".to_string(), id.to_string()),
            ("CHAP_C".to_string(), hex(&challenge)),
        ];
        Ok((Self { id, challenge }, keys))
    }

    /// Checks the initiator's answer and, for mutual CHAP, computes ours. `get` looks up a
    /// key of the initiator's PDU.
    pub fn finish(
        &self,
        get: impl Fn(&str) -> Option<String>,
        expected: &Credentials,
        mutual: Option<&Credentials>,
    ) -> Result<Vec<(String, String)>, ChapError> {
        let name = get("CHAP_N").ok_or(ChapError::Malformed("N"))?;
        let resp = get("CHAP_R").and_then(|r| decode_binary(&r)).ok_or(ChapError::Malformed("R"))?;
        if name != expected.user {
            return Err(ChapError::UnknownUser(name));
        }
        let want = response(self.id, expected.secret.as_bytes(), &self.challenge);
        if !constant_time_eq(&resp, &want) {
            return Err(ChapError::WrongResponse);
        }
        let (Some(i), Some(c)) = (get("CHAP_I"), get("CHAP_C")) else {
            return Ok(Vec::new());
        };
        let target = mutual.ok_or(ChapError::MutualNotConfigured)?;
        let id: u8 = i.parse().map_err(|_| ChapError::Malformed("I"))?;
        let challenge = decode_binary(&c).ok_or(ChapError::Malformed("C"))?;
        if challenge == self.challenge {
            return Err(ChapError::Reflected);
        }
        let ours = response(id, target.secret.as_bytes(), &challenge);
        Ok(vec![("CHAP_N".to_string(), target.user.clone()), ("CHAP_R".to_string(), hex(&ours))])
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(u: &str, s: &str) -> Credentials {
        Credentials { user: u.into(), secret: s.into() }
    }

    fn lookup(pairs: &[(String, String)], k: &str) -> Option<String> {
        pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn one_way_and_mutual() {
        let (ex, keys) = ChapExchange::start("7,5").unwrap();
        let id: u8 = lookup(&keys, "CHAP_I").unwrap().parse().unwrap();
        let ch = decode_binary(&lookup(&keys, "CHAP_C").unwrap()).unwrap();
        let good = hex(&response(id, b"secret-secret", &ch));
        let ini = vec![("CHAP_N".to_string(), "u".to_string()), ("CHAP_R".to_string(), good.clone())];
        assert_eq!(ex.finish(|k| lookup(&ini, k), &creds("u", "secret-secret"), None), Ok(vec![]));
        assert_eq!(ex.finish(|k| lookup(&ini, k), &creds("u", "other-secret"), None), Err(ChapError::WrongResponse));
        assert_eq!(ex.finish(|k| lookup(&ini, k), &creds("v", "secret-secret"), None), Err(ChapError::UnknownUser("u".into())));

        let mut mutual = ini.clone();
        mutual.push(("CHAP_I".into(), "7".into()));
        mutual.push(("CHAP_C".into(), "0x0102030405060708".into()));
        assert_eq!(
            ex.finish(|k| lookup(&mutual, k), &creds("u", "secret-secret"), None),
            Err(ChapError::MutualNotConfigured)
        );
        let out = ex.finish(|k| lookup(&mutual, k), &creds("u", "secret-secret"), Some(&creds("t", "target-secret"))).unwrap();
        let r = decode_binary(&lookup(&out, "CHAP_R").unwrap()).unwrap();
        assert_eq!(r, response(7, b"target-secret", &[1, 2, 3, 4, 5, 6, 7, 8]));

        let mut reflected = ini;
        reflected.push(("CHAP_I".into(), "7".into()));
        reflected.push(("CHAP_C".into(), hex(&ch)));
        assert_eq!(
            ex.finish(|k| lookup(&reflected, k), &creds("u", "secret-secret"), Some(&creds("t", "target-secret"))),
            Err(ChapError::Reflected)
        );
    }

    #[test]
    fn a_fresh_challenge_defeats_replay() {
        let (ex1, k1) = ChapExchange::start("5").unwrap();
        let id: u8 = lookup(&k1, "CHAP_I").unwrap().parse().unwrap();
        let ch = decode_binary(&lookup(&k1, "CHAP_C").unwrap()).unwrap();
        let ini = vec![("CHAP_N".to_string(), "u".to_string()), ("CHAP_R".to_string(), hex(&response(id, b"s", &ch)))];
        assert!(ex1.finish(|k| lookup(&ini, k), &creds("u", "s"), None).is_ok());
        let (ex2, _) = ChapExchange::start("5").unwrap();
        assert_eq!(ex2.finish(|k| lookup(&ini, k), &creds("u", "s"), None), Err(ChapError::WrongResponse));
        assert_eq!(ChapExchange::start("7").err(), Some(ChapError::NoAlgorithm));
    }

    #[test]
    fn binary_decoding() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("0x"), None);
    }
}
