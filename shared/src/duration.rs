//! Human durations (`30s`, `5m`, `2h`, `1h30m`, `1d`) and sizes (`512M`, `2G`, `1.5G`).

use std::time::Duration;

/// Parses `30s`, `5m`, `2h`, `1d`, combinations such as `1h30m`, `250ms`, or a bare
/// number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: use e.g. 30s, 5m or 2h".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total_ms: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration `{s}`: use e.g. 30s, 5m, 2h or 1h30m"));
        }
        let n: u128 = rest[..digits].parse().map_err(|_| format!("invalid duration `{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms = match unit {
            "ms" => 1,
            "s" | "sec" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("invalid duration `{s}`: a unit is missing after {n} (s, m, h or d)")),
            other => return Err(format!("invalid duration `{s}`: unknown unit `{other}` (use ms, s, m, h or d)")),
        };
        total_ms = total_ms.checked_add(n.saturating_mul(ms)).ok_or_else(|| format!("invalid duration `{s}`: too large"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("invalid duration `{s}`: too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses a memory size into MiB: `512M`, `2G`, `1.5G`, `64MiB`, or a bare number of MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size `{s}`: use e.g. 512M or 2G"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("invalid size `{s}`: must be a positive amount"));
    }
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1.0,
        "k" | "kb" | "kib" => 1.0 / 1024.0,
        "g" | "gb" | "gib" => 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0,
        other => return Err(format!("invalid size `{s}`: unknown unit `{other}` (use M, G or T)")),
    };
    Ok((n * factor).ceil() as u64)
}

/// Parses a size into bytes, with the units of `parse_size_mib`: `512K`, `100M`, `2G`,
/// `1.5G`, `4096B`, or a bare number of MiB.
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size `{s}`: use e.g. 512K, 100M or 2G"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("invalid size `{s}`: must be a positive amount"));
    }
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "" | "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size `{s}`: unknown unit `{other}` (use B, K, M, G or T)")),
    };
    let bytes = (n * factor).ceil();
    if bytes >= u64::MAX as f64 {
        return Err(format!("invalid size `{s}`: too large"));
    }
    Ok(bytes as u64)
}

/// Formats a size in bytes for people: `512 B`, `64 KiB`, `1 MiB`, `1.3 MiB`, `2 GiB`.
pub fn format_size(bytes: u64) -> String {
    for (unit, n) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= n {
            return if bytes.checked_rem(n) == Some(0) { format!("{} {unit}", bytes / n) } else { format!("{:.1} {unit}", bytes as f64 / n as f64) };
        }
    }
    format!("{bytes} B")
}

/// Formats a duration compactly for tables: `850ms`, `12.3s`, `4m05s`, `2h07m`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "s", "5x", "-3s", "1.5h", "3m5"] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("1.5G"), Ok(1536));
        assert_eq!(parse_size_mib("64"), Ok(64));
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("3Q").is_err());
        assert_eq!(parse_size_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_size_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_size_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size_bytes("4096b"), Ok(4096));
        assert_eq!(parse_size_bytes("2"), Ok(2 << 20));
        assert!(parse_size_bytes("much").is_err());
        assert!(parse_size_bytes("1Q").is_err());
        assert!(parse_size_bytes("99999999999T").is_err());
        assert_eq!(format_size(1 << 20), "1 MiB");
        assert_eq!(format_size((1 << 20) + (300 << 10)), "1.3 MiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
