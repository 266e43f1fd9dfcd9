//! The migration wire protocol, version 3: everything that crosses the connection between
//! `stasis migrate` (the source) and `stasis receive` (the destination) is defined here.
//!
//! # Frames
//! Every frame is a 5-byte header, then its payload:
//! - byte 0: the frame type, [`FRAME_CONTROL`], [`FRAME_IMAGE`], [`FRAME_PAGES`],
//!   [`FRAME_FILES`] or [`FRAME_RANGES`];
//! - bytes 1..5: the payload length, little-endian u32, at most [`MAX_CONTROL`] for a
//!   control frame and [`MAX_IMAGE_FRAME`] for the others. A longer length, an unknown
//!   type, or a connection that ends inside a frame is a protocol error: the peer is dropped.
//!
//! A control frame carries one [`Message`] as JSON (`{"type": "hello", ...}`). An image
//! frame carries the next bytes of the workload's image, in stasis's image format exactly as
//! `stasis checkpoint` writes it to a stream: the receiver stores them and then opens them
//! with the same reader (magic, version, bounded lengths, hashes) that protects `restore`.
//! A pages frame carries pages of memory copied in a pre-copy round: a little-endian u64
//! address (a VM's guest-physical address, or a virtual address of the process the last
//! [`Message::Process`] named; page-aligned), then whole pages, all inside the memory
//! announced by [`Message::Memory`] or inside one of that process's mappings. A later frame
//! for the same address replaces the earlier one's pages (they were written again). A
//! ranges frame carries one byte, [`RANGES_MAPPINGS`] or [`RANGES_ZERO`], then page-aligned
//! (start, end) pairs of little-endian u64s, ascending and apart: the process's private
//! anonymous mappings whose pages the rounds send (a new one starts zero; one no longer
//! listed is dropped), or ranges of them that read zero now. A files frame carries the next bytes of
//! a tar stream of a container's root file system (see [`crate::rootfs`]), which ends at
//! [`Message::FilesEnd`].
//!
//! # Conversation
//! ```text
//! source                                destination
//! hello {protocol, version, workload,
//!        cpu_flags}                    ->
//!                                      <- ready | refused {reason}
//! [files frames ..., removed {paths}...,
//!  files-end                           ->  (its root file system, whole, while it runs)]
//! [memory {bytes}                      ->  (guest memory made, zero)
//!  pages frames ..., round after round ->  (written where the VM will run on them)]
//! [process {pid}, ranges frames,
//!  pages frames ..., per process, round
//!  after round                         ->  (written where its processes will use them)]
//! (freezes the workload)
//! [files frames ..., removed ...,
//!  files-end                           ->  (what changed in it since)]
//! [pages (and ranges) frames of the
//!  last round                          ->]
//! image frames ...                     ->  (stored, bounded)
//! image-end {bytes, pages, blake3}     ->  (checked, verified, built, held stopped)
//!                                      <- held {pid} | failed {reason}
//! commit                               ->  (resumes it)
//!                                      <- resumed
//! (discards its copy)
//! ```
//! Before `commit` either side may give up: the source sends `abort {reason}` (or just
//! goes away) and resumes its workload; the destination sends `failed` or `refused` (or
//! goes away) and leaves nothing behind. After `commit` the source never resumes its copy:
//! without `resumed` it keeps it stopped and says so (the operator settles it).
//!
//! The pre-copy rounds (bracketed) are for workloads whose memory is tracked while they
//! run (VMs, and process trees and containers on kernels with userfaultfd write-protect
//! and PAGEMAP_SCAN); the others go straight to the freeze. The files streams (bracketed) are for a
//! container with a root file system of its own whose hosts share no storage (`hello` says
//! `rootfs`). `image-end`'s blake3 covers the payload of every files, pages and image frame,
//! in the order sent: what is built is exactly what was sent.

use serde::{Deserialize, Serialize};
use stasis_workload::Kind;
use std::io::{self, Read, Write};

