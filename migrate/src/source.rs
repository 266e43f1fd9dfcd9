//! The source side: `stasis migrate`. It speaks the protocol of [`crate::protocol`] over a
//! connection to a receiver and drives the workload through the verbs of
//! [`stasis_workload::Source`]: where its memory is tracked (a VM), copy it round after
//! round while it runs until the last round is expected to fit `--max-downtime` (or
//! `--max-rounds` is reached, or the pages written stop shrinking); freeze; send the last
//! round and its state; wait until the destination holds it whole; commit; wait until the
//! destination runs it; discard.
//!
//! The source stays the authority until the commit: any failure before it (a refusal, a
//! connection lost or stalled, a build that failed there) resumes the workload as it was and
//! tells the destination to discard what it holds. After the commit the source never resumes
//! its copy: if the destination does not confirm, the copy is left stopped and the error
//! says how to settle it ([`MigrateError::Unsettled`]).

use crate::protocol::{self, Message, FRAME_FILES, FRAME_IMAGE, FRAME_PAGES, FRAME_RANGES};
pub use crate::rounds::RoundReport;
use crate::rounds::{per_second, Rounds};
use crate::tls::Conn;
use crate::MigrateError;
use serde::Serialize;
use stasis_checkpoint::{ImageSink, PageSink, Progress, Ranges};
use stasis_runtime::sys::{
    take_termination_signal, termination_pending, TerminationSignalsBlocked,
};
use stasis_workload::{Kind, Report, Source, WorkloadError};
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The name it runs under on the destination (containers and VMs; default its own).
    pub name: Option<String>,
    /// The CPU feature flags the workload may use (this host's): the destination must
    /// have every one.
    pub cpu_flags: Vec<String>,
    /// Pre-copy rounds go on until the copy of what the workload writes during one more
    /// round is expected to take at most this long...
    pub max_downtime: Duration,
    /// ... or this many rounds were copied (0: no pre-copy, one stop-and-copy round) ...
    pub max_rounds: u32,
    /// (... or the set of pages written stops shrinking.) The most bytes per second the
    /// rounds send while the workload runs (None: as fast as they go). The last round,
    /// frozen, is never held back.
    pub bandwidth: Option<u64>,
    /// A container's root file system to send along (hosts that share no storage).
    pub rootfs: Option<std::path::PathBuf>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            name: None,
            cpu_flags: Vec::new(),
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            bandwidth: None,
            rootfs: None,
        }
    }
}

/// A container's root file system, as it went along.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RootfsReport {
    pub bytes: u64,
    pub entries: u64,
    pub changed: u64,
    pub removed: u64,
    pub copy_us: u64,
}

/// What a migration measured (microseconds; downtime as stasis sees it).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub workload: String,
    pub kind: Kind,
    /// The workload's PID on the destination (its root's, or its VMM's).
    pub destination_pid: i32,
    /// How memory was copied while the workload ran ("kvm-dirty-log"), or why it was not
    /// ("none: ...": one stop-and-copy round).
    pub precopy: String,
    /// Why the rounds ended and the workload was frozen.
    pub switchover: String,
    /// The rounds, the last one frozen.
    pub rounds: Vec<RoundReport>,
    /// Bytes of pages sent in rounds.
    pub page_bytes: u64,
    /// Bytes of the image (its state, and its memory if that was not sent in rounds).
    pub image_bytes: u64,
    /// A container's root file system sent along: bytes of its tar streams, entries sent
    /// whole while it ran, entries sent again and paths removed while it was frozen, and
    /// the time the whole copy took.
    pub rootfs: Option<RootfsReport>,
    /// Frozen here until the destination said it runs (as stasis sees it).
    pub downtime_us: u64,
    /// Ending the copy here once the destination runs it (not downtime).
    pub discard_us: u64,
    /// Copying memory before the freeze, every round.
    pub precopy_us: u64,
    /// While frozen: the last round and the image into the connection.
    pub transfer_us: u64,
    /// From the end of the image until the destination held the workload.
    pub build_us: u64,
    /// From the commit until the destination said it runs.
    pub resume_us: u64,
    pub total_us: u64,
    /// The checkpoint's own figures.
    pub checkpoint: Report,
}

