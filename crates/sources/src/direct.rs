//! Reading large files without the page cache (`O_DIRECT`), for database backups.

use std::path::Path;

/// Reads a large file in fixed blocks with `O_DIRECT`: from disk straight into an aligned
/// buffer, without going through (and filling) the page cache of the database host, which
/// otherwise costs about as much CPU as compressing the data. Coherent with PostgreSQL's
/// buffered writes: the kernel writes dirty cached pages of a range back before reading
/// it directly. Direct reads have no kernel read-ahead, so a thread reads ahead (up to 4
/// MiB) while the caller works on what it read.
pub struct DirectReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirectReader {
    /// A reader of `block`-sized pieces of `path`, or None (small file, file system
    /// without direct I/O, block size not aligned): the caller then reads through the
    /// page cache.
    pub fn open(path: &Path, block: usize) -> Option<DirectReader> {
        let mut direct = Direct::open(path, block)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(2 * Direct::READ / block);
        let thread = std::thread::spawn(move || {
            for b in &mut direct {
                if tx.send(b).is_err() {
                    return;
                }
            }
        });
        Some(DirectReader {
            rx,
            thread: Some(thread),
        })
    }
}

impl Iterator for DirectReader {
    type Item = std::io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for DirectReader {
    fn drop(&mut self) {
        // Unblocks the reader (its next send fails), then waits for it.
        let (_, rx) = std::sync::mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reading itself, on the read-ahead thread.
struct Direct {
    file: std::fs::File,
    buf: *mut u8,
    /// Size of the blocks handed out.
    block: usize,
    /// File offset of the buffer's first byte.
    pos: u64,
    /// Bytes read into the buffer, and how many of them were handed out.
    filled: usize,
    taken: usize,
    eof: bool,
}

// SAFETY: `buf` is owned by the value alone (allocated in `open`, freed in Drop).
unsafe impl Send for Direct {}

impl Direct {
    const ALIGN: usize = 4096;
    /// Direct reads are synchronous: read 2 MiB at a time (then cut), not one block.
    const READ: usize = 2 << 20;

    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(Self::READ, Self::ALIGN).expect("valid layout")
    }

    fn open(path: &Path, block: usize) -> Option<Direct> {
        use std::os::unix::fs::OpenOptionsExt;
        if block == 0 || !block.is_multiple_of(Self::ALIGN) || !Self::READ.is_multiple_of(block) {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        if file.metadata().ok()?.len() < (1 << 20) {
            return None;
        }
        // SAFETY: a non-zero size; freed with the same layout in Drop.
        let buf = unsafe { std::alloc::alloc(Self::layout()) };
        if buf.is_null() {
            return None;
        }
        let mut r = Direct {
            file,
            buf,
            block,
            pos: 0,
            filled: 0,
            taken: 0,
            eof: false,
        };
        // A file system that refuses direct reads says so on the first one.
        r.fill().ok()?;
        Some(r)
    }

    /// Reads the next stretch of the file into the buffer.
    fn fill(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.pos += self.filled as u64;
        self.filled = 0;
        self.taken = 0;
        // SAFETY: `buf` holds READ bytes, allocated in `open` and owned by self.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf, Self::READ) };
        while self.filled < Self::READ {
            match self
                .file
                .read_at(&mut buf[self.filled..], self.pos + self.filled as u64)
            {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.filled += n;
                    // Direct reads end short only at the end of the file.
                    if n % Self::ALIGN != 0 {
                        self.eof = true;
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Iterator for Direct {
    type Item = std::io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.taken == self.filled {
            if self.eof {
                return None;
            }
            if let Err(e) = self.fill() {
                self.eof = true;
                self.filled = 0;
                return Some(Err(e));
            }
            if self.filled == 0 {
                return None;
            }
        }
        let n = self.block.min(self.filled - self.taken);
        // SAFETY: bytes taken..taken+n of the buffer were read by `fill`.
        let out = unsafe { std::slice::from_raw_parts(self.buf.add(self.taken), n) }.to_vec();
        self.taken += n;
        Some(Ok(out))
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // SAFETY: allocated in `open` with this layout.
        unsafe { std::alloc::dealloc(self.buf, Self::layout()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks read around the page cache are the file, whatever its length; a file too
    /// small for direct reads is left to the caller.
    #[test]
    fn direct_blocks_are_the_file() {
        // In the checkout's file system (a temporary folder may be tmpfs).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/direct-test");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("f{}", std::process::id()));
        let data: Vec<u8> = (0..(5u32 << 20) + 1000).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let r = DirectReader::open(&path, 128 * 1024).expect("ext4/xfs take O_DIRECT");
        let blocks: Vec<Vec<u8>> = r.map(|b| b.unwrap()).collect();
        assert!(blocks[..blocks.len() - 1]
            .iter()
            .all(|b| b.len() == 128 * 1024));
        assert_eq!(blocks.last().unwrap().len(), 1000);
        assert_eq!(blocks.concat(), data);
        // A reader dropped half-way stops its read-ahead thread.
        let mut r = DirectReader::open(&path, 128 * 1024).unwrap();
        assert_eq!(r.next().unwrap().unwrap(), data[..128 * 1024]);
        drop(r);
        std::fs::write(&path, &data[..4096]).unwrap();
        assert!(DirectReader::open(&path, 128 * 1024).is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
