//! The request log's disk spill: rows the database cannot take now are
//! appended to files in `store.spill_dir` and replayed, oldest first, once
//! it can.
//!
//! The spill is a directory of segments, `spill-NNNNNNNNNNNNNNNNNNNN.log`,
//! each a run of records:
//!
//! ```text
//! "GSP1" | payload length: u32 LE | CRC-32C of the payload: u32 LE | payload
//! ```
//!
//! A payload is one batch of rows as a JSON array. A record is written
//! with one `write(2)` to the newest segment; a segment past its size is
//! closed and a new one begun. Replay reads the oldest segment from the
//! position kept in `cursor`, writes each record's rows to the database,
//! then moves the cursor past it; a segment read to its end is deleted.
//! Delivery is at least once: a crash between a replayed insert and the
//! cursor's update replays that one batch again.
//!
//! One process owns a spill directory at a time: it holds an exclusive
//! lock on `DIR/lock` while it runs, and a second gale given the same
//! directory refuses to start (two nodes sharing one spill would replay
//! each other's rows).
//!
//! A record that is cut short, fails its checksum or does not parse (a
//! write torn by a crash, a damaged disk) ends its segment: it and what
//! follows in that segment are skipped and counted in
//! `gale_spill_torn_records_total`. A segment that cannot be read at all
//! (an I/O error, three reads in a row) is renamed `….log.unreadable`,
//! kept, counted in `gale_spill_unreadable_segments_total`, and replay
//! goes on with the next.
//!
//! Durability: every record reaches the kernel when it is written, so
//! killing gale loses nothing already spilled; segments are `fsync`ed when
//! closed, at least once a second while written to, and at shutdown, so a
//! machine that loses power loses at most the last second.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::RequestRecord;
use crate::metrics::StoreMetrics;
use gale_engine::protocol::ErrorCode;

const MAGIC: [u8; 4] = *b"GSP1";
const HEADER: u64 = 12;
/// No batch comes near this; a longer length field means a damaged header.
const MAX_PAYLOAD: u64 = 64 << 20;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const CURSOR: &str = "cursor";
const LOCK: &str = "lock";

/// Why the spill could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The directory could not be created, read or locked.
    #[error("cannot open the spill directory store.spill_dir = {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// The OS error.
        source: io::Error,
    },
    /// Another process holds the directory.
    #[error(
        "the spill directory store.spill_dir = {dir} is in use by another gale process{owner}; \
         give each server its own (GALE_STORE__SPILL_DIR=…), or start it in another directory"
    )]
    InUse {
        /// The directory.
        dir: String,
        /// " (pid N)" when the owner wrote it.
        owner: String,
    },
}

