//! Sizes, durations and times as people type and read them.
//!
//! Sizes are binary: `K`, `M`, `G`, `T` (with or without `i`/`iB`/`B`) are
//! powers of 1024, and may have decimals (`1.5G`). Durations are
//! humantime's (`10s`, `500ms`, `2m`, `1h 30m`), or plain seconds.

use std::time::{Duration, SystemTime};

const UNITS: [(&str, u32); 5] = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)];

/// Parses `4096`, `512M`, `1.5G`, `2Gi`, `1TiB`: binary units, decimals
/// allowed, rounded down to whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim();
    let base = unit.strip_suffix("iB").or_else(|| unit.strip_suffix('i')).unwrap_or(unit);
    let base = base.strip_suffix('B').unwrap_or(base).to_ascii_uppercase();
    let Some(&(_, shift)) = UNITS.iter().find(|(u, _)| *u == base) else {
        return Err(format!("invalid size unit in {s:?} (use K, M, G or T: binary units)"));
    };
    let too_large = || format!("size {s:?} is too large");
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(1u64 << shift).ok_or_else(too_large);
    }
    let n: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0 && number.contains('.'))
        .ok_or_else(|| format!("invalid size {s:?}"))?;
    let bytes = n * (1u64 << shift) as f64;
    if bytes >= u64::MAX as f64 {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

/// `1.5 GiB`, `300 MiB`, `4096 B`: the largest binary unit with at most one
/// decimal, the exact byte count below 1 KiB.
pub fn human_size(bytes: u64) -> String {
    let Some(&(unit, shift)) = UNITS.iter().rev().find(|(_, shift)| bytes >= 1u64 << shift) else {
        return "0 B".into();
    };
    if shift == 0 {
        return format!("{bytes} B");
    }
    let n = bytes as f64 / (1u64 << shift) as f64;
    let text = format!("{n:.1}");
    format!("{} {unit}iB", text.strip_suffix(".0").unwrap_or(&text))
}

/// `10s`, `500ms`, `2m`, `1h 30m`, or plain seconds (`3`); more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| format!("duration {s:?} is too long"))?;
        Duration::from_secs(secs)
    } else {
        humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?
    };
    if d.is_zero() {
        return Err(format!("duration {s:?} must be more than zero"));
    }
    Ok(d)
}

/// A time in RFC 3339, to the second, in UTC: `2026-12-01T09:52:30Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How long ago `t` was, in the largest whole unit: `45s`, `12m`, `3h`, `5d`.
pub fn age(t: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(t).unwrap_or_default().as_secs();
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("1e3").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(4095), "4 KiB");
        assert_eq!(human_size(300 << 20), "300 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["fast", "", "0", "0s", "100000000000000000000", "100000000000000000000s", "-1s"]
        {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_118_750);
        assert_eq!(rfc3339(t), "2026-12-01T09:52:30Z");
        assert_eq!(age(t, t + Duration::from_secs(59)), "59s");
        assert_eq!(age(t, t + Duration::from_secs(3600)), "60m");
        assert_eq!(age(t, t + Duration::from_secs(3 * 86_400)), "3d");
    }
}
