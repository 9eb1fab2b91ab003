//! Where undelivered usage events wait: in memory, or — with `usage_hook.spool_dir` — in an
//! append-only on-disk log that survives webhook outages of any length (up to `spool_max_bytes`),
//! restarts and crashes (losing at most the last `spool_fsync` interval).
//!
//! Disk layout: `seg-<seq>.log` files of one JSON event per line, and `cursor`, which records how
//! far delivery has been acknowledged (and the end of the batch in flight, so that after a crash
//! the same batch is re-sent whole, under the same idempotency key). Fully delivered segments are
//! deleted. A new segment is started on every open, so a line torn by a crash is never appended to.
//!
//! What a delivered batch costs the disk, at hundreds of batches a second: the intake's lines go
//! out in one `write` per hand-over (a crash still tears at most the last line), the cursor is
//! one fixed-width record overwritten in place (not a file created, synced and renamed twice per
//! batch), and lines this process wrote are not parsed again when read back. The cursor is
//! synced with the events, every `spool_fsync`, not at every batch: a process that dies (panic,
//! SIGKILL, OOM) leaves its writes in the page cache, so the batch in flight is re-sent whole
//! under its key; only a power loss or kernel crash can take the cursor back as far as one
//! interval, re-sending what was delivered in it (maybe cut into other batches, under other
//! keys: receivers deduplicate by `event_id`) — the same interval whose appended events it can
//! lose. Before a delivered segment is deleted the cursor past it is synced.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Segments rotate at this size so delivered data can be deleted while the spool is in use.
const SEGMENT_BYTES: u64 = 64 << 20;

/// The cursor record's length: four numbers of up to 20 digits, their spaces and a newline. Every
/// write is this long, so a shorter record never leaves a longer one's tail behind; it lies in
/// the file's first 512-byte sector, which a disk writes whole.
const CURSOR_LEN: usize = 4 * 20 + 3 + 1;

/// A write buffer larger than this is not kept between hand-overs.
const KEEP_BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool is full ({0} bytes pending)")]
    Full(u64),
    #[error("spool I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The write that held this line with others failed.
    #[error("spool write: {0}")]
    Lost(std::sync::Arc<SpoolError>),
}

/// A position in the disk log: segment and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    seq: u64,
    offset: u64,
}

/// Events read for one delivery attempt, and where the spool stands after them.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The events' lines, each ending in a newline: one buffer, not a string per event.
    text: String,
    /// Where each line ends in `text` (at its newline), found once while reading: the body, the
    /// batch key and the logs each walk the lines again.
    ends: Vec<usize>,
    end: End,
}

impl Batch {
    fn new(end: End) -> Batch {
        Batch {
            text: String::new(),
            ends: Vec::new(),
            end,
        }
    }

    fn push(&mut self, line: &str) {
        self.text.push_str(line);
        self.ends.push(self.text.len());
        self.text.push('\n');
    }

    /// How many events.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The events' lines, in order, without their newlines.
    pub(crate) fn lines(&self) -> impl Iterator<Item = &str> {
        let mut at = 0;
        self.ends.iter().filter_map(move |&end| {
            let line = self.text.get(at..end);
            at = end + 1;
            line
        })
    }

    /// The events' lines, each ending in a newline.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

#[derive(Debug, Clone, Copy)]
enum End {
    Memory(usize),
    Disk(Pos),
}

pub(crate) enum Spool {
    Memory(MemorySpool),
    Disk(DiskSpool),
}

impl Spool {
    pub(crate) fn memory(max_bytes: u64) -> Spool {
        Spool::Memory(MemorySpool {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes,
        })
    }

    pub(crate) fn open_disk(
        dir: &Path,
        max_bytes: u64,
        fsync_every: Duration,
    ) -> Result<Spool, SpoolError> {
        DiskSpool::open(dir, max_bytes, fsync_every).map(Spool::Disk)
    }