/// Waits, at most `timeout`, until no process holds the spill directory
/// `dir` (a takeover's new process waits for the old one to let go of
/// it); true once it is free (or does not exist yet).
pub async fn wait_until_free(dir: &Path, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let lock = match OpenOptions::new().read(true).open(dir.join(LOCK)) {
            Ok(lock) => lock,
            Err(_) => return true,
        };
        match lock.try_lock() {
            // Dropping the file lets go of it again.
            Ok(()) => return true,
            Err(fs::TryLockError::Error(_)) => return true,
            Err(fs::TryLockError::WouldBlock) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Where replay stands after a record: its segment and the offset just
/// past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    seq: u64,
    offset: u64,
}

/// The spill: files and metrics, shared by the writers, the overflow task
/// and the replayer.
#[derive(Debug)]
pub struct Spill {
    files: Mutex<Files>,
    /// The exclusive lock on the directory, held while the spill lives.
    _lock: File,
    /// Set when an insert failed for a reason other than the rows (the
    /// database down or unreachable); while set, writers spill without
    /// trying, and the replayer probes until an insert passes.
    down: AtomicBool,
    metrics: Arc<StoreMetrics>,
}

#[derive(Debug)]
struct Files {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Segments not yet wholly replayed, oldest first: (seq, length).
    segments: VecDeque<(u64, u64)>,
    /// The newest segment, open for appending; `None` until the next
    /// append begins a segment.
    out: Option<File>,
    next_seq: u64,
    /// Replay's offset in the oldest segment.
    read_offset: u64,
    /// Bytes in the segments not yet replayed.
    pending: u64,
    /// Written since the last `fsync`.
    unsynced: bool,
    /// Reads of the oldest segment that failed in a row.
    failures: u32,
}

/// Reads of one segment that may fail in a row (an I/O error, not a torn
/// record) before it is set aside: a passing error (out of file
/// descriptors) is waited out; a segment that cannot be read does not
/// stop replay of the ones after it.
const UNREADABLE_TRIES: u32 = 3;

/// What a replay read found besides its batch.
#[derive(Default)]
struct Skipped {
    /// Torn or corrupt records (each with the rest of its segment).
    torn: u64,
    /// Segments set aside as unreadable.
    unreadable: u64,
}

/// One row as the spill keeps it.
#[derive(Serialize)]
struct RowOut<'a> {
    c: &'a Uuid,
    city: &'a str,
    ok: bool,
    t: Option<f64>,
    e: Option<&'a str>,
    l: u32,
    at: &'a DateTime<Utc>,
}

#[derive(Deserialize)]
struct RowIn {
    c: Uuid,
    city: String,
    ok: bool,
    t: Option<f64>,
    e: Option<String>,
    l: u32,
    at: DateTime<Utc>,
}

impl From<RowIn> for RequestRecord {
    fn from(r: RowIn) -> Self {
        RequestRecord {
            client_id: r.c,
            city: r.city,
            ok: r.ok,
            temperature: r.t,
            // Only gale writes the spill and only known codes; anything
            // else would have failed the checksum.
            error: r
                .e
                .map(|e| ErrorCode::from_wire(&e).map_or("internal_error", ErrorCode::as_str)),
            latency_ms: r.l,
            created_at: r.at,
        }
    }
}

