//! Byte sizes on the command line (`64KiB`, `1MiB`, `256MB`) and in human output.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error(
        "`{0}`: expected a whole number of bytes with an optional unit (e.g. 65536, 64KiB, 1MiB, 256MB)"
    )]
    Malformed(String),
    #[error("`{0}`: unknown unit `{1}` (use B, K/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, TB)")]
    UnknownUnit(String, String),
    #[error("`{0}` does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a byte size: a whole number followed by an optional unit.
///
/// Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; the SI units
/// (`KB`, `MB`, `GB`, `TB`) are powers of 1000, as `dd` reads them. A bare
/// letter (`K`, `M`, `G`, `T`) is binary. Units are case-insensitive and may be
/// separated from the number by spaces.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(SizeError::Malformed(s.to_string()));
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| SizeError::Overflow(s.to_string()))?;
    let unit = t[digits_end..].trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ if unit.starts_with(['.', ',']) => return Err(SizeError::Malformed(s.to_string())),
        _ => return Err(SizeError::UnknownUnit(s.to_string(), unit.to_string())),
    };
    number.checked_mul(multiplier).ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// A byte count for humans: exact below 1 KiB, else binary units with up to
/// one decimal (`64 KiB`, `1.5 MiB`).
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let n = self.0;
        if n < 1024 {
            return write!(f, "{n} B");
        }
        let mut unit = 0;
        let mut scaled = n as f64;
        while scaled >= 1024.0 && unit + 1 < UNITS.len() {
            scaled /= 1024.0;
            unit += 1;
        }
        // Whole values print without a decimal: 64 KiB, not 64.0 KiB.
        if n & ((1u64 << (10 * unit as u32)) - 1) == 0 {
            write!(f, "{} {}", n >> (10 * unit as u32), UNITS[unit])
        } else {
            write!(f, "{scaled:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("64 kib"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("256MB"), Ok(256_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("3KB"), Ok(3000));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 7B "), Ok(7));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        assert!(matches!(parse_size("KiB"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1.5MiB"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("12XB"), Err(SizeError::UnknownUnit(_, _))));
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::Overflow(_))));
        assert!(matches!(parse_size("16777216TiB"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes(65536).to_string(), "64 KiB");
        assert_eq!(Bytes(256 << 20).to_string(), "256 MiB");
        assert_eq!(Bytes(1536 * 1024).to_string(), "1.5 MiB");
        assert_eq!(Bytes(5 << 30).to_string(), "5 GiB");
    }
}