    /// Appends every line of `blocks` (newline-terminated lines, and how many; on disk with one
    /// write for all, a block that fits the bound copied whole), returning how many were kept and
    /// the lines that were not, and why: refused by the bound, or lost with a failed write.
    pub(crate) fn append_all<'a>(
        &mut self,
        blocks: impl Iterator<Item = (&'a str, usize)>,
    ) -> (usize, Vec<(String, SpoolError)>) {
        let mut refused = Vec::new();
        let mut added = 0;
        for (block, lines) in blocks {
            if let Spool::Disk(d) = self {
                if d.append_block(block) {
                    added += lines;
                    continue;
                }
            }
            for line in block.lines() {
                let res = match self {
                    Spool::Memory(m) => m.append(line),
                    Spool::Disk(d) => d.append(line),
                };
                match res {
                    Ok(()) => added += 1,
                    Err(e) => refused.push((line.to_string(), e)),
                }
            }
        }
        if let Spool::Disk(d) = self {
            if let Err((e, lost)) = d.flush() {
                let e = std::sync::Arc::new(e);
                added = added.saturating_sub(lost.len());
                for line in lost {
                    refused.push((line, SpoolError::Lost(e.clone())));
                }
            }
        }
        (added, refused)
    }

    #[cfg(test)]
    pub(crate) fn append(&mut self, line: &str) -> Result<(), SpoolError> {
        let block = format!("{line}\n");
        match self
            .append_all(std::iter::once((block.as_str(), 1)))
            .1
            .pop()
        {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Up to `max` of the oldest undelivered events (without removing them).
    pub(crate) fn peek(&mut self, max: usize) -> Result<Batch, SpoolError> {
        match self {
            Spool::Memory(m) => Ok(m.peek(max)),
            Spool::Disk(d) => d.peek(max),
        }
    }

    /// Whether committing `batch` moves delivery on. An empty batch can: past lines of an earlier
    /// run's segment that were unreadable and skipped.
    pub(crate) fn moves_on(&self, batch: &Batch) -> bool {
        match (self, batch.end) {
            (Spool::Disk(d), End::Disk(end)) => end > d.read,
            (Spool::Memory(_), End::Memory(n)) => n > 0,
            _ => false,
        }
    }

    /// Records that a batch is being sent (disk: persisted, so a restart re-sends it whole).
    pub(crate) fn begin(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        match (self, batch.end) {
            (Spool::Disk(d), End::Disk(end)) => d.write_cursor(Some(end)),
            _ => Ok(()),
        }
    }

    /// The batch was acknowledged (or dead-lettered): forget it.
    pub(crate) fn commit(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        match (self, batch.end) {
            (Spool::Memory(m), End::Memory(n)) => {
                m.commit(n);
                Ok(())
            }
            (Spool::Disk(d), End::Disk(end)) => d.commit(end),
            _ => Ok(()),
        }
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        match self {
            Spool::Memory(m) => m.bytes,
            Spool::Disk(d) => d.pending_bytes(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Makes appended events durable now (disk), e.g. on the fsync interval or at shutdown.
    pub(crate) fn sync(&mut self) -> Result<(), SpoolError> {
        match self {
            Spool::Memory(_) => Ok(()),
            Spool::Disk(d) => d.sync(),
        }
    }

    pub(crate) fn sync_if_due(&mut self) -> Result<(), SpoolError> {
        match self {
            Spool::Memory(_) => Ok(()),
            Spool::Disk(d)
                if (d.dirty || d.cursor_dirty) && d.last_sync.elapsed() >= d.fsync_every =>
            {
                d.sync()
            }
            Spool::Disk(_) => Ok(()),
        }
    }

    /// Where permanently rejected events are written (disk spools only).
    pub(crate) fn dead_letter(&mut self, batch: &Batch) -> Result<Option<PathBuf>, SpoolError> {
        match self {
            Spool::Memory(_) => Ok(None),
            Spool::Disk(d) => {
                let path = d.dir.join("dead-letter.jsonl");
                let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
                f.write_all(batch.text().as_bytes())?;
                f.sync_data()?;
                Ok(Some(path))
            }
        }
    }
}

pub(crate) struct MemorySpool {
    lines: VecDeque<String>,
    bytes: u64,
    max_bytes: u64,
}

impl MemorySpool {
    fn append(&mut self, line: &str) -> Result<(), SpoolError> {
        let len = line.len() as u64 + 1;
        if self.bytes + len > self.max_bytes {
            return Err(SpoolError::Full(self.bytes));
        }
        self.bytes += len;
        self.lines.push_back(line.to_string());
        Ok(())
    }

    fn peek(&self, max: usize) -> Batch {
        let mut batch = Batch::new(End::Memory(0));
        for line in self.lines.iter().take(max) {
            batch.push(line);
        }
        batch.end = End::Memory(batch.len());
        batch
    }

    fn commit(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(l) = self.lines.pop_front() {
                self.bytes -= l.len() as u64 + 1;
            }
        }
    }
}

pub(crate) struct DiskSpool {
    dir: PathBuf,
    /// Existing segments, oldest first, with their sizes.
    segments: VecDeque<(u64, u64)>,
    writer: File,
    /// Delivered up to here.
    read: Pos,
    /// End of the batch that was in flight when the process last stopped (re-sent whole first).
    replay_end: Option<Pos>,
    max_bytes: u64,
    fsync_every: Duration,
    last_sync: Instant,
    dirty: bool,
    /// Lines appended since the last `flush`, written by it in one go.
    out: Vec<u8>,
    /// The `cursor` file, overwritten in place.
    cursor: File,
    /// The cursor was written since it was last made durable.
    cursor_dirty: bool,
    /// The first segment this process wrote: lines from earlier ones (a previous run's, maybe torn
    /// or damaged) are checked before they are sent; this run's are whole by construction.
    own_from: u64,
    /// The segment being delivered from, kept open between batches.
    reader: Option<(u64, File)>,
    /// What `peek` reads into, kept between batches.
    read_buf: Vec<u8>,
}

/// Whether `dir` can hold the spool, without creating anything that would stay: an existing
/// directory must take a new file; a missing one must be creatable (its nearest existing
/// ancestor a directory that takes a new file). `llmproxy check` runs this, so that a spool
/// directory that is a file, or sits where the proxy may not write, fails there and not at
/// startup.
pub(crate) fn check_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    let existing = loop {
        match fs::metadata(at) {
            Ok(m) if m.is_dir() => break at,
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match at.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                    _ => break Path::new("."),
                }
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    };
    let probe = existing.join(format!(".llmproxy-check-{}", std::process::id()));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot write in {}: {e}", existing.display())),
    }
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:016}.log"))
}

impl DiskSpool {
    fn open(dir: &Path, max_bytes: u64, fsync_every: Duration) -> Result<DiskSpool, SpoolError> {
        fs::create_dir_all(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        let (read, replay_end) = read_cursor(dir)?;
        let mut read = read.unwrap_or(Pos {
            seq: seqs.first().copied().unwrap_or(1),
            offset: 0,
        });
        // Segments before the cursor were delivered but not yet deleted.
        for s in seqs.iter().filter(|s| **s < read.seq) {
            let _ = fs::remove_file(seg_path(dir, *s));
        }
        seqs.retain(|s| *s >= read.seq);
        if seqs.first().is_some_and(|s| *s > read.seq) || seqs.is_empty() {
            read = Pos {
                seq: seqs.first().copied().unwrap_or(read.seq),
                offset: 0,
            };
        }
        let mut segments = VecDeque::new();
        for s in &seqs {
            let len = fs::metadata(seg_path(dir, *s))?.len();
            segments.push_back((*s, len));
        }
        let next = seqs.last().map_or(read.seq.max(1), |s| s + 1);
        let writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(dir, next))?;
        segments.push_back((next, 0));
        // A cursor file of an older version was replaced through this name.
        let _ = fs::remove_file(dir.join("cursor.tmp"));
        let cursor = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("cursor"))?;
        sync_dir(dir);
        let spool = DiskSpool {
            dir: dir.to_path_buf(),
            segments,
            writer,
            read,
            replay_end,
            max_bytes,
            fsync_every,
            last_sync: Instant::now(),
            dirty: false,
            out: Vec::new(),
            cursor,
            cursor_dirty: false,
            own_from: next,
            reader: None,
            read_buf: Vec::new(),
        };
        Ok(spool)
    }

