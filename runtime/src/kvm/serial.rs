//! A 16550A UART on the I/O ports (COM1 at 0x3f8), without interrupts (PVM delivers none to
//! a guest that is not PVM-aware): the guest polls LSR. What the guest transmits goes to
//! every sink (the console log, the foreground terminal); bytes queued with [`Serial::input`]
//! are what it receives.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;

/// COM1's base port.
pub const COM1: u16 = 0x3f8;

const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;
const IIR_NONE: u8 = 0x01;
const IIR_FIFO: u8 = 0xc0;
const MSR_DCD_DSR_CTS: u8 = 0xb0;

/// One UART's registers and where its output goes.
pub struct Serial {
    pub base: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fcr: u8,
    dll: u8,
    dlm: u8,
    rx: VecDeque<u8>,
    sinks: Vec<Box<dyn Write + Send>>,
    /// Bytes the guest has transmitted.
    pub transmitted: u64,
}

/// A UART's registers and the bytes queued for the guest, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub base: u16,
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub fcr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// Received bytes the guest has not read yet.
    pub rx: Vec<u8>,
    pub transmitted: u64,
}

impl Serial {
    /// The registers and buffered bytes (the sinks are the host's, not saved).
    pub fn state(&self) -> SerialState {
        SerialState {
            base: self.base,
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            scr: self.scr,
            fcr: self.fcr,
            dll: self.dll,
            dlm: self.dlm,
            rx: self.rx.iter().copied().collect(),
            transmitted: self.transmitted,
        }
    }

    /// A UART as saved, writing to `sinks`.
    pub fn from_state(s: &SerialState, sinks: Vec<Box<dyn Write + Send>>) -> Self {
        Serial {
            base: s.base,
            ier: s.ier & 0x0f,
            lcr: s.lcr,
            mcr: s.mcr & 0x1f,
            scr: s.scr,
            fcr: s.fcr,
            dll: s.dll,
            dlm: s.dlm,
            rx: s.rx.iter().copied().collect(),
            sinks,
            transmitted: s.transmitted,
        }
    }

    pub fn new(base: u16, sinks: Vec<Box<dyn Write + Send>>) -> Self {
        Serial {
            base,
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scr: 0,
            fcr: 0,
            dll: 0x0c, // 9600 baud
            dlm: 0,
            rx: VecDeque::new(),
            sinks,
            transmitted: 0,
        }
    }

    /// Whether `port` is one of this UART's eight registers.
    pub fn handles(&self, port: u16) -> bool {
        port.wrapping_sub(self.base) < 8
    }

    /// Queues bytes for the guest to receive.
    pub fn input(&mut self, bytes: &[u8]) {
        self.rx.extend(bytes);
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// The guest wrote `v` to `port`. A sink that fails is dropped (a closed terminal must
    /// not stop the guest).
    pub fn write(&mut self, port: u16, v: u8) {
        match port.wrapping_sub(self.base) {
            0 if self.dlab() => self.dll = v,
            0 => {
                self.transmitted += 1;
                self.sinks
                    .retain_mut(|s| s.write_all(&[v]).and_then(|_| s.flush()).is_ok());
            }
            1 if self.dlab() => self.dlm = v,
            1 => self.ier = v & 0x0f,
            2 => self.fcr = v,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {} // LSR and MSR are read-only
        }
    }

    /// The guest read `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port.wrapping_sub(self.base) {
            0 if self.dlab() => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if self.dlab() => self.dlm,
            1 => self.ier,
            2 => IIR_NONE | if self.fcr & 1 != 0 { IIR_FIFO } else { 0 },
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
            6 => MSR_DCD_DSR_CTS,
            7 => self.scr,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_receive_and_divisor() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut s = Serial::new(COM1, vec![Box::new(Buf(out.clone()))]);
        assert!(s.handles(0x3ff) && !s.handles(0x400) && !s.handles(0x3f7));
        for b in b"hi" {
            s.write(COM1, *b);
        }
        assert_eq!(*out.lock().expect("lock"), b"hi");
        assert_eq!(s.read(COM1 + 5) & LSR_DR, 0);
        s.input(b"x");
        assert_eq!(s.read(COM1 + 5) & (LSR_DR | LSR_THRE), LSR_DR | LSR_THRE);
        assert_eq!(s.read(COM1), b'x');
        s.write(COM1 + 3, 0x83);
        s.write(COM1, 1);
        s.write(COM1 + 3, 0x03);
        assert_eq!(s.transmitted, 2);
        s.write(COM1 + 3, 0x83);
        assert_eq!(s.read(COM1), 1);
        s.input(b"yz");
        let saved = s.state();
        let mut t = Serial::from_state(&saved, Vec::new());
        assert_eq!(t.state(), saved);
        assert_eq!(t.read(COM1), 1, "DLAB is still set");
        t.write(COM1 + 3, 0x03);
        assert_eq!((t.read(COM1), t.read(COM1)), (b'y', b'z'));
    }
}
