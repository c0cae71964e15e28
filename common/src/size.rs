//! Human-readable byte sizes (`512MiB`, `1GiB`, `4096`) for flags and config files.

use std::fmt;
use std::str::FromStr;

/// Why a size string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("size {0:?} has no number")]
    NoNumber(String),
    #[error("size {0:?} has unknown unit {1:?} (use B, KiB, MiB, GiB, TiB, or K/M/G/T)")]
    UnknownUnit(String, String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `123`, `4k`, `512MiB`, `1GiB`, `2TB`... Binary units throughout: storage operators
/// size LUNs in powers of two, and `1G` meaning 10^9 would give odd block counts.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::NoNumber(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        other => return Err(SizeError::UnknownUnit(s.to_string(), other.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// A byte count that parses from and prints as a human size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["TiB", "GiB", "MiB", "KiB", "B"];
        for (i, unit) in UNITS.iter().enumerate() {
            let shift = 40 - 10 * i as u32;
            if self.0 >= (1 << shift) && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{}", self.0 >> shift, unit);
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size(" 2 TB "), Ok(2 << 40));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("GiB"), Err(SizeError::NoNumber(_))));
        assert!(matches!(parse_size("1XB"), Err(SizeError::UnknownUnit(..))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("16384PiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_round_trip() {
        for s in ["1GiB", "512MiB", "3KiB", "17B"] {
            assert_eq!(ByteSize(parse_size(s).unwrap()).to_string(), s);
        }
    }
}
