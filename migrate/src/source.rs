//! The source side: `stasis migrate`. It speaks the protocol of [`crate::protocol`] over a
//! connection to a receiver and drives the workload through the verbs of
//! [`stasis_workload::Source`]: freeze, write its state into the connection, wait until
//! the destination holds it whole, commit, wait until the destination runs it, discard.
//!
//! The source stays the authority until the commit: any failure before it (a refusal, a
//! connection lost or stalled, a build that failed there) resumes the workload as it was and
//! tells the destination to discard what it holds. After the commit the source never resumes
//! its copy: if the destination does not confirm, the copy is left stopped and the error
//! says how to settle it ([`MigrateError::Unsettled`]).

use crate::protocol::{self, Message, FRAME_IMAGE};
use crate::tls::Conn;
use crate::MigrateError;
use serde::Serialize;
use stasis_checkpoint::{ImageSink, Progress};
use stasis_workload::{Kind, Report, Source, WorkloadError};
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// How to migrate.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// The name it runs under on the destination (containers and VMs; default its own).
    pub name: Option<String>,
    /// The CPU feature flags the workload may use (this host's): the destination must
    /// have every one.
    pub cpu_flags: Vec<String>,
}

/// What a migration measured (microseconds; downtime as stasis sees it).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub workload: String,
    pub kind: Kind,
    /// The workload's PID on the destination (its root's, or its VMM's).
    pub destination_pid: i32,
    pub image_bytes: u64,
    /// Frozen here until the destination said it runs.
    pub downtime_us: u64,
    /// Writing the image into the connection.
    pub transfer_us: u64,
    /// From the end of the image until the destination held the workload.
    pub build_us: u64,
    /// From the commit until the destination said it runs.
    pub resume_us: u64,
    pub total_us: u64,
    /// The checkpoint's own figures.
    pub checkpoint: Report,
}

/// Image bytes on their way into the connection, as image frames.
struct ImageFrames<'a> {
    conn: &'a mut Box<dyn Conn>,
    buf: Vec<u8>,
    hash: blake3::Hasher,
    bytes: u64,
}

/// Bytes gathered into one frame.
const FRAME_BYTES: usize = 1 << 20;

impl ImageFrames<'_> {
    fn send_buffered(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            protocol::write_frame(self.conn, FRAME_IMAGE, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for ImageFrames<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.hash.update(&data[..n]);
        self.bytes += n as u64;
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

impl ImageSink for ImageFrames<'_> {
    fn commit(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// Migrates `w` over `conn` (connected to a receiver, with TLS or without; its read
/// timeout bounds each wait for an answer). See the module documentation.
pub fn migrate(
    w: &mut dyn Source,
    mut conn: Box<dyn Conn>,
    opts: &MigrateOptions,
    progress: Progress<'_>,
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

    w.freeze()?;
    let t_frozen = Instant::now();
    // Until the commit, any failure resumes the workload and tells the destination to
    // drop what it holds.
    let sent = (|| -> Result<(u64, Duration, Duration, i32), WorkloadError> {
        let broke = |why: String| WorkloadError::Workflow {
            workload: workload.clone(),
            why,
        };
        let tt = Instant::now();
        let mut frames = ImageFrames {
            conn: &mut conn,
            buf: Vec::with_capacity(FRAME_BYTES),
            hash: blake3::Hasher::new(),
            bytes: 0,
        };
        w.write_state(&mut frames, progress)?;
        frames
            .commit()
            .map_err(|e| broke(format!("sending the image: {e}")))?;
        let (bytes, hash) = (frames.bytes, frames.hash.finalize().to_hex().to_string());
        protocol::send(
            &mut conn,
            &Message::ImageEnd {
                bytes,
                blake3: hash,
            },
        )
        .map_err(|e| broke(format!("sending the end of the image: {e}")))?;
        let transfer = tt.elapsed();
        let tb = Instant::now();
        let answer = protocol::recv_control(&mut conn, "held")
            .map_err(|e| broke(format!("waiting for the destination to hold it: {e}")))?;
        let pid = match answer {
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
        Ok((bytes, transfer, tb.elapsed(), pid))
    })();
    let (image_bytes, transfer, build, destination_pid) = match sent {
        Ok(v) => v,
        Err(e) => {
            let reason = e.to_string();
            let _ = protocol::send(&mut conn, &Message::Abort { reason });
            return Err(w.abandon(e).into());
        }
    };

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
    let resume = tr.elapsed();
    w.committed(0);
    w.discard()?;
    Ok(MigrateReport {
        workload,
        kind: w.kind(),
        destination_pid,
        image_bytes,
        downtime_us: micros(t_frozen.elapsed()),
        transfer_us: micros(transfer),
        build_us: micros(build),
        resume_us: micros(resume),
        total_us: micros(t0.elapsed()),
        checkpoint: w.report(),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