/// Everything the workload sends through the connection: pages frames (rounds) and
/// image frames, hashed as sent.
struct Wire<'a> {
    conn: &'a mut Box<dyn Conn>,
    /// Bytes written (image, or files while `files`) gathered into the next frame.
    buf: Vec<u8>,
    /// What is written goes in files frames (a tar stream), not image frames.
    files: bool,
    /// A pages frame's payload being made.
    frame: Vec<u8>,
    /// Whole pages frames (headers and payloads) gathered before they are written: a
    /// round of scattered pages is thousands of small frames.
    frames: Vec<u8>,
    hash: blake3::Hasher,
    image_bytes: u64,
    page_bytes: u64,
    file_bytes: u64,
    throttle: Option<Throttle>,
}

/// Holds sending down to a rate.
struct Throttle {
    bytes_per_s: u64,
    since: Instant,
    sent: u64,
}

impl Throttle {
    fn after(&mut self, n: u64) {
        self.sent += n;
        let due = Duration::from_secs_f64(self.sent as f64 / self.bytes_per_s.max(1) as f64);
        if let Some(wait) = due.checked_sub(self.since.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Bytes gathered into one frame.
const FRAME_BYTES: usize = 1 << 20;

/// A termination signal waiting (see [`migrate`]) as the error that ends a send.
fn check_signals() -> io::Result<()> {
    match termination_pending() {
        Some(sig) => Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("interrupted by signal {sig}"),
        )),
        None => Ok(()),
    }
}

/// A termination signal that stops the migration before the commit.
fn interrupted(workload: &str, signal: i32) -> WorkloadError {
    WorkloadError::Workflow {
        workload: workload.to_string(),
        why: format!("interrupted by signal {signal}"),
    }
}

impl Wire<'_> {
    /// Writes the gathered pages frames.
    fn send_frames(&mut self) -> io::Result<()> {
        if self.frames.is_empty() {
            return Ok(());
        }
        self.conn.write_all(&self.frames)?;
        if let Some(t) = self.throttle.as_mut() {
            t.after(self.frames.len() as u64);
        }
        self.frames.clear();
        Ok(())
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        check_signals()?;
        self.send_frames()?;
        if !self.buf.is_empty() {
            let kind = if self.files { FRAME_FILES } else { FRAME_IMAGE };
            protocol::write_frame(self.conn, kind, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends what is buffered, then `m`.
    fn control(&mut self, m: &Message) -> Result<(), protocol::ProtocolError> {
        self.send_buffered()?;
        protocol::send(self.conn, m)
    }

    /// Sends a files stream: what `stream` writes (a tar stream), then the paths it
    /// returns as gone, then its end.
    fn files_stream(
        &mut self,
        stream: impl FnOnce(&mut Self) -> io::Result<Vec<std::path::PathBuf>>,
    ) -> Result<(), String> {
        self.send_buffered().map_err(|e| e.to_string())?;
        self.files = true;
        let gone = stream(self);
        let ended = self.send_buffered();
        self.files = false;
        let gone = gone
            .and_then(|g| ended.map(|()| g))
            .map_err(|e| e.to_string())?;
        // Each message well within a control frame's bound.
        let paths: Vec<String> = gone
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let mut at = 0;
        while at < paths.len() {
            let mut size = 0;
            let end = paths[at..]
                .iter()
                .take_while(|p| {
                    size += p.len() + 8;
                    size < 32 << 10
                })
                .count()
                .max(1);
            let chunk = paths[at..at + end].to_vec();
            self.control(&Message::Removed { paths: chunk })
                .map_err(|e| e.to_string())?;
            at += end;
        }
        self.control(&Message::FilesEnd).map_err(|e| e.to_string())
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.hash.update(&data[..n]);
        match self.files {
            true => self.file_bytes += n as u64,
            false => self.image_bytes += n as u64,
        }
        if self.buf.len() == FRAME_BYTES {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.conn.flush()
    }
}

impl ImageSink for Wire<'_> {
    fn commit(&mut self) -> io::Result<()> {
        self.flush()
    }
}

impl PageSink for Wire<'_> {
    fn process(&mut self, pid: i32) -> io::Result<()> {
        self.control(&Message::Process { pid })
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn ranges(&mut self, kind: Ranges, ranges: &[(u64, u64)]) -> io::Result<()> {
        self.send_buffered()?;
        let op = match kind {
            Ranges::Mappings => protocol::RANGES_MAPPINGS,
            Ranges::Zero => protocol::RANGES_ZERO,
        };
        protocol::ranges_payload(op, ranges, &mut self.frame);
        self.hash.update(&self.frame);
        protocol::write_frame(self.conn, FRAME_RANGES, &self.frame)?;
        self.page_bytes += self.frame.len() as u64;
        Ok(())
    }

    fn pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send_buffered()?;
        }
        check_signals()?;
        let most = (protocol::MAX_IMAGE_FRAME as usize - 8) / protocol::PAGE as usize
            * protocol::PAGE as usize;
        let mut at = addr;
        for piece in data.chunks(most) {
            protocol::pages_payload(at, piece, &mut self.frame);
            self.hash.update(&self.frame);
            protocol::write_frame(&mut self.frames, FRAME_PAGES, &self.frame)?;
            self.page_bytes += self.frame.len() as u64;
            at += piece.len() as u64;
            if self.frames.len() >= FRAME_BYTES {
                self.send_frames()?;
            }
        }
        Ok(())
    }
}

/// Told about each round as it ends.
pub type OnRound<'a> = &'a dyn Fn(&RoundReport);

/// Migrates `w` over `conn` (connected to a receiver, with TLS or without; its read
/// timeout bounds each wait for an answer). See the module documentation.
///
/// Termination signals (Ctrl-C) are held back meanwhile and acted on between steps: one
/// that comes before the commit abandons the migration (the workload runs on here, the
/// destination discards its copy, [`MigrateError::Interrupted`]); after the commit the
/// migration ends as it would have, never with a workload half settled.
pub fn migrate(
    w: &mut dyn Source,
    conn: Box<dyn Conn>,
    opts: &MigrateOptions,
    progress: Progress<'_>,
    on_round: OnRound<'_>,
) -> Result<MigrateReport, MigrateError> {
    let blocked = TerminationSignalsBlocked::new().map_err(|e| MigrateError::Failed {
        workload: w.describe(),
        cause: format!("holding back termination signals: {e}"),
    })?;
    let r = migrate_held(w, conn, opts, progress, on_round);
    // One that came after the commit changes nothing: the outcome stands.
    let _ = take_termination_signal();
    drop(blocked);
    r
}

fn migrate_held(
    w: &mut dyn Source,
    mut conn: Box<dyn Conn>,
    opts: &MigrateOptions,
    progress: Progress<'_>,
    on_round: OnRound<'_>,
) -> Result<MigrateReport, MigrateError> {
    let t0 = Instant::now();
    let workload = w.describe();
    let failed = |cause: String| MigrateError::Failed {
        workload: workload.clone(),
        cause,
    };
    protocol::send(
        &mut conn,
        &Message::Hello {
            protocol: protocol::PROTOCOL.into(),
            version: protocol::VERSION,
            kind: w.kind(),
            workload: workload.clone(),
            name: opts.name.clone(),
            cpu_flags: opts.cpu_flags.clone(),
            rootfs: opts.rootfs.is_some(),
        },
    )
    .map_err(|e| failed(format!("greeting the receiver: {e}")))?;
    match protocol::recv_control(&mut conn, "ready")
        .map_err(|e| failed(format!("waiting for the receiver's answer: {e}")))?
    {
        Message::Ready => {}
        Message::Refused { reason } => return Err(MigrateError::Refused { workload, reason }),
        m => {
            return Err(failed(format!(
                "the receiver answered {}",
                protocol::name_of(&m)
            )))
        }
    }

    // Until the commit, any failure resumes the workload (or stops tracking it) and tells
    // the destination to drop what it holds.
    let mut sent = Sent::default();
    let result = send_workload(w, &mut conn, opts, progress, on_round, &mut sent).and_then(|()| {
        match termination_pending() {
            Some(signal) => Err(interrupted(&workload, signal)),
            None => Ok(()),
        }
    });
    if let Err(e) = result {
        let reason = e.to_string();
        let _ = protocol::send(&mut conn, &Message::Abort { reason });
        let abandoned = w.abandon(e);
        return Err(match take_termination_signal() {
            Some(signal) => MigrateError::Interrupted { workload, signal },
            None => abandoned.into(),
        });
    }
    let t_frozen = sent.frozen_at.unwrap_or(t0);

    // From here the destination may run it: this copy is never resumed.
    stasis_runtime::failpoints::hit("migrate-before-commit");
    let tr = Instant::now();
    let committed = protocol::send(&mut conn, &Message::Commit)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            stasis_runtime::failpoints::hit("migrate-committed");
            match protocol::recv_control(&mut conn, "resumed").map_err(|e| e.to_string())? {
                Message::Resumed => Ok(()),
                m => Err(format!(
                    "the destination answered {}",
                    protocol::name_of(&m)
                )),
            }
        });
    if let Err(what) = committed {
        let settle = w
            .leave_frozen()
            .unwrap_or_else(|e| format!("leaving it frozen failed too: {e}"));
        return Err(MigrateError::Unsettled {
            workload,
            what,
            settle,
        });
    }
    // Down until the destination said it runs (the discard here is no longer downtime).
    let (resume, downtime) = (tr.elapsed(), t_frozen.elapsed());
    w.committed(0);
    let td = Instant::now();
    w.discard()?;
    let discard = td.elapsed();
    Ok(MigrateReport {
        workload,
        kind: w.kind(),
        destination_pid: sent.pid,
        precopy: sent.precopy,
        switchover: sent.switchover,
        rounds: sent.rounds,
        page_bytes: sent.page_bytes,
        image_bytes: sent.image_bytes,
        rootfs: sent.rootfs,
        downtime_us: micros(downtime),
        discard_us: micros(discard),
        precopy_us: sent.precopy_us,
        transfer_us: sent.transfer_us,
        build_us: sent.build_us,
        resume_us: micros(resume),
        total_us: micros(t0.elapsed()),
        checkpoint: w.report(),
    })
}