    fn writer_seq(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.0)
    }

    fn pending_bytes(&self) -> u64 {
        let total: u64 = self.segments.iter().map(|s| s.1).sum();
        let done = match self.segments.front() {
            Some((seq, _)) if *seq == self.read.seq => self.read.offset,
            _ => 0,
        };
        (total + self.out.len() as u64).saturating_sub(done)
    }

    /// Buffers newline-terminated lines for `flush` if all of them fit the bound.
    fn append_block(&mut self, block: &str) -> bool {
        let fits = self.pending_bytes() + block.len() as u64 <= self.max_bytes;
        if fits && block.ends_with('\n') {
            self.out.extend_from_slice(block.as_bytes());
            return true;
        }
        false
    }

    /// Buffers a line for `flush`, within the bound.
    fn append(&mut self, line: &str) -> Result<(), SpoolError> {
        let len = line.len() as u64 + 1;
        let pending = self.pending_bytes();
        if pending + len > self.max_bytes {
            return Err(SpoolError::Full(pending));
        }
        self.out.extend_from_slice(line.as_bytes());
        self.out.push(b'\n');
        Ok(())
    }

    /// Writes the buffered lines in one write (a crash tears at most the last line, which replay
    /// skips), then rotates a full segment and syncs when the interval is due. A failed write
    /// loses the buffered lines: they are handed back to be counted and logged. A failed rotation
    /// or sync loses nothing (the lines are in the file) and is only logged.
    fn flush(&mut self) -> Result<(), (SpoolError, Vec<String>)> {
        if self.out.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.writer.write_all(&self.out) {
            // Whatever part of it did land is cut off again, so that the file ends where the
            // segment's size says and the next write starts a line there.
            if let Some(&(_, size)) = self.segments.back() {
                let _ = self.writer.set_len(size);
            }
            let lost = String::from_utf8_lossy(&self.out)
                .lines()
                .map(str::to_string)
                .collect();
            self.out.clear();
            return Err((e.into(), lost));
        }
        if let Some(last) = self.segments.back_mut() {
            last.1 += self.out.len() as u64;
        }
        self.out.clear();
        if self.out.capacity() > KEEP_BUF {
            self.out = Vec::new();
        }
        self.dirty = true;
        if self.segments.back().is_some_and(|s| s.1 >= SEGMENT_BYTES) {
            if let Err(e) = self.rotate() {
                log::error!("usage spool: cannot start a new segment ({e}); the current one grows");
            }
        }
        if self.last_sync.elapsed() >= self.fsync_every {
            if let Err(e) = self.sync() {
                log::error!("usage spool: fsync failed: {e}");
            }
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let next = self.writer_seq() + 1;
        self.writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(&self.dir, next))?;
        self.segments.push_back((next, 0));
        sync_dir(&self.dir);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        if self.dirty {
            self.writer.sync_data()?;
            self.dirty = false;
        }
        if self.cursor_dirty {
            self.cursor.sync_data()?;
            self.cursor_dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn peek(&mut self, max: usize) -> Result<Batch, SpoolError> {
        let limit = self.replay_end;
        let mut batch = Batch::new(End::Disk(self.read));
        let mut pos = self.read;
        let writer = self.writer_seq();
        let mut buf = std::mem::take(&mut self.read_buf);
        let segments: Vec<(u64, u64)> = self
            .segments
            .iter()
            .copied()
            .filter(|s| s.0 >= pos.seq)
            .collect();
        'segments: for (seq, size) in segments {
            if seq > pos.seq {
                pos = Pos { seq, offset: 0 };
            }
            if pos.offset >= size {
                continue;
            }
            let file = match self.reader.take() {
                Some((s, f)) if s == seq => f,
                _ => File::open(seg_path(&self.dir, seq))?,
            };
            // `buf[lo..hi]` holds the segment's bytes from `pos.offset` on. The buffer keeps its
            // length between batches, so it is zeroed once, not at every read.
            if buf.len() < READ_BUF {
                buf.resize(READ_BUF, 0);
            }
            let (mut lo, mut hi) = (0, 0);
            let result = loop {
                if limit.is_some_and(|l| pos >= l) || (limit.is_none() && batch.len() >= max) {
                    break Ok(true);
                }
                let Some(nl) = memchr::memchr(b'\n', &buf[lo..hi]) else {
                    let have = pos.offset + (hi - lo) as u64;
                    if have >= size {
                        // What is left has no newline: a line torn by a crash (only possible in
                        // an old segment; skip the rest) or one being written (wait for it).
                        if lo < hi && seq != writer {
                            log::warn!("usage spool: skipping a torn line in segment {seq}");
                            pos.offset = size;
                        }
                        break Ok(false);
                    }
                    // The start of a line moves to the front; a line longer than the buffer
                    // doubles it.
                    buf.copy_within(lo..hi, 0);
                    hi -= lo;
                    lo = 0;
                    if hi == buf.len() {
                        buf.resize(buf.len() * 2, 0);
                    }
                    let room = &mut buf[hi..];
                    let want =
                        usize::try_from(size - have).map_or(room.len(), |n| n.min(room.len()));
                    match read_at(&file, &mut room[..want], have) {
                        Ok(0) => break Ok(false),
                        Ok(n) => {
                            hi += n;
                            batch.text.reserve(n);
                            continue;
                        }
                        Err(e) => break Err(e),
                    }
                };
                let line = &buf[lo..lo + nl];
                lo += nl + 1;
                pos.offset += nl as u64 + 1;
                // Bytes that are not UTF-8 can only be damage in an earlier run's segment (this
                // run writes `str`s): skipped like any unreadable line, not an error that would
                // stop delivery at that line for good.
                match std::str::from_utf8(line).map(str::trim_end) {
                    Ok(text)
                        if seq >= self.own_from
                            || serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() =>
                    {
                        batch.push(text)
                    }
                    _ => log::warn!("usage spool: skipping an unreadable line in segment {seq}"),
                }
            };
            self.reader = Some((seq, file));
            match result {
                Ok(true) => break 'segments,
                Ok(false) => {}
                Err(e) => {
                    self.read_buf = buf;
                    return Err(e.into());
                }
            }
        }
        if buf.len() <= KEEP_BUF {
            self.read_buf = buf;
        }
        batch.end = End::Disk(pos);
        Ok(batch)
    }

    fn commit(&mut self, end: Pos) -> Result<(), SpoolError> {
        self.read = end;
        if self.replay_end.is_some_and(|r| end >= r) {
            self.replay_end = None;
        }
        self.write_cursor(None)?;
        // Delete segments that are entirely delivered (never the one being written).
        let writer = self.writer_seq();
        while let Some(&(seq, size)) = self.segments.front() {
            let done = seq < self.read.seq || (seq == self.read.seq && self.read.offset >= size);
            if seq == writer || !done {
                break;
            }
            // The cursor past it must be durable before the segment goes.
            if self.cursor_dirty {
                self.cursor.sync_data()?;
                self.cursor_dirty = false;
            }
            if self.reader.as_ref().is_some_and(|r| r.0 == seq) {
                // An open descriptor would keep the deleted file's blocks.
                self.reader = None;
            }
            let _ = fs::remove_file(seg_path(&self.dir, seq));
            self.segments.pop_front();
            if self.read.seq == seq {
                if let Some(&(next, _)) = self.segments.front() {
                    self.read = Pos {
                        seq: next,
                        offset: 0,
                    };
                }
            }
        }
        Ok(())
    }

    /// `cursor`: "seq offset" of the delivered position, plus "seq offset" of the batch in flight,
    /// padded with spaces to `CURSOR_LEN` and written over the last record (synced by `sync`).
    fn write_cursor(&mut self, inflight: Option<Pos>) -> Result<(), SpoolError> {
        let mut record = [b' '; CURSOR_LEN];
        let mut text = &mut record[..CURSOR_LEN - 1];
        // Four u64s and three spaces fit in CURSOR_LEN - 1 bytes, so these writes cannot fail.
        let _ = write!(text, "{} {}", self.read.seq, self.read.offset);
        if let Some(p) = inflight {
            let _ = write!(text, " {} {}", p.seq, p.offset);
        }
        record[CURSOR_LEN - 1] = b'\n';
        self.cursor.write_all_at(&record, 0)?;
        self.cursor_dirty = true;
        Ok(())
    }
}

fn read_cursor(dir: &Path) -> Result<(Option<Pos>, Option<Pos>), SpoolError> {
    let text = match fs::read_to_string(dir.join("cursor")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
        Err(e) => return Err(e.into()),
    };
    let nums: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let pos = |i: usize| {
        nums.get(i)
            .zip(nums.get(i + 1))
            .map(|(&seq, &offset)| Pos { seq, offset })
    };
    Ok((pos(0), pos(2)))
}

/// A batch of 100 events is about 40 KB: read in one `pread`, not five of `BufReader`'s default
/// 8 KiB (nor an open, a seek and a close per batch: the segment being read stays open).
const READ_BUF: usize = 64 << 10;

fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    loop {
        match file.read_at(buf, at) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests;
