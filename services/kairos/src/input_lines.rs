//! The lines of a replay's input file, read once from start to end.
//!
//! A large regular file is read with `O_DIRECT`, in aligned blocks, by a thread that
//! keeps a few blocks ahead of the replay. Read through the page cache, the kernel
//! copies every byte from the cache into the reader's buffer: on the project's VM
//! that copy ran at about 1.2 GB/s and cost 7.6 s of system time for the 9.1 GB
//! 20M-event benchmark file (`dd bs=1M`), against 0.65 s with `iflag=direct`, and a
//! replay reads its input once, so caching it only pushes the stores' files out of the
//! page cache. Smaller files, pipes and file systems without `O_DIRECT` (tmpfs) are
//! read through the page cache, as before.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc;

use anyhow::Context;

/// Files smaller than this are read through the page cache: the copy costs little,
/// and a test's or a backtest's small file may be read again soon.
const DIRECT_MIN_BYTES: u64 = 64 << 20;
/// How much one direct read asks for.
const BLOCK_BYTES: usize = 4 << 20;
/// `O_DIRECT` wants the buffer, the file offset and the length aligned to the
/// device's logical block size; a page is a multiple of every common one.
const ALIGN: usize = 4096;
/// Blocks read ahead of the replay (each `BLOCK_BYTES`).
const BLOCKS_AHEAD: usize = 2;

/// Calls `each` with the number (from 1) and the bytes of every line of `path`,
/// without its line ending (`\n` or `\r\n`). Lines are lent from the block they were
/// read into, not copied into a `String`; only a line that spans two blocks is copied.
pub fn for_each_line(
    path: &Path,
    mut each: impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut each = |n: usize, line: &[u8]| match n {
        1 => each(n, without_byte_order_mark(line)),
        _ => each(n, line),
    };
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let large_file = file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() >= DIRECT_MIN_BYTES);
    if large_file {
        if let Some(direct) = open_direct(path) {
            return direct_lines(path, direct, &mut each);
        }
    }
    buffered_lines(path, file, &mut each)
}