/// What [`send_workload`] sent and measured.
#[derive(Default)]
struct Sent {
    pid: i32,
    precopy: String,
    switchover: String,
    rounds: Vec<RoundReport>,
    page_bytes: u64,
    image_bytes: u64,
    precopy_us: u64,
    transfer_us: u64,
    build_us: u64,
    /// A container's root file system, as it went.
    rootfs: Option<RootfsReport>,
    /// When the workload was frozen.
    frozen_at: Option<Instant>,
}

/// Everything before the commit: the pre-copy rounds (where the workload's memory is
/// tracked), the freeze, the last round and the state, then the destination's word that it
/// holds the workload.
fn send_workload(
    w: &mut dyn Source,
    conn: &mut Box<dyn Conn>,
    opts: &MigrateOptions,
    progress: Progress<'_>,
    on_round: OnRound<'_>,
    out: &mut Sent,
) -> Result<(), WorkloadError> {
    let workload = w.describe();
    let broke = |why: String| WorkloadError::Workflow {
        workload: workload.clone(),
        why,
    };
    let tracked = match opts.max_rounds {
        0 => {
            out.precopy = "none: --max-rounds 0".into();
            None
        }
        _ => match w.start_dirty_tracking() {
            Ok(t) => {
                out.precopy = t.method.into();
                Some(t)
            }
            Err(WorkloadError::Unsupported { why, .. }) => {
                out.precopy = format!("none: {why}");
                None
            }
            Err(e) => return Err(e),
        },
    };
    let mut wire = Wire {
        conn,
        buf: Vec::with_capacity(FRAME_BYTES),
        files: false,
        frame: Vec::new(),
        frames: Vec::with_capacity(2 * FRAME_BYTES),
        hash: blake3::Hasher::new(),
        image_bytes: 0,
        page_bytes: 0,
        file_bytes: 0,
        throttle: opts.bandwidth.map(|bytes_per_s| Throttle {
            bytes_per_s,
            since: Instant::now(),
            sent: 0,
        }),
    };
    // Its root file system, whole, while it runs.
    let mut manifest = None;
    if let Some(root) = &opts.rootfs {
        let tf = Instant::now();
        wire.files_stream(|wire| {
            let (m, sent) = crate::rootfs::send_all(root, wire)?;
            manifest = Some(m);
            out.rootfs = Some(RootfsReport {
                entries: sent.entries,
                ..Default::default()
            });
            Ok(Vec::new())
        })
        .map_err(|e| {
            broke(format!(
                "sending its root file system {}: {e}",
                root.display()
            ))
        })?;
        if let Some(r) = out.rootfs.as_mut() {
            r.copy_us = micros(tf.elapsed());
        }
        // Tests hold it here (FAILPOINTS="migrate-rootfs-copied=sleep(N)") so the container
        // changes its files before the freeze.
        stasis_runtime::failpoints::hit("migrate-rootfs-copied");
    }
    if let Some(t) = tracked.filter(|t| t.extent > 0) {
        wire.control(&Message::Memory { bytes: t.extent })
            .map_err(|e| broke(format!("announcing its memory: {e}")))?;
    }
    let tp = Instant::now();
    if let Some(t) = tracked {
        progress(0, t.resident);
        let mut rounds = Rounds::default();
        loop {
            let began = Instant::now();
            let before = wire.page_bytes;
            let r = w.copy_round(&mut wire)?;
            wire.send_frames()
                .map_err(|e| broke(format!("sending pages: {e}")))?;
            let report = rounds.add(r, wire.page_bytes - before, began);
            on_round(&report);
            progress(wire.page_bytes, t.resident.max(wire.page_bytes));
            if let Some(why) = rounds.switch_now(opts.max_downtime, opts.max_rounds) {
                out.switchover = why;
                break;
            }
        }
        out.rounds = rounds.done;
        out.precopy_us = micros(tp.elapsed());
    } else {
        out.switchover = "no pre-copy: one stop-and-copy round".into();
    }

    w.freeze()?;
    out.frozen_at = Some(Instant::now());
    let tt = Instant::now();
    wire.throttle = None;
    // What changed in its root file system since.
    if let (Some(root), Some(before)) = (&opts.rootfs, &manifest) {
        wire.files_stream(|wire| {
            let (gone, sent) = crate::rootfs::send_changes(root, before, wire)?;
            if let Some(r) = out.rootfs.as_mut() {
                (r.changed, r.removed) = (sent.entries, sent.removed);
            }
            Ok(gone)
        })
        .map_err(|e| broke(format!("sending what changed in {}: {e}", root.display())))?;
    }
    if tracked.is_some() {
        let began = Instant::now();
        let before = wire.page_bytes;
        let r = w.copy_round(&mut wire)?;
        wire.send_frames()
            .map_err(|e| broke(format!("sending pages: {e}")))?;
        let bytes = wire.page_bytes - before;
        let last = RoundReport {
            round: out.rounds.len() as u32 + 1,
            frozen: true,
            pages: r.pages,
            bytes,
            us: micros(began.elapsed()),
            rate: per_second(bytes, began.elapsed()),
            dirty_rate: None,
            expected_downtime_us: None,
        };
        on_round(&last);
        out.rounds.push(last);
    }
    w.write_state(&mut wire, progress)?;
    wire.commit()
        .map_err(|e| broke(format!("sending the image: {e}")))?;
    let (image_bytes, page_bytes, file_bytes) =
        (wire.image_bytes, wire.page_bytes, wire.file_bytes);
    let blake3 = wire.hash.finalize().to_hex().to_string();
    protocol::send(
        conn,
        &Message::ImageEnd {
            bytes: image_bytes,
            pages: page_bytes,
            files: file_bytes,
            blake3,
        },
    )
    .map_err(|e| broke(format!("sending the end of the image: {e}")))?;
    out.transfer_us = micros(tt.elapsed());
    out.image_bytes = image_bytes;
    out.page_bytes = page_bytes;
    if let Some(r) = out.rootfs.as_mut() {
        r.bytes = file_bytes;
    }
    let tb = Instant::now();
    let answer = protocol::recv_control(conn, "held")
        .map_err(|e| broke(format!("waiting for the destination to hold it: {e}")))?;
    out.pid = match answer {
        Message::Held { pid } => pid,
        Message::Failed { reason } => {
            return Err(broke(format!("the destination failed: {reason}")))
        }
        m => {
            return Err(broke(format!(
                "the destination answered {}",
                protocol::name_of(&m)
            )))
        }
    };
    out.build_us = micros(tb.elapsed());
    Ok(())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
