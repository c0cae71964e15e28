//! `key=value` text as carried in Login and Text PDUs (RFC 7143 §6): NUL-terminated pairs,
//! keys up to 63 bytes, values up to 255 bytes except where a key allows more.

/// Why a text segment was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    #[error("text pair without '=': {0:?}")]
    NoEquals(String),
    #[error("key too long or empty: {0:?}")]
    BadKey(String),
    #[error("text is not valid UTF-8")]
    NotUtf8,
    #[error("key {0} appears twice")]
    Duplicate(String),
    #[error("more than {0} bytes of text")]
    TooLong(usize),
}

/// Largest login/text request (all continuation PDUs together) we accept.
pub const MAX_TEXT: usize = 64 * 1024;

/// Parses a text segment into ordered pairs. Duplicate keys are an initiator error.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    if data.len() > MAX_TEXT {
        return Err(TextError::TooLong(MAX_TEXT));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in data.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or_else(|| TextError::NoEquals(s.chars().take(64).collect()))?;
        if k.is_empty() || k.len() > 63 {
            return Err(TextError::BadKey(k.chars().take(64).collect()));
        }
        if out.iter().any(|(ok, _)| ok == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as a text segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_refuses_garbage() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0").unwrap();
        assert_eq!(p, vec![("InitiatorName".into(), "iqn.x".into()), ("SessionType".into(), "Normal".into())]);
        assert_eq!(parse(b"a=b\0a=c\0"), Err(TextError::Duplicate("a".into())));
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals(_))));
        assert!(matches!(parse(b"=x\0"), Err(TextError::BadKey(_))));
        assert_eq!(parse(&[0xff, b'=', b'1']), Err(TextError::NotUtf8));
        assert_eq!(encode(&p), b"InitiatorName=iqn.x\0SessionType=Normal\0".to_vec());
    }
}
