//! Chunkers: content-defined (FastCDC 2020) for files and streams, fixed-size for database
//! files whose unit of change is the 8 KiB page. Pure: reads from any `Read`, does no
//! hashing, compression or encryption.
//!
//! The CDC gear table is seeded from the repository's secret id key, so chunk boundaries
//! (and so chunk sizes visible in storage) reveal nothing about content to someone without
//! the key (the fingerprinting attack on unseeded CDC).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// How a byte stream is cut. Stored in the repository config: every writer of a repository
/// must cut the same way for deduplication to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ChunkerParams {
    /// FastCDC with normalization level 1.
    Cdc { min: u32, avg: u32, max: u32 },
    /// Fixed blocks; `size` is a multiple of the PostgreSQL page size (8 KiB).
    Fixed { size: u32 },
}

impl ChunkerParams {
    /// 512 KiB / 1 MiB / 8 MiB, restic's proven sizes.
    pub const DEFAULT_CDC: ChunkerParams = ChunkerParams::Cdc {
        min: 512 * 1024,
        avg: 1024 * 1024,
        max: 8 * 1024 * 1024,
    };
    /// 128 KiB blocks (16 pages). Measured on the 2 GB pgbench + vector data set against
    /// one-page blocks: the full backup took 3.5 s instead of 6.7 s and stored 348 MiB
    /// instead of 429 MiB; even the incremental after a minute of random pgbench updates
    /// (which touch nearly every 16-page block) stored 86 MiB instead of 102 MiB, because
    /// 16 pages compress together far better than one. `init --db-block-kib 8` remains for
    /// workloads that change few, scattered pages.
    pub const DEFAULT_FIXED: ChunkerParams = ChunkerParams::Fixed { size: 128 * 1024 };

    /// Whether these parameters can be used: what the repository config holds is read
    /// from storage, and a chunker made from out-of-range values panics or allocates
    /// without bound. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let within = |what: &str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} {v} is outside {lo}..={hi}"))
            }
        };
        match *self {
            ChunkerParams::Cdc { min, avg, max } => {
                within("min", min, MINIMUM_MIN, MINIMUM_MAX)?;
                within("avg", avg, AVERAGE_MIN, AVERAGE_MAX)?;
                within("max", max, MAXIMUM_MIN, MAXIMUM_MAX)?;
                if !(min <= avg && avg <= max) {
                    return Err(format!("min {min}, avg {avg}, max {max} are not in order"));
                }
                Ok(())
            }
            ChunkerParams::Fixed { size } => {
                within("size", size, 8192, 1 << 20)?;
                if size % 8192 != 0 {
                    return Err(format!("size {size} is not a multiple of 8192"));
                }
                Ok(())
            }
        }
    }

    /// Splits `reader` into chunks. `size_hint` is the known total length (a file's size),
    /// used to take a small input in one read without allocating the CDC window.
    pub fn split<'a, R: Read + 'a>(
        &self,
        reader: R,
        size_hint: Option<u64>,
        seed: u64,
    ) -> Box<dyn Iterator<Item = io::Result<Vec<u8>>> + 'a> {
        match *self {
            ChunkerParams::Cdc { min, avg, max } => {
                if let Some(n) = size_hint.filter(|n| *n <= u64::from(min)) {
                    return Box::new(Whole {
                        reader: Some(reader),
                        hint: n as usize,
                    });
                }
                Box::new(Cdc::new(reader, min, avg, max, size_hint, seed))
            }
            ChunkerParams::Fixed { size } => Box::new(Fixed {
                reader,
                size: size as usize,
                done: false,
            }),
        }
    }
}

