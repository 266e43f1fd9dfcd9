//! The migration wire protocol, version 1: everything that crosses the connection between
//! `stasis migrate` (the source) and `stasis receive` (the destination) is defined here.
//!
//! # Frames
//! Every frame is a 5-byte header, then its payload:
//! - byte 0: the frame type, [`FRAME_CONTROL`] or [`FRAME_IMAGE`];
//! - bytes 1..5: the payload length, little-endian u32, at most [`MAX_CONTROL`] for a
//!   control frame and [`MAX_IMAGE_FRAME`] for an image frame. A longer length, an unknown
//!   type, or a connection that ends inside a frame is a protocol error: the peer is dropped.
//!
//! A control frame carries one [`Message`] as JSON (`{"type": "hello", ...}`). An image
//! frame carries the next bytes of the workload's image, in stasis's image format exactly as
//! `stasis checkpoint` writes it to a stream: the receiver stores them and then opens them
//! with the same reader (magic, version, bounded lengths, hashes) that protects `restore`.
//!
//! # Conversation
//! ```text
//! source                                destination
//! hello {protocol, version, workload,
//!        cpu_flags}                    ->
//!                                      <- ready | refused {reason}
//! (freezes the workload)
//! image frames ...                     ->  (stored, bounded)
//! image-end {bytes, blake3}            ->  (checked, verified, built, held stopped)
//!                                      <- held {pid} | failed {reason}
//! commit                               ->  (resumes it)
//!                                      <- resumed
//! (discards its copy)
//! ```
//! Before `commit` either side may give up: the source sends `abort {reason}` (or just
//! goes away) and resumes its workload; the destination sends `failed` or `refused` (or
//! goes away) and leaves nothing behind. After `commit` the source never resumes its copy:
//! without `resumed` it keeps it stopped and says so (the operator settles it).

use serde::{Deserialize, Serialize};
use stasis_workload::Kind;
use std::io::{self, Read, Write};

/// The protocol's name, in `hello`.
pub const PROTOCOL: &str = "stasis-migrate";
/// The protocol's version, in `hello`; a receiver refuses any other.
pub const VERSION: u32 = 1;
/// A frame carrying a [`Message`].
pub const FRAME_CONTROL: u8 = 1;
/// A frame carrying image bytes.
pub const FRAME_IMAGE: u8 = 2;
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
    },
    /// Destination: go on.
    Ready,
    /// Destination: will not take it (nothing was frozen yet).
    Refused { reason: String },
    /// Source: the image is complete.
    ImageEnd { bytes: u64, blake3: String },
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
        FRAME_IMAGE => MAX_IMAGE_FRAME,
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
        let mut not_json = vec![FRAME_CONTROL, 3, 0, 0, 0];
        not_json.extend_from_slice(b"xyz");
        assert!(matches!(
            recv(&mut &not_json[..]),
            Err(ProtocolError::BadFrame(_))
        ));
    }
}
