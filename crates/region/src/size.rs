//! Human-readable sizes for the command line: `4096`, `512K`, `4G`, `1TiB`.

use crate::RegionError;

/// Parses a byte count with an optional binary unit suffix.
///
/// Units are powers of 1024 (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`),
/// case-insensitive, because disk images are sized in whole pages and gibibytes;
/// decimal units would give sizes that are not page multiples.
pub fn parse_size(text: &str) -> Result<u64, RegionError> {
    let invalid = || RegionError::InvalidSize(text.to_owned());
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits_end == 0 {
        return Err(invalid());
    }
    let number: u64 = trimmed[..digits_end].parse().map_err(|_| invalid())?;
    let shift = match trimmed[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for bad in ["", "G", "-1G", "4X", "4 G B", "1.5G", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