/// FastCDC 2020 over a reader. It cuts exactly where `fastcdc::v2020::StreamCDC` does (the
/// same `cut_gear` over a window of at least `max` bytes, or all that is left), without that
/// type's cost per chunk: `StreamCDC` drains each chunk from the front of its `max`-byte
/// window (shifting the rest, ~7 MiB for a 1 MiB chunk), collects it byte by byte and
/// zeroes the window's tail again. Here the window is one and a half times `max`, a chunk
/// is copied out once, and what is left is moved to the front only when the tail has no
/// room (at most once per `max / 2` bytes cut).
struct Cdc<R> {
    reader: R,
    buf: Vec<u8>,
    /// The bytes read and not yet cut: `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl<R: Read> Cdc<R> {
    fn new(reader: R, min: u32, avg: u32, max: u32, size_hint: Option<u64>, seed: u64) -> Self {
        use fastcdc::v2020::{get_gear_with_seed, logarithm2, Normalization, MASKS};
        let bits = logarithm2(avg);
        let level = Normalization::Level1.bits();
        let (gear, gear_ls) = get_gear_with_seed(seed);
        let window = Self::window(max as usize);
        // A file of known size takes a window of its size (and one byte to see its end in),
        // grown to the full window only if it turns out longer.
        let first = size_hint.map_or(window, |n| (n as usize).saturating_add(1).min(window));
        Cdc {
            reader,
            buf: vec![0; first],
            start: 0,
            end: 0,
            eof: false,
            min: min as usize,
            avg: avg as usize,
            max: max as usize,
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
            gear,
            gear_ls,
        }
    }

    fn window(max: usize) -> usize {
        max + max / 2
    }

    /// Reads until `max` bytes wait to be cut or the reader ends.
    fn fill(&mut self) -> io::Result<()> {
        while !self.eof && self.end - self.start < self.max {
            if self.end == self.buf.len() {
                let window = Self::window(self.max);
                if self.buf.len() < window {
                    self.buf.resize(window, 0);
                } else {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
            }
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for Cdc<R> {
    type Item = io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            self.eof = true;
            self.start = self.end;
            return Some(Err(e));
        }
        let waiting = &self.buf[self.start..self.end];
        if waiting.is_empty() {
            return None;
        }
        let (_, count) = fastcdc::v2020::cut_gear(
            waiting,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        let chunk = waiting[..count].to_vec();
        self.start += count;
        Some(Ok(chunk))
    }
}

struct Whole<R> {
    reader: Option<R>,
    hint: usize,
}

impl<R: Read> Iterator for Whole<R> {
    type Item = io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut r = self.reader.take()?;
        let mut buf = Vec::with_capacity(self.hint);
        match r.read_to_end(&mut buf) {
            Ok(0) => None,
            Ok(_) => Some(Ok(buf)),
            Err(e) => Some(Err(e)),
        }
    }
}

struct Fixed<R> {
    reader: R,
    size: usize,
    done: bool,
}

impl<R: Read> Iterator for Fixed<R> {
    type Item = io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // Read into spare capacity: no zeroing of a buffer about to be overwritten.
        let mut buf = Vec::with_capacity(self.size);
        if let Err(e) = (&mut self.reader)
            .take(self.size as u64)
            .read_to_end(&mut buf)
        {
            self.done = true;
            return Some(Err(e));
        }
        let filled = buf.len();
        if filled < self.size {
            self.done = true;
        }
        if filled == 0 {
            return None;
        }
        Some(Ok(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random()).collect()
    }

    fn cut(p: ChunkerParams, d: &[u8], seed: u64) -> Vec<Vec<u8>> {
        p.split(d, Some(d.len() as u64), seed)
            .collect::<io::Result<_>>()
            .unwrap()
    }

    #[test]
    fn chunks_reassemble_and_respect_bounds() {
        let d = data(20 << 20, 1);
        let p = ChunkerParams::DEFAULT_CDC;
        let chunks = cut(p, &d, 42);
        assert_eq!(chunks.concat(), d);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= 512 * 1024 && c.len() <= 8 << 20);
        }
        let fixed = cut(ChunkerParams::Fixed { size: 8192 * 3 }, &d[..100_000], 0);
        assert_eq!(fixed.concat(), &d[..100_000]);
        assert!(fixed[..fixed.len() - 1].iter().all(|c| c.len() == 8192 * 3));
        assert!(cut(p, &[], 0).is_empty());
        assert!(cut(ChunkerParams::DEFAULT_FIXED, &[], 0).is_empty());
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let d = data(16 << 20, 2);
        let mut e = d.clone();
        e.splice(5_000_000..5_000_000, b"inserted bytes".iter().copied());
        let p = ChunkerParams::DEFAULT_CDC;
        let a: std::collections::HashSet<_> = cut(p, &d, 9).into_iter().collect();
        let b = cut(p, &e, 9);
        let new = b.iter().filter(|c| !a.contains(*c)).count();
        assert!(new <= 2, "{new} chunks changed for one insertion");
    }