/// Refuses a compressed file (gzip, zstd, bzip2, xz: history exports often are), whose
/// bytes would split into random "lines", each dead-lettered as not JSON, the run
/// reported as a success. A pipe is not looked at (what is read of it would be gone).
pub fn refuse_compressed(path: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    // Looked at before it is opened: opening a pipe waits for its writer.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let mut head = [0u8; 6];
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = file
        .read(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let head = &head[..n];
    let format = [
        (&b"\x1f\x8b"[..], "gzip", "zcat"),
        (&b"\x28\xb5\x2f\xfd"[..], "zstd", "zstdcat"),
        (&b"BZh"[..], "bzip2", "bzcat"),
        (&b"\xfd7zXZ\x00"[..], "xz", "xzcat"),
    ]
    .into_iter()
    .find(|(magic, _, _)| head.starts_with(magic));
    if let Some((_, name, tool)) = format {
        anyhow::bail!(
            "{} is {name}-compressed: give it decompressed (`{tool} {} > events.jsonl`, or \
             a named pipe)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// A first line without the UTF-8 byte order mark some Windows tools write: no JSON
/// parser skips it, and the file's first event would be dead-lettered as not JSON.
pub fn without_byte_order_mark(line: &[u8]) -> &[u8] {
    line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
}

fn without_line_ending(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Through the page cache, split as the direct blocks are.
fn buffered_lines(
    path: &Path,
    file: File,
    each: &mut impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut lines = LineSplitter::default();
    loop {
        let data = reader
            .fill_buf()
            .with_context(|| format!("{}:{}: cannot read", path.display(), lines.count + 1))?;
        if data.is_empty() {
            return lines.finish(each);
        }
        let read = data.len();
        lines.feed(data, each)?;
        reader.consume(read);
    }
}

/// The file opened with `O_DIRECT`, or `None` where the system or the file system
/// does not allow it (the caller reads through the page cache instead).
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// A buffer with room for one aligned block, and where that block starts in it.
struct Block {
    buffer: Vec<u8>,
    start: usize,
    len: usize,
}

impl Block {
    fn new() -> Self {
        let buffer = vec![0u8; BLOCK_BYTES + ALIGN];
        let start = buffer.as_ptr().align_offset(ALIGN);
        Block {
            buffer,
            start,
            len: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buffer[self.start..self.start + self.len]
    }

    /// Fills the block from `file`; a block shorter than `BLOCK_BYTES` is the last.
    fn fill(&mut self, file: &mut File) -> std::io::Result<()> {
        self.len = 0;
        let area = &mut self.buffer[self.start..self.start + BLOCK_BYTES];
        while self.len < BLOCK_BYTES {
            match file.read(&mut area[self.len..]) {
                Ok(0) => break,
                // A direct read ends short only at the end of the file; reading on
                // from an unaligned offset would fail.
                Ok(n) if n % ALIGN != 0 => {
                    self.len += n;
                    break;
                }
                Ok(n) => self.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn is_last(&self) -> bool {
        self.len < BLOCK_BYTES
    }
}

/// Direct reads, by a thread that stays up to `BLOCKS_AHEAD` blocks ahead; blocks go
/// back to it once their lines are handled, so memory stays at a few blocks.
fn direct_lines(
    path: &Path,
    mut file: File,
    each: &mut impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // The first block is read here: a file system that accepts O_DIRECT at open but
    // not on read (EINVAL) is read through the page cache instead, from the start.
    let mut first = Block::new();
    if first.fill(&mut file).is_err() {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        return buffered_lines(path, file, each);
    }
    let mut lines = LineSplitter::default();
    if first.is_last() {
        lines.feed(first.data(), each)?;
        return lines.finish(each);
    }
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<std::io::Result<Block>>(BLOCKS_AHEAD);
        let (empty_tx, empty_rx) = mpsc::channel::<Block>();
        scope.spawn(move || loop {
            let mut block = empty_rx.try_recv().unwrap_or_else(|_| Block::new());
            let filled = block.fill(&mut file).map(|()| block);
            let last = filled.as_ref().map_or(true, Block::is_last);
            // A closed channel means the replay stopped (an error): stop reading.
            if full_tx.send(filled).is_err() || last {
                return;
            }
        });
        lines.feed(first.data(), each)?;
        let _ = empty_tx.send(first);
        for block in full_rx {
            let block = block.with_context(|| format!("{}: cannot read", path.display()))?;
            lines.feed(block.data(), each)?;
            let _ = empty_tx.send(block);
        }
        lines.finish(each)
    })
}

/// Splits a stream of blocks into lines, carrying a line that spans two blocks.
#[derive(Default)]
struct LineSplitter {
    carry: Vec<u8>,
    /// Lines handed out so far: the number of the last one.
    count: usize,
}

impl LineSplitter {
    fn feed(
        &mut self,
        data: &[u8],
        each: &mut impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            self.count += 1;
            if self.carry.is_empty() {
                each(self.count, without_line_ending(&data[start..end]))?;
            } else {
                self.carry.extend_from_slice(&data[start..end]);
                each(self.count, without_line_ending(&self.carry))?;
                self.carry.clear();
            }
            start = end + 1;
        }
        self.carry.extend_from_slice(&data[start..]);
        Ok(())
    }

    /// The last line, if the input does not end with a line ending.
    fn finish(
        &mut self,
        each: &mut impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.carry.is_empty() {
            return Ok(());
        }
        self.count += 1;
        let line = std::mem::take(&mut self.carry);
        each(self.count, without_line_ending(&line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip or zstd file is refused by name, with the way out; JSON lines pass.
    #[test]
    fn compressed_input_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            path
        };
        let gz = write("events.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00");
        let error = refuse_compressed(&gz).expect_err("gzip").to_string();
        assert!(
            error.contains("events.jsonl.gz is gzip-compressed") && error.contains("zcat"),
            "{error}"
        );
        let zst = write("events.jsonl.zst", b"\x28\xb5\x2f\xfd\x04\x00");
        assert!(refuse_compressed(&zst).is_err());
        for plain in [&b"{\"event_id\":\"e1\"}\n"[..], b"", b"\xEF\xBB\xBF{}"] {
            refuse_compressed(&write("plain.jsonl", plain)).expect("JSON lines pass");
        }
    }

    fn lines_of(path: &Path) -> Vec<(usize, Vec<u8>)> {
        let mut lines = Vec::new();
        for_each_line(path, |n, line| {
            lines.push((n, line.to_vec()));
            Ok(())
        })
        .expect("lines");
        lines
    }

    #[test]
    fn a_file_and_a_pipe_give_the_same_lines() {
        let text: &[u8] = b"a\r\nb\n\n{\"c\": 1}";
        let want: Vec<(usize, Vec<u8>)> = vec![
            (1, b"a".to_vec()),
            (2, b"b".to_vec()),
            (3, b"".to_vec()),
            (4, b"{\"c\": 1}".to_vec()),
        ];
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("events.jsonl");
        std::fs::write(&file, text).expect("write");
        assert_eq!(lines_of(&file), want);
        let fifo = dir.path().join("events.pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.expect("mkfifo").success());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, text).expect("write pipe"))
        };
        assert_eq!(lines_of(&fifo), want);
        writer.join().expect("writer");
        // An empty file has no lines.
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, b"").expect("write");
        assert!(lines_of(&empty).is_empty());
    }

    /// Lines of every length, some across block boundaries, some ending in `\r\n`, no
    /// line ending at the very end.
    fn sample_lines(total: usize) -> (Vec<u8>, Vec<(usize, Vec<u8>)>) {
        let mut text = Vec::new();
        let mut want = Vec::new();
        let mut n = 0;
        while text.len() < total {
            n += 1;
            let line: Vec<u8> =
                format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(n * 7919 % 3001)).into_bytes();
            text.extend_from_slice(&line);
            text.extend_from_slice(if n % 5 == 0 { b"\r\n" } else { b"\n" });
            want.push((n, line));
        }
        text.extend_from_slice(b"last");
        want.push((n + 1, b"last".to_vec()));
        (text, want)
    }

    /// A temp dir beside the test binary: on the build's disk, which takes `O_DIRECT`
    /// where the system temp dir may be a tmpfs, which does not.
    fn disk_temp_dir() -> tempfile::TempDir {
        let exe = std::env::current_exe().expect("test binary path");
        let beside = exe.parent().expect("test binary dir");
        tempfile::tempdir_in(beside).expect("temp dir beside the test binary")
    }

    /// A file large enough to be read directly (where the file system allows it)
    /// gives the same lines as reading it through the page cache, line for line.
    #[test]
    fn a_large_file_read_directly_gives_every_line_once() {
        let (text, want) = sample_lines(DIRECT_MIN_BYTES as usize + 3 * BLOCK_BYTES + 12345);
        let dir = disk_temp_dir();
        let file = dir.path().join("large.jsonl");
        std::fs::write(&file, &text).expect("write");
        // Read directly for sure, then as `for_each_line` picks.
        let direct = open_direct(&file).expect("the build's file system takes O_DIRECT");
        let mut got = Vec::new();
        direct_lines(&file, direct, &mut |n, line| {
            got.push((n, line.to_vec()));
            Ok(())
        })
        .expect("direct");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "direct lines differ");
        assert!(lines_of(&file) == want, "lines differ");
        let mut buffered = Vec::new();
        buffered_lines(&file, File::open(&file).expect("open"), &mut |n, line| {
            buffered.push((n, line.to_vec()));
            Ok(())
        })
        .expect("buffered");
        assert!(buffered == want, "buffered lines differ");
    }

    /// The splitter over blocks of every size, including one byte at a time and a
    /// `\r\n` split between two blocks.
    #[test]
    fn lines_split_across_blocks_come_out_whole() {
        let (text, want) = sample_lines(40_000);
        for size in [1, 2, 3, 7, 4096, 10_000, text.len()] {
            let mut got = Vec::new();
            let mut splitter = LineSplitter::default();
            let mut each = |n: usize, line: &[u8]| {
                got.push((n, line.to_vec()));
                Ok(())
            };
            for chunk in text.chunks(size) {
                splitter.feed(chunk, &mut each).expect("feed");
            }
            splitter.finish(&mut each).expect("finish");
            assert!(got == want, "block size {size}");
        }
    }

    /// An error from the line handler stops the read and is returned, also when the
    /// reading thread is ahead.
    #[test]
    fn a_handler_error_stops_a_direct_read() {
        let (text, _) = sample_lines(DIRECT_MIN_BYTES as usize + 2 * BLOCK_BYTES);
        let dir = disk_temp_dir();
        let file = dir.path().join("large.jsonl");
        std::fs::write(&file, &text).expect("write");
        let mut seen = 0;
        let err = for_each_line(&file, |n, _| {
            seen = n;
            match n {
                10_000.. => anyhow::bail!("stop at {n}"),
                _ => Ok(()),
            }
        })
        .expect_err("stops");
        assert_eq!(err.to_string(), "stop at 10000");
        assert_eq!(seen, 10_000);
    }
}
