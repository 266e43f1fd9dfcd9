//! The serial console from outside the VMM: `stasis vm console` shows the VM's log (what
//! the guest transmits) and forwards its standard input to the guest's serial receiver.
//!
//! Input goes over the control socket: the client sends the line `console-input`, the VMM
//! answers one line (a [`VmReport`]), then every byte the client sends is queued for the
//! guest ([`Serial::input`], which raises the UART's interrupt if the guest enabled it)
//! until the client closes the connection. The client detaches on [`ESCAPE`] (Ctrl-], as
//! virsh console does); the escape byte itself is not sent.

use super::serial::Serial;
use super::vmm::{running, VmRecord, VmReport};
use super::KvmError;
use crate::container::StateDir;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The byte that detaches the console: Ctrl-].
pub const ESCAPE: u8 = 0x1d;

/// The control-socket command that starts a console input stream.
pub const INPUT_COMMAND: &str = "console-input";

/// How a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user typed the escape.
    Detached,
    /// The VM ended (or, without following, the log was shown).
    VmEnded,
}

/// In the VMM: queues what the client sends for the guest until it closes the connection
/// or the VM ends (`ended`).
pub(crate) fn serve_input(
    mut conn: UnixStream,
    serial: Arc<Mutex<Serial>>,
    ended: Arc<AtomicBool>,
) {
    if conn
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while !ended.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => lock(&serial).input(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// The UART, whoever last held it (a panic while holding it leaves it usable).
pub(crate) fn lock(serial: &Mutex<Serial>) -> std::sync::MutexGuard<'_, Serial> {
    serial.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies the log of `rec` to `out`; with `follow`, keeps copying until the VM ends or
/// `detach` is set.
fn show_log(
    rec: &VmRecord,
    follow: bool,
    out: &mut dyn Write,
    detach: &AtomicBool,
) -> Result<ConsoleEnd, KvmError> {
    let name = rec.name.as_str();
    let mut f = std::fs::File::open(&rec.log)
        .map_err(|e| KvmError::sys(name, format!("open {}", rec.log.display()), e))?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| KvmError::sys(name, format!("read {}", rec.log.display()), e))?;
        if n > 0 {
            out.write_all(&buf[..n])
                .and_then(|_| out.flush())
                .map_err(|e| KvmError::sys(name, "write the console", e))?;
            continue;
        }
        if detach.load(Ordering::SeqCst) {
            return Ok(ConsoleEnd::Detached);
        }
        if !follow || !rec.alive() {
            return Ok(ConsoleEnd::VmEnded);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies a VM's console log to `out`; with `follow`, keeps copying what the guest writes
/// until the VM ends.
pub fn console(
    state: &StateDir,
    name: &str,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), KvmError> {
    show_log(&running(state, name)?, follow, out, &AtomicBool::new(false)).map(|_| ())
}

/// Opens a console input stream to a running VM.
fn open_input(rec: &VmRecord) -> Result<UnixStream, KvmError> {
    let (conn, answered) = super::vmm::command(rec, INPUT_COMMAND, Duration::from_secs(5))?;
    let _: VmReport = answered?;
    Ok(conn.into_inner())
}

/// Forwards `input` to `conn` until its end, an error, or the escape byte (then sets
/// `detach`).
fn forward(mut input: impl Read, mut conn: UnixStream, detach: &AtomicBool) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let esc = chunk.iter().position(|&b| b == ESCAPE);
        let send = &chunk[..esc.unwrap_or(n)];
        if !send.is_empty() && conn.write_all(send).is_err() {
            return;
        }
        if esc.is_some() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            detach.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// An interactive console: shows the VM's log as it grows and sends `input` to the guest,
/// until the escape byte in `input` or the VM's end. At the end of `input` (a pipe, say)
/// the output goes on until the VM ends.
pub fn attach(
    state: &StateDir,
    name: &str,
    input: impl Read + Send + 'static,
    out: &mut dyn Write,
) -> Result<ConsoleEnd, KvmError> {
    let rec = running(state, name)?;
    let conn = open_input(&rec)?;
    let detach = Arc::new(AtomicBool::new(false));
    let d = detach.clone();
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || forward(input, conn, &d))
        .map_err(|e| KvmError::sys(name, "spawn the console input thread", e))?;
    show_log(&rec, true, out, &detach)
}

/// The terminal on standard input in raw mode (every byte goes to the guest as typed),
/// put back as it was when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode if standard input is a terminal; None if it is not.
    pub fn enter() -> Result<Option<RawTerminal>, std::io::Error> {
        // SAFETY: isatty takes no pointers.
        if unsafe { libc::isatty(0) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain integers; tcgetattr fills it and its result is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios, modified in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios read by tcsetattr.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios tcgetattr returned for this terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_stops_at_the_escape() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let detach = AtomicBool::new(false);
        forward(&b"ls\n\x1dnot sent"[..], a, &detach);
        assert!(detach.load(Ordering::SeqCst));
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"ls\n");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let detach = AtomicBool::new(false);
        forward(&b"all of it"[..], a, &detach);
        assert!(
            !detach.load(Ordering::SeqCst),
            "the end of input is no escape"
        );
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"all of it");
    }

    #[test]
    fn served_input_reaches_the_receiver() {
        let serial = Arc::new(Mutex::new(Serial::new(
            super::super::serial::COM1,
            Vec::new(),
        )));
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        a.write_all(b"hello").expect("write");
        drop(a);
        serve_input(b, serial.clone(), Arc::new(AtomicBool::new(false)));
        let mut s = lock(&serial);
        assert_eq!(s.rx_pending(), 5);
        assert_eq!(s.read(super::super::serial::COM1), b'h');
    }
}