    /// Cuts as fastcdc's own `StreamCDC` does, whatever the length, the reader's read sizes
    /// and a size hint that is right, short or long: repositories written before keep
    /// deduplicating.
    #[test]
    fn cuts_where_fastcdcs_stream_chunker_cuts() {
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                self.1 = self.1 % 7 + 1;
                let n = out.len().min(self.0.len()).min(self.1 * 150_001);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let p = ChunkerParams::Cdc {
            min: 64 * 1024,
            avg: 256 * 1024,
            max: 1024 * 1024,
        };
        let ChunkerParams::Cdc { min, avg, max } = p else {
            unreachable!()
        };
        // Random bytes, then a run of zeros (cut at max) and text, so every kind of cut
        // (below avg, above, at max, the tail) happens.
        let mut d = data(9 << 20, 4);
        d.extend(std::iter::repeat_n(0u8, 3 << 20));
        d.extend(b"patient vitals stable ".iter().cycle().take(2 << 20));
        for len in [
            0,
            1,
            70_000,
            300_000,
            1 << 20,
            (1 << 20) + 1,
            5_000_001,
            d.len(),
        ] {
            let d = &d[..len];
            let theirs: Vec<Vec<u8>> = fastcdc::v2020::StreamCDC::with_level_and_seed(
                d,
                min,
                avg,
                max,
                fastcdc::v2020::Normalization::Level1,
                77,
            )
            .map(|c| c.unwrap().data)
            .collect();
            for hint in [
                None,
                Some(len as u64),
                Some(len as u64 / 2),
                Some(len as u64 * 2),
            ] {
                let ours: Vec<Vec<u8>> = p
                    .split(Dribble(d, 0), hint, 77)
                    .collect::<io::Result<_>>()
                    .unwrap();
                let small = hint.is_some_and(|n| n <= u64::from(min));
                if small && len as u64 > hint.unwrap() {
                    // A hint under min takes the input whole: a file that grew is one chunk.
                    assert_eq!(ours.concat(), d);
                    continue;
                }
                assert_eq!(ours.len(), theirs.len(), "len {len} hint {hint:?}");
                assert!(ours == theirs, "len {len} hint {hint:?}: cuts differ");
            }
        }
    }

    #[test]
    fn a_read_error_ends_the_chunks() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk gone"));
                }
                let n = out.len().min(self.0);
                out[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut it = ChunkerParams::DEFAULT_CDC.split(Broken(3 << 20), None, 1);
        let err = it.find_map(|r| r.err()).expect("the read error surfaces");
        assert_eq!(err.to_string(), "disk gone");
        assert!(it.next().is_none());
    }

    #[test]
    fn seed_changes_boundaries() {
        let d = data(8 << 20, 3);
        let p = ChunkerParams::DEFAULT_CDC;
        let a: Vec<usize> = cut(p, &d, 1).iter().map(|c| c.len()).collect();
        let b: Vec<usize> = cut(p, &d, 2).iter().map(|c| c.len()).collect();
        assert_ne!(a, b);
    }
}
