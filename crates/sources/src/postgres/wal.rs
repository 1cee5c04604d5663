//! WAL files as `archive_command` hands them over: segment and timeline-history names,
//! and the long page header that opens every segment and names the cluster it belongs
//! to (the system identifier), so a segment from another cluster is never accepted.

use std::path::Path;

use custos_model::{Error, Kind, Result};

/// Flag in `xlp_info`: the page has the long header (first page of a segment).
const XLP_LONG_HEADER: u16 = 0x0002;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, log, segment.
    Segment { timeline: u32, log: u32, seg: u32 },
    /// `TTTTTTTT.history`.
    History { timeline: u32 },
    /// `...partial` or `....backup`: archived as they are, without header checks.
    Other,
}

pub fn classify(name: &str) -> Result<WalFileKind> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    let bad = || {
        Error::config(format!("`{name}` is not a WAL file name"))
            .hint("archive_command must pass %p (a path under pg_wal) and restore_command %f")
    };
    if name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(WalFileKind::Segment {
            timeline: hex(&name[0..8]).ok_or_else(bad)?,
            log: hex(&name[8..16]).ok_or_else(bad)?,
            seg: hex(&name[16..24]).ok_or_else(bad)?,
        });
    }
    if let Some(tli) = name.strip_suffix(".history") {
        if tli.len() == 8 {
            return Ok(WalFileKind::History {
                timeline: hex(tli).ok_or_else(bad)?,
            });
        }
    }
    if (name.ends_with(".partial") || name.ends_with(".backup"))
        && name.len() > 24
        // Bytes, not a str slice: a name from a listing may hold any UTF-8, and byte 24
        // need not start a character.
        && name.as_bytes()[..24].iter().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(WalFileKind::Other);
    }
    Err(bad())
}

/// Timeline and segment number (position in the WAL / `segment_size`) of a segment name.
pub fn segment_number(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    match classify(name).ok()? {
        WalFileKind::Segment { timeline, log, seg } => Some((
            timeline,
            u64::from(log) * (0x1_0000_0000 / segment_size) + u64::from(seg),
        )),
        _ => None,
    }
}

/// The name of segment `number` on `timeline`.
pub fn segment_name(timeline: u32, number: u64, segment_size: u64) -> String {
    let per_log = 0x1_0000_0000 / segment_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        number / per_log,
        number % per_log
    )
}

/// What the first page of a segment says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_addr: u64,
    pub system_id: u64,
    pub seg_size: u32,
    pub block_size: u32,
}

pub fn parse_header(data: &[u8], name: &str) -> Result<SegmentHeader> {
    let bad = |why: &str| {
        Error::new(
            Kind::Source,
            format!("{name} is not a valid WAL segment: {why}"),
        )
        .hint("check that archive_command passes %p unchanged")
    };
    if data.len() < 40 {
        return Err(bad("shorter than a WAL page header"));
    }
    let u16at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    let info = u16at(2);
    if info & XLP_LONG_HEADER == 0 {
        return Err(bad("the first page has no long header"));
    }
    let h = SegmentHeader {
        magic: u16at(0),
        timeline: u32at(4),
        page_addr: u64at(8),
        system_id: u64at(24),
        seg_size: u32at(32),
        block_size: u32at(36),
    };
    if h.seg_size as usize != data.len() {
        return Err(bad(&format!(
            "its header says {} bytes, the file has {}",
            h.seg_size,
            data.len()
        )));
    }
    if !h.seg_size.is_power_of_two() || !h.block_size.is_power_of_two() {
        return Err(bad("implausible segment or block size"));
    }
    Ok(h)
}

/// The system identifier of the cluster in `pgdata` (first 8 bytes of global/pg_control).
pub fn system_id(pgdata: &Path) -> Result<u64> {
    let p = pgdata.join("global/pg_control");
    let b = std::fs::read(&p).map_err(|e| {
        Error::config(format!("cannot read {}: {e}", p.display()))
            .hint("point --pgdata (or PGDATA) at the cluster's data directory; archive_command runs there by default")
    })?;
    if b.len() < 8 {
        return Err(Error::config(format!(
            "{} is too short to be pg_control",
            p.display()
        )));
    }
    Ok(u64::from_le_bytes(b[..8].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_numbers_round_trip() {
        let s = 16 << 20;
        let (t, n) = segment_number("00000002000000010000003F", s).unwrap();
        assert_eq!((t, n), (2, 256 + 63));
        assert_eq!(segment_name(2, n, s), "00000002000000010000003F");
        assert_eq!(segment_name(1, 256, s), "000000010000000100000000");
        assert_eq!(segment_number("00000002.history", s), None);
    }

    fn segment(sysid: u64, size: u32) -> Vec<u8> {
        let mut d = vec![0u8; size as usize];
        d[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        d[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        d[4..8].copy_from_slice(&1u32.to_le_bytes());
        d[24..32].copy_from_slice(&sysid.to_le_bytes());
        d[32..36].copy_from_slice(&size.to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        d
    }

    #[test]
    fn names_and_headers() {
        assert_eq!(
            classify("000000010000000A000000FF").unwrap(),
            WalFileKind::Segment {
                timeline: 1,
                log: 10,
                seg: 255
            }
        );
        assert_eq!(
            classify("00000002.history").unwrap(),
            WalFileKind::History { timeline: 2 }
        );
        assert_eq!(
            classify("000000010000000000000003.00000028.backup").unwrap(),
            WalFileKind::Other
        );
        // A listed name whose 24th byte falls inside a character (storage can hold any
        // name): refused, not a panic.
        for bad in [
            "00000001000000000000000\u{e9}.partial",
            "0000000100000000000000\u{1f600}.backup",
        ] {
            assert!(classify(bad).is_err(), "{bad}");
            assert!(segment_number(bad, 16 << 20).is_none(), "{bad}");
        }
        assert!(classify("../../etc/passwd").is_err());
        assert!(classify("00000001000000000000000G").is_err());
        let h = parse_header(&segment(42, 1 << 20), "x").unwrap();
        assert_eq!((h.system_id, h.seg_size, h.block_size), (42, 1 << 20, 8192));
        let mut short = segment(42, 1 << 20);
        short.truncate(1 << 19);
        assert!(parse_header(&short, "x").is_err());
        let mut no_long = segment(42, 1 << 20);
        no_long[2] = 0;
        assert!(parse_header(&no_long, "x").is_err());
    }
}