/// The protocol's name, in `hello`.
pub const PROTOCOL: &str = "stasis-migrate";
/// The protocol's version, in `hello`; a receiver refuses any other.
pub const VERSION: u32 = 3;
/// A frame carrying a [`Message`].
pub const FRAME_CONTROL: u8 = 1;
/// A frame carrying image bytes.
pub const FRAME_IMAGE: u8 = 2;
/// A frame carrying pages of a pre-copy round (an address, then whole pages).
pub const FRAME_PAGES: u8 = 3;
/// A frame carrying the next bytes of a tar stream of a container's root file system.
pub const FRAME_FILES: u8 = 4;
/// A frame carrying page ranges of a process's memory (see the module documentation).
pub const FRAME_RANGES: u8 = 5;
/// Ranges frame: the process's mappings the rounds send pages of.
pub const RANGES_MAPPINGS: u8 = 1;
/// Ranges frame: ranges of its mappings that read zero now.
pub const RANGES_ZERO: u8 = 2;
/// The page size pages frames are counted in.
pub const PAGE: u64 = 4096;
/// The largest control payload.
pub const MAX_CONTROL: u32 = 64 << 10;
/// The largest image payload.
pub const MAX_IMAGE_FRAME: u32 = 4 << 20;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// Source, first: who is speaking and what it brings.
    Hello {
        protocol: String,
        version: u32,
        /// "process-tree", "container" or "vm" (any other is a bad frame).
        kind: Kind,
        /// How the source names the workload ("PID 42", "container web").
        workload: String,
        /// The name it runs under on the destination (containers and VMs).
        name: Option<String>,
        /// The CPU feature flags its processes or vCPUs may use (the source host's, as
        /// /proc/cpuinfo lists them): a destination that lacks one refuses.
        #[serde(default)]
        cpu_flags: Vec<String>,
        /// A container whose root file system comes along (files streams follow).
        #[serde(default)]
        rootfs: bool,
    },
    /// Destination: go on.
    Ready,
    /// Destination: will not take it (nothing was frozen yet).
    Refused { reason: String },
    /// Source: these paths (relative to the root file system) are gone since the last
    /// files stream; part of the stream that [`Message::FilesEnd`] ends.
    Removed { paths: Vec<String> },
    /// Source: a files stream (a tar stream, then the paths gone) is complete.
    FilesEnd,
    /// Source: pre-copy rounds follow, in pages frames, of memory this many bytes long (a
    /// VM's guest memory, a multiple of the page size).
    Memory { bytes: u64 },
    /// Source: the ranges and pages frames that follow are of this process (its PID as the
    /// image names it).
    Process { pid: i32 },
    /// Source: the image is complete. `bytes` image bytes and `pages` bytes of pages frames
    /// (their payloads) were sent; `blake3` hashes both, as sent.
    ImageEnd {
        bytes: u64,
        #[serde(default)]
        pages: u64,
        /// Bytes of files frames.
        #[serde(default)]
        files: u64,
        blake3: String,
    },
    /// Destination: the workload is built, verified and held stopped (its PID there).
    Held { pid: i32 },
    /// Destination: building it failed; nothing of it is left there.
    Failed { reason: String },
    /// Source: the destination's copy is now the workload.
    Commit,
    /// Destination: it runs.
    Resumed,
    /// Source: it gives up before `commit`; the destination discards what it holds.
    Abort { reason: String },
}

/// One frame read off the connection.
#[derive(Debug)]
pub enum Frame {
    Control(Message),
    Image(Vec<u8>),
    /// A pages frame's payload (its address still in front; see [`pages_of`]).
    Pages(Vec<u8>),
    Files(Vec<u8>),
    /// A ranges frame's payload (see [`ranges_of`]).
    Ranges(Vec<u8>),
}

/// The address and pages of a pages frame's payload (whole pages, at least one, at a
/// page-aligned address), or why not.
pub fn pages_of(payload: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    let bad = || ProtocolError::BadFrame(format!("a pages frame of {} bytes", payload.len()));
    let (head, data) = payload.split_at_checked(8).ok_or_else(bad)?;
    let addr = u64::from_le_bytes(head.try_into().map_err(|_| bad())?);
    if data.is_empty() || !(data.len() as u64).is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE) {
        return Err(bad());
    }
    Ok((addr, data))
}

/// What a ranges frame says: [`RANGES_MAPPINGS`] or [`RANGES_ZERO`], and its ranges
/// (page-aligned, non-empty, ascending and apart), or why it cannot be taken.
pub fn ranges_of(payload: &[u8]) -> Result<(u8, Vec<(u64, u64)>), ProtocolError> {
    let bad = |why: &str| ProtocolError::BadFrame(format!("a ranges frame: {why}"));
    let (&op, pairs) = payload.split_first().ok_or_else(|| bad("empty"))?;
    if op != RANGES_MAPPINGS && op != RANGES_ZERO {
        return Err(bad(&format!("unknown kind {op}")));
    }
    if pairs.len() % 16 != 0 {
        return Err(bad(&format!("{} bytes of pairs", pairs.len())));
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(pairs.len() / 16);
    for pair in pairs.chunks_exact(16) {
        let (a, b) = pair.split_at(8);
        let start = u64::from_le_bytes(a.try_into().map_err(|_| bad("a start"))?);
        let end = u64::from_le_bytes(b.try_into().map_err(|_| bad("an end"))?);
        if start >= end || !start.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
            return Err(bad(&format!("range {start:#x}-{end:#x}")));
        }
        if out.last().is_some_and(|&(_, e)| e > start) {
            return Err(bad(&format!(
                "range {start:#x}-{end:#x} overlaps or precedes the one before"
            )));
        }
        out.push((start, end));
    }
    Ok((op, out))
}

/// The payload of a ranges frame of kind `op`.
pub fn ranges_payload(op: u8, ranges: &[(u64, u64)], out: &mut Vec<u8>) {
    out.clear();
    out.push(op);
    for &(s, e) in ranges {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
    }
}

/// The payload of a pages frame for `data` (whole pages) at `addr`.
pub fn pages_payload(addr: u64, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(data);
}