/// Encodes rows as one record's payload.
pub(super) fn encode(rows: &[RequestRecord]) -> Vec<u8> {
    let out: Vec<RowOut<'_>> = rows
        .iter()
        .map(|r| RowOut {
            c: &r.client_id,
            city: &r.city,
            ok: r.ok,
            t: r.temperature,
            e: r.error,
            l: r.latency_ms,
            at: &r.created_at,
        })
        .collect();
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// Past any sequence number a spill reaches (a segment is at least
/// 64 KiB): a cursor beyond it is damaged.
const MAX_SEQ: u64 = 1 << 62;

fn segment_name(seq: u64) -> String {
    format!("spill-{seq:020}.log")
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("spill-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

impl Spill {
    /// Opens the spill in `dir` (created if missing) and locks it,
    /// holding at most `max_bytes` not yet replayed. Segments left by an
    /// earlier run are kept for replay; those before the cursor are
    /// deleted.
    ///
    /// # Errors
    /// When the directory cannot be created, read or locked, or another
    /// process holds it.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Spill, SpillError> {
        let err = |source| SpillError::Io {
            dir: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK))
            .map_err(err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let owner = fs::read_to_string(dir.join(LOCK))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(SpillError::InUse {
                    dir: dir.display().to_string(),
                    owner,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        let (mut cursor_seq, mut cursor_offset) = fs::read_to_string(dir.join(CURSOR))
            .ok()
            .and_then(|s| {
                let (a, b) = s.trim().split_once(' ')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or((0, 0));
        let mut found = Vec::new();
        match fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(err)?;
                    let name = entry.file_name();
                    let Some(seq) = name.to_str().and_then(segment_seq) else {
                        continue;
                    };
                    let len = entry.metadata().map_err(err)?.len();
                    found.push((seq, len));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        found.sort_unstable();
        // The cursor names the oldest segment not yet replayed, or the
        // next one to be written: never more than one past the newest. One
        // that does (a damaged file) is not trusted, since deleting every
        // segment before it would lose their rows: they are all replayed
        // from their start instead, and rows already written may be
        // written twice.
        let newest = found.last().map_or(0, |&(s, _)| s);
        if (!found.is_empty() && cursor_seq > newest.saturating_add(1)) || cursor_seq >= MAX_SEQ {
            tracing::error!(
                dir = %dir.display(),
                cursor = cursor_seq,
                newest,
                "request log: the spill's cursor is past every segment; replaying them all from \
                 their start (rows replayed before may be written twice)"
            );
            (cursor_seq, cursor_offset) = (0, 0);
        }
        found.retain(|&(seq, _)| {
            if seq < cursor_seq {
                // Replayed before the last stop.
                let _ = fs::remove_file(dir.join(segment_name(seq)));
            }
            seq >= cursor_seq
        });
        let read_offset = match found.first() {
            Some(&(seq, len)) if seq == cursor_seq => cursor_offset.min(len),
            _ => 0,
        };
        let next_seq = newest.max(cursor_seq) + 1;
        let pending = found.iter().map(|&(_, len)| len).sum::<u64>() - read_offset;
        metrics.spill_bytes.set(pending as i64);
        if pending > 0 {
            tracing::info!(
                dir = %dir.display(),
                bytes = pending,
                "request log: rows spilled by an earlier run will be replayed"
            );
        }
        Ok(Spill {
            _lock: lock,
            files: Mutex::new(Files {
                dir: dir.to_owned(),
                max_bytes,
                segment_bytes: (max_bytes / 8).clamp(64 << 10, 64 << 20),
                segments: found.into(),
                out: None,
                next_seq,
                read_offset,
                pending,
                unsynced: false,
                failures: 0,
            }),
            down: AtomicBool::new(false),
            metrics,
        })
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        // A panic while holding the lock leaves plain numbers behind; the
        // files stay consistent with them or are caught by the checksums.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the database is taken to be down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Marks the database down (an insert failed) or up (one passed).
    pub fn set_down(&self, down: bool) {
        if self.down.swap(down, Ordering::AcqRel) != down {
            if down {
                tracing::warn!(
                    "request log: the database is unavailable; rows go to the disk spill"
                );
            } else {
                tracing::info!("request log: the database is back; replaying the spill");
            }
        }
    }

    /// Bytes not yet replayed.
    pub fn pending_bytes(&self) -> u64 {
        self.files().pending
    }

    /// Appends `rows` as one record (blocking file I/O: call it where
    /// blocking is allowed). Counts them as spilled, or as dropped when the
    /// spill is full or the write fails; returns whether they were kept.
    pub fn append(&self, rows: &[RequestRecord]) -> bool {
        if rows.is_empty() {
            return true;
        }
        let payload = encode(rows);
        let n = rows.len() as u64;
        let result = self.files().append(&payload);
        match result {
            Ok(pending) => {
                self.metrics.spill_rows.inc_by(n);
                self.metrics.spill_bytes.set(pending as i64);
                true
            }
            Err(e) => {
                let dropped = self.metrics.spill_dropped.inc_by(n) + n;
                tracing::error!(rows = n, dropped_total = dropped, error = %e, "request log: rows dropped, the spill cannot take them");
                false
            }
        }
    }

    /// The oldest record not yet replayed, and the position past it.
    /// Skips (and counts) torn records. Blocking file I/O.
    pub(super) fn next_batch(&self) -> Option<(Vec<RequestRecord>, Position)> {
        let mut files = self.files();
        let (batch, skipped) = files.next_batch();
        if skipped.torn > 0 {
            self.metrics.spill_torn.inc_by(skipped.torn);
            tracing::error!(
                records = skipped.torn,
                "request log: torn or corrupt spill record skipped with the rest of its segment"
            );
        }
        self.metrics.spill_unreadable.inc_by(skipped.unreadable);
        self.metrics.spill_bytes.set(files.pending as i64);
        batch
    }

    /// Moves replay past a record whose `rows` rows are in the database.
    pub(super) fn commit(&self, to: Position, rows: usize) {
        let mut files = self.files();
        files.commit(to);
        self.metrics.spill_replayed.inc_by(rows as u64);
        self.metrics.spill_bytes.set(files.pending as i64);
    }

    /// `fsync`s what was appended since the last call.
    pub fn sync(&self) {
        let mut files = self.files();
        if files.unsynced {
            if let Some(out) = &files.out
                && let Err(e) = out.sync_data()
            {
                tracing::warn!(error = %e, "request log: spill fsync failed");
            }
            files.unsynced = false;
        }
    }
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
enum AppendError {
    #[error("the spill is full (store.spill_max_bytes = {0})")]
    Full(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What reading a record found.
enum Read1 {
    Record(Vec<RequestRecord>, u64),
    Torn,
}

impl Files {
    fn append(&mut self, payload: &[u8]) -> Result<u64, AppendError> {
        let len = HEADER + payload.len() as u64;
        if self.pending + len > self.max_bytes {
            return Err(AppendError::Full(self.max_bytes));
        }
        let back_len = self.segments.back().map_or(0, |&(_, l)| l);
        if self.out.is_none() || back_len + len > self.segment_bytes && back_len > 0 {
            self.rotate()?;
        }
        let mut record = Vec::with_capacity(len as usize);
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&CRC.checksum(payload).to_le_bytes());
        record.extend_from_slice(payload);
        let (Some(out), Some(back)) = (self.out.as_mut(), self.segments.back_mut()) else {
            return Err(io::Error::other("no segment open").into());
        };
        if let Err(e) = out.write_all(&record) {
            // Leave no partial record behind for the next one to follow.
            let _ = out.set_len(back.1);
            let _ = out.seek(SeekFrom::Start(back.1));
            return Err(e.into());
        }
        back.1 += len;
        self.pending += len;
        self.unsynced = true;
        Ok(self.pending)
    }

    /// Closes the newest segment (fsync) and begins the next.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(out) = self.out.take() {
            out.sync_data()?;
        }
        fs::create_dir_all(&self.dir)?;
        let seq = self.next_seq;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.dir.join(segment_name(seq)))?;
        self.next_seq += 1;
        self.segments.push_back((seq, 0));
        self.out = Some(file);
        self.unsynced = false;
        Ok(())
    }

    fn next_batch(&mut self) -> (Option<(Vec<RequestRecord>, Position)>, Skipped) {
        let mut skipped = Skipped::default();
        loop {
            let Some(&(seq, len)) = self.segments.front() else {
                return (None, skipped);
            };
            if self.read_offset >= len {
                if len == 0 && self.out.is_some() && self.segments.len() == 1 {
                    // The newest segment, just begun: nothing to read.
                    return (None, skipped);
                }
                self.finish_front();
                continue;
            }
            match self.read_at(seq, self.read_offset, len) {
                Ok(Read1::Record(rows, next)) => {
                    self.failures = 0;
                    return (Some((rows, Position { seq, offset: next })), skipped);
                }
                Ok(Read1::Torn) => {
                    self.failures = 0;
                    skipped.torn += 1;
                    // Nothing after a torn record can be trusted to start
                    // where it seems to: skip the rest of the segment.
                    self.pending -= len - self.read_offset;
                    self.read_offset = len;
                    if self.segments.len() == 1 {
                        self.out = None;
                    }
                }
                Err(e) => {
                    self.failures += 1;
                    if self.failures < UNREADABLE_TRIES {
                        tracing::error!(error = %e, segment = seq, "request log: cannot read the spill; trying again");
                        return (None, skipped);
                    }
                    self.set_aside(seq, &e);
                    skipped.unreadable += 1;
                }
            }
        }
    }

    /// Gives up on the oldest segment, which failed every read: renamed
    /// to `….log.unreadable` and kept for a person to look at (its
    /// records are the documented format), its bytes no longer pending.
    fn set_aside(&mut self, seq: u64, e: &io::Error) {
        self.failures = 0;
        let Some((_, len)) = self.segments.pop_front() else {
            return;
        };
        self.pending -= len.saturating_sub(self.read_offset).min(self.pending);
        if self.segments.is_empty() {
            self.out = None;
        }
        let name = self.dir.join(segment_name(seq));
        let aside = self.dir.join(format!("{}.unreadable", segment_name(seq)));
        if let Err(r) = fs::rename(&name, &aside) {
            tracing::error!(error = %r, segment = seq, "request log: cannot rename an unreadable spill segment");
        }
        tracing::error!(
            error = %e,
            segment = %aside.display(),
            bytes = len - self.read_offset.min(len),
            "request log: a spill segment cannot be read; set aside, replay goes on with the next"
        );
        self.read_offset = 0;
        self.save_cursor();
    }

    fn read_at(&self, seq: u64, offset: u64, len: u64) -> io::Result<Read1> {
        if len - offset < HEADER {
            return Ok(Read1::Torn);
        }
        let mut file = File::open(self.dir.join(segment_name(seq)))?;
        file.seek(SeekFrom::Start(offset))?;
        let mut header = [0u8; HEADER as usize];
        file.read_exact(&mut header)?;
        let size = u64::from(u32::from_le_bytes([
            header[4], header[5], header[6], header[7],
        ]));
        let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if header[..4] != MAGIC || size > MAX_PAYLOAD || offset + HEADER + size > len {
            return Ok(Read1::Torn);
        }
        let mut payload = vec![0u8; size as usize];
        file.read_exact(&mut payload)?;
        if CRC.checksum(&payload) != crc {
            return Ok(Read1::Torn);
        }
        match serde_json::from_slice::<Vec<RowIn>>(&payload) {
            Ok(rows) => Ok(Read1::Record(
                rows.into_iter().map(RequestRecord::from).collect(),
                offset + HEADER + size,
            )),
            Err(_) => Ok(Read1::Torn),
        }
    }

    fn commit(&mut self, to: Position) {
        if self.segments.front().map(|&(s, _)| s) != Some(to.seq) || to.offset < self.read_offset {
            return;
        }
        self.pending -= to.offset - self.read_offset;
        self.read_offset = to.offset;
        self.save_cursor();
    }

    /// Deletes the oldest segment, wholly replayed.
    fn finish_front(&mut self) {
        let Some((seq, len)) = self.segments.pop_front() else {
            return;
        };
        self.pending -= len.saturating_sub(self.read_offset).min(self.pending);
        if self.segments.is_empty() {
            // The newest: the next append begins a fresh one.
            self.out = None;
        }
        let _ = fs::remove_file(self.dir.join(segment_name(seq)));
        self.read_offset = 0;
        self.save_cursor();
    }

    /// Records the replay position, replacing the old cursor in one
    /// rename. Not fsynced: a stale cursor replays a batch twice, never
    /// skips one.
    fn save_cursor(&self) {
        let seq = self.segments.front().map_or(self.next_seq, |&(s, _)| s);
        let tmp = self.dir.join("cursor.tmp");
        let saved = fs::write(&tmp, format!("{seq} {}\n", self.read_offset))
            .and_then(|()| fs::rename(&tmp, self.dir.join(CURSOR)));
        if let Err(e) = saved {
            tracing::warn!(error = %e, "request log: cannot save the spill cursor");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u32) -> RequestRecord {
        RequestRecord {
            client_id: Uuid::new_v4(),
            city: format!("City {n}"),
            ok: n.is_multiple_of(2),
            temperature: n.is_multiple_of(2).then_some(f64::from(n)),
            error: (n % 2 == 1).then_some("not_found"),
            latency_ms: n,
            created_at: Utc::now(),
        }
    }

    fn open(dir: &Path, max: u64) -> (Spill, Arc<StoreMetrics>) {
        let metrics = Arc::new(StoreMetrics::default());
        (
            Spill::open(dir, max, metrics.clone()).expect("open"),
            metrics,
        )
    }

    fn replay_all(spill: &Spill) -> Vec<RequestRecord> {
        let mut all = Vec::new();
        while let Some((rows, pos)) = spill.next_batch() {
            let n = rows.len();
            all.extend(rows);
            spill.commit(pos, n);
        }
        all
    }

    #[test]
    fn rows_come_back_in_order_and_the_files_go() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("spill");
        let (spill, metrics) = open(&dir, 1 << 20);
        assert!(dir.join("lock").exists(), "created and locked at open");
        let rows: Vec<_> = (0..3000).map(row).collect();
        for chunk in rows.chunks(100) {
            assert!(spill.append(chunk));
        }
        assert!(
            fs::read_dir(&dir).expect("dir").count() > 2,
            "several segments"
        );
        assert_eq!(metrics.spill_rows.get(), 3000);
        assert!(spill.pending_bytes() > 0);
        assert_eq!(replay_all(&spill), rows);
        assert_eq!(spill.pending_bytes(), 0);
        assert_eq!(metrics.spill_replayed.get(), 3000);
        assert_eq!(metrics.spill_bytes.get(), 0);
        let logs = fs::read_dir(&dir)
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))
            })
            .count();
        assert_eq!(logs, 0, "replayed segments are deleted");
        // And appending works again afterwards.
        assert!(spill.append(&rows[..5]));
        assert_eq!(replay_all(&spill), rows[..5].to_vec());
    }

    #[test]
    fn one_process_at_a_time_holds_a_spill_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (first, _) = open(tmp.path(), 1 << 20);
        let second = Spill::open(tmp.path(), 1 << 20, Arc::new(StoreMetrics::default()))
            .expect_err("a second owner is refused");
        let text = second.to_string();
        assert!(text.contains("in use by another gale process"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(Spill::open(tmp.path(), 1 << 20, Arc::new(StoreMetrics::default())).is_ok());
    }

    #[test]
    fn a_restart_resumes_after_the_last_replayed_batch() {
        let tmp = tempfile::tempdir().expect("tmp");
        let rows: Vec<_> = (0..50).map(row).collect();
        {
            let (spill, _) = open(tmp.path(), 1 << 20);
            for chunk in rows.chunks(10) {
                assert!(spill.append(chunk));
            }
            let (first, pos) = spill.next_batch().expect("a batch");
            assert_eq!(first, rows[..10]);
            spill.commit(pos, 10);
            spill.sync();
        }
        let (spill, _) = open(tmp.path(), 1 << 20);
        assert_eq!(replay_all(&spill), rows[10..].to_vec());
        drop(spill);
        let (again, _) = open(tmp.path(), 1 << 20);
        assert!(again.next_batch().is_none(), "nothing replayed twice");
    }

    #[test]
    fn a_damaged_cursor_loses_no_rows() {
        let tmp = tempfile::tempdir().expect("tmp");
        let rows: Vec<_> = (0..30).map(row).collect();
        {
            let (spill, _) = open(tmp.path(), 1 << 20);
            for chunk in rows.chunks(10) {
                assert!(spill.append(chunk));
            }
            spill.sync();
        }
        for damaged in ["99999999 0", "18446744073709551615 0"] {
            fs::write(tmp.path().join(CURSOR), damaged).expect("damage the cursor");
            let (spill, _) = open(tmp.path(), 1 << 20);
            assert!(spill.pending_bytes() > 0, "{damaged}: segments kept");
            drop(spill);
        }
        let (spill, _) = open(tmp.path(), 1 << 20);
        assert_eq!(replay_all(&spill), rows, "every row, from the start");
        drop(spill);
        let (again, _) = open(tmp.path(), 1 << 20);
        assert!(again.next_batch().is_none(), "and the cursor is good again");
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_counted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let rows: Vec<_> = (0..30).map(row).collect();
        {
            let (spill, _) = open(tmp.path(), 1 << 20);
            for chunk in rows.chunks(10) {
                assert!(spill.append(chunk));
            }
        }
        // A crash in the middle of the last write: cut it short.
        let seg = tmp.path().join(segment_name(1));
        let len = fs::metadata(&seg).expect("segment").len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open")
            .set_len(len - 7)
            .expect("cut");
        let (spill, metrics) = open(tmp.path(), 1 << 20);
        assert_eq!(replay_all(&spill), rows[..20].to_vec());
        assert_eq!(metrics.spill_torn.get(), 1);
        assert_eq!(spill.pending_bytes(), 0);
        // New rows after the torn one are kept and replayed.
        assert!(spill.append(&rows[..3]));
        assert_eq!(replay_all(&spill), rows[..3].to_vec());
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let tmp = tempfile::tempdir().expect("tmp");
        let rows: Vec<_> = (0..20).map(row).collect();
        {
            let (spill, _) = open(tmp.path(), 1 << 20);
            for chunk in rows.chunks(10) {
                assert!(spill.append(chunk));
            }
        }
        let seg = tmp.path().join(segment_name(1));
        let mut bytes = fs::read(&seg).expect("read");
        let last = bytes.len() - 20;
        bytes[last] ^= 0x01;
        fs::write(&seg, bytes).expect("write");
        let (spill, metrics) = open(tmp.path(), 1 << 20);
        assert_eq!(replay_all(&spill), rows[..10].to_vec());
        assert_eq!(metrics.spill_torn.get(), 1);
    }

    #[test]
    fn an_unreadable_segment_is_set_aside_and_replay_goes_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (spill, metrics) = open(tmp.path(), 1 << 20);
        let rows: Vec<_> = (0..3000).map(row).collect();
        for chunk in rows.chunks(100) {
            assert!(spill.append(chunk));
        }
        // The oldest segment cannot be read at all (an I/O error, not a
        // torn record): here, it became a directory.
        let first = tmp.path().join(segment_name(1));
        fs::remove_file(&first).expect("remove");
        fs::create_dir(&first).expect("a directory in its place");
        let mut got = Vec::new();
        for _ in 0..UNREADABLE_TRIES + 1 {
            got.extend(replay_all(&spill));
        }
        assert!(!got.is_empty() && got.len() < rows.len(), "{}", got.len());
        assert_eq!(
            got,
            rows[rows.len() - got.len()..],
            "the later segments, in order"
        );
        assert_eq!(metrics.spill_unreadable.get(), 1);
        assert!(
            tmp.path()
                .join(format!("{}.unreadable", segment_name(1)))
                .exists(),
            "set aside, not deleted"
        );
        assert_eq!(spill.pending_bytes(), 0);
        // New rows are taken and replayed.
        assert!(spill.append(&rows[..5]));
        assert_eq!(replay_all(&spill), rows[..5].to_vec());
    }

    #[test]
    fn a_full_spill_drops_and_counts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (spill, metrics) = open(tmp.path(), 4096);
        let rows: Vec<_> = (0..10).map(row).collect();
        let mut kept = 0;
        for _ in 0..20 {
            if spill.append(&rows) {
                kept += 10;
            }
        }
        assert!(kept > 0 && kept < 200);
        assert_eq!(metrics.spill_rows.get(), kept);
        assert_eq!(metrics.spill_dropped.get(), 200 - kept);
        assert!(spill.pending_bytes() <= 4096);
        // Replaying makes room again.
        assert_eq!(replay_all(&spill).len() as u64, kept);
        assert!(spill.append(&rows));
    }
}