/// Why the peer could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer sent a bad frame: {0}")]
    BadFrame(String),
    #[error("the peer sent {got} where {expected} was expected")]
    Unexpected { got: String, expected: &'static str },
}

/// Writes one control frame.
pub fn send(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(m).map_err(|e| ProtocolError::BadFrame(e.to_string()))?;
    write_frame(w, FRAME_CONTROL, &body)?;
    w.flush()?;
    Ok(())
}

/// Writes one frame (its payload within the type's bound).
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n <= MAX_IMAGE_FRAME)
        .ok_or_else(|| io::Error::other("frame payload too large"))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)
}

/// Reads one frame, every length bounded before anything is allocated.
pub fn recv(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let max = match header[0] {
        FRAME_CONTROL => MAX_CONTROL,
        FRAME_IMAGE | FRAME_PAGES | FRAME_FILES | FRAME_RANGES => MAX_IMAGE_FRAME,
        t => return Err(ProtocolError::BadFrame(format!("unknown frame type {t}"))),
    };
    if len > max {
        return Err(ProtocolError::BadFrame(format!(
            "a frame of type {} says {len} bytes (at most {max})",
            header[0]
        )));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            ProtocolError::BadFrame("the connection ended inside a frame".into())
        }
        _ => e.into(),
    })?;
    Ok(match header[0] {
        FRAME_CONTROL => Frame::Control(
            serde_json::from_slice(&payload)
                .map_err(|e| ProtocolError::BadFrame(format!("a control message: {e}")))?,
        ),
        FRAME_PAGES => Frame::Pages(payload),
        FRAME_FILES => Frame::Files(payload),
        FRAME_RANGES => Frame::Ranges(payload),
        _ => Frame::Image(payload),
    })
}

/// Reads one control message (an image frame here is a protocol error).
pub fn recv_control(r: &mut impl Read, expected: &'static str) -> Result<Message, ProtocolError> {
    match recv(r)? {
        Frame::Control(m) => Ok(m),
        Frame::Image(_) => Err(ProtocolError::Unexpected {
            got: "image bytes".into(),
            expected,
        }),
        Frame::Pages(_) => Err(ProtocolError::Unexpected {
            got: "pages".into(),
            expected,
        }),
        Frame::Files(_) => Err(ProtocolError::Unexpected {
            got: "files".into(),
            expected,
        }),
        Frame::Ranges(_) => Err(ProtocolError::Unexpected {
            got: "ranges".into(),
            expected,
        }),
    }
}

/// What a message is called in errors.
pub fn name_of(m: &Message) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_else(|| "a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_frames_are_refused() {
        let mut buf = Vec::new();
        send(&mut buf, &Message::Held { pid: 7 }).expect("send");
        write_frame(&mut buf, FRAME_IMAGE, b"abc").expect("image");
        let mut r = &buf[..];
        assert!(matches!(
            recv(&mut r),
            Ok(Frame::Control(Message::Held { pid: 7 }))
        ));
        assert!(matches!(recv(&mut r), Ok(Frame::Image(b)) if b == b"abc"));
        assert!(matches!(recv(&mut r), Err(ProtocolError::Closed)));

        let huge = [FRAME_IMAGE, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            recv(&mut &huge[..]),
            Err(ProtocolError::BadFrame(_))
        ));
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(matches!(
            recv(&mut &unknown[..]),
            Err(ProtocolError::BadFrame(_))
        ));
        let short = [FRAME_CONTROL, 10, 0, 0, 0, b'{'];
        assert!(matches!(
            recv(&mut &short[..]),
            Err(ProtocolError::BadFrame(_))
        ));
        let mut pages = Vec::new();
        pages_payload(8192, &[1u8; 4096], &mut pages);
        assert!(matches!(pages_of(&pages), Ok((8192, d)) if d.len() == 4096));
        for bad in [&pages[..8], &pages[..100], &[0u8; 3][..]] {
            assert!(pages_of(bad).is_err(), "{} bytes taken", bad.len());
        }
        pages_payload(100, &[1u8; 4096], &mut pages);
        assert!(pages_of(&pages).is_err(), "an unaligned address was taken");
        let mut ranges = Vec::new();
        ranges_payload(RANGES_ZERO, &[(4096, 8192), (16384, 32768)], &mut ranges);
        assert!(matches!(ranges_of(&ranges), Ok((RANGES_ZERO, r)) if r.len() == 2));
        for bad in [
            &[(8192u64, 4096u64)][..],
            &[(4096, 8192), (4096, 12288)],
            &[(100, 8192)],
            &[(4096, 4096)],
        ] {
            ranges_payload(RANGES_MAPPINGS, bad, &mut ranges);
            assert!(ranges_of(&ranges).is_err(), "{bad:?} taken");
        }
        assert!(ranges_of(&[7]).is_err() && ranges_of(&[]).is_err() && ranges_of(&[1, 0]).is_err());
        let mut not_json = vec![FRAME_CONTROL, 3, 0, 0, 0];
        not_json.extend_from_slice(b"xyz");
        assert!(matches!(
            recv(&mut &not_json[..]),
            Err(ProtocolError::BadFrame(_))
        ));
    }
}
