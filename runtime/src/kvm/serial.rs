//! A 16550A UART on the I/O ports (COM1 at 0x3f8). What the guest transmits goes to every
//! sink (the console log, the foreground terminal); bytes queued with [`Serial::input`] are
//! what it receives. Its interrupt (IRQ 4 on a PC) is raised through [`Serial::set_irq`]
//! when the guest enabled it in IER and data is ready or the transmitter is empty, as
//! Linux's 8250 driver needs; the demo guest (under PVM, which delivers no interrupts to it)
//! polls LSR instead. Loopback (MCR bit 4) sends transmitted bytes back to the receiver and
//! mirrors MCR in MSR, as the 8250 driver's probe expects.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;

/// COM1's base port.
pub const COM1: u16 = 0x3f8;

/// The IRQ of COM1 on a PC.
pub const COM1_IRQ: u32 = 4;
/// Received bytes kept for the guest at most; more are dropped (an overrun).
pub const RX_MAX: usize = 64 << 10;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const FCR_CLEAR_RX: u8 = 0x02;
const MCR_LOOP: u8 = 0x10;
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
    /// A transmitter-empty interrupt is pending (cleared by reading IIR or writing THR).
    thri: bool,
    sinks: Vec<Box<dyn Write + Send>>,
    /// Bytes the guest has transmitted.
    pub transmitted: u64,
    irq: Option<IrqLine>,
    irq_level: bool,
}

/// Sets the UART's interrupt line to a level.
pub type IrqLine = Box<dyn FnMut(bool) + Send>;

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
            // Not in the snapshot: raised again if enabled (a spurious THRI is harmless
            // to a driver, a lost one stalls its output).
            thri: s.ier & IER_THRI != 0,
            sinks,
            transmitted: s.transmitted,
            irq: None,
            irq_level: false,
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
            thri: false,
            sinks,
            transmitted: 0,
            irq: None,
            irq_level: false,
        }
    }

    /// Whether `port` is one of this UART's eight registers.
    pub fn handles(&self, port: u16) -> bool {
        port.wrapping_sub(self.base) < 8
    }

    /// Connects the interrupt line (low until now) and raises it if an interrupt is pending.
    pub fn set_irq(&mut self, irq: IrqLine) {
        self.irq = Some(irq);
        self.irq_level = false;
        self.update_irq();
    }

    /// Queues bytes for the guest to receive (beyond [`RX_MAX`] they are dropped).
    pub fn input(&mut self, bytes: &[u8]) {
        let room = RX_MAX.saturating_sub(self.rx.len());
        self.rx.extend(&bytes[..bytes.len().min(room)]);
        self.update_irq();
    }

    /// Bytes received and not yet read by the guest.
    pub fn rx_pending(&self) -> usize {
        self.rx.len()
    }

    /// The interrupt identification: the highest-priority pending source, if any.
    fn pending_source(&self) -> Option<u8> {
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            Some(IIR_RDI)
        } else if self.ier & IER_THRI != 0 && self.thri {
            Some(IIR_THRI)
        } else {
            None
        }
    }

    /// Whether the interrupt line is raised.
    pub fn irq_pending(&self) -> bool {
        self.pending_source().is_some()
    }

    fn update_irq(&mut self) {
        let level = self.irq_pending();
        if level != self.irq_level {
            self.irq_level = level;
            if let Some(irq) = self.irq.as_mut() {
                irq(level);
            }
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// The guest wrote `v` to `port`. A sink that fails is dropped (a closed terminal must
    /// not stop the guest).
    pub fn write(&mut self, port: u16, v: u8) {
        match port.wrapping_sub(self.base) {
            0 if self.dlab() => self.dll = v,
            0 if self.mcr & MCR_LOOP != 0 => {
                self.input(&[v]);
                self.thri = true;
            }
            0 => {
                self.transmitted += 1;
                self.sinks
                    .retain_mut(|s| s.write_all(&[v]).and_then(|_| s.flush()).is_ok());
                // The byte is gone at once: the transmitter is empty again.
                self.thri = true;
            }
            1 if self.dlab() => self.dlm = v,
            1 => {
                let enabled = v & 0x0f;
                if (enabled ^ self.ier) & IER_THRI != 0 {
                    self.thri = enabled & IER_THRI != 0;
                }
                self.ier = enabled;
            }
            2 => {
                if v & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
                self.fcr = v;
            }
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {} // LSR and MSR are read-only
        }
        self.update_irq();
    }

    /// The guest read `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        let fifo = if self.fcr & 1 != 0 { IIR_FIFO } else { 0 };
        let v = match port.wrapping_sub(self.base) {
            0 if self.dlab() => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if self.dlab() => self.dlm,
            1 => self.ier,
            2 => match self.pending_source() {
                Some(IIR_THRI) => {
                    // Reading IIR acknowledges a transmitter-empty interrupt.
                    self.thri = false;
                    IIR_THRI | fifo
                }
                Some(src) => src | fifo,
                None => IIR_NONE | fifo,
            },
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
            6 if self.mcr & MCR_LOOP != 0 => {
                // Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                let m = self.mcr;
                ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            6 => MSR_DCD_DSR_CTS,
            7 => self.scr,
            _ => 0xff,
        };
        self.update_irq();
        v
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

    /// A UART whose interrupt line is recorded.
    fn with_irq() -> (Serial, Arc<Mutex<Vec<bool>>>) {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let mut s = Serial::new(COM1, Vec::new());
        let l = levels.clone();
        s.set_irq(Box::new(move |level| {
            if let Ok(mut v) = l.lock() {
                v.push(level);
            }
        }));
        (s, levels)
    }

    #[test]
    fn receive_interrupt_follows_ier_and_data() {
        let (mut s, levels) = with_irq();
        s.input(b"ab");
        assert_eq!(s.read(COM1 + 5) & LSR_DR, LSR_DR);
        assert!(!s.irq_pending(), "IER is 0: no interrupt");
        s.write(COM1 + 1, IER_RDI);
        assert!(s.irq_pending());
        assert_eq!(s.read(COM1 + 2) & 0x0f, IIR_RDI);
        assert_eq!(s.read(COM1), b'a');
        assert!(s.irq_pending(), "one byte left");
        assert_eq!(s.read(COM1), b'b');
        assert!(!s.irq_pending());
        assert_eq!(s.read(COM1 + 2) & 0x0f, IIR_NONE);
        assert_eq!(s.read(COM1 + 5) & LSR_DR, 0);
        s.input(b"c");
        assert_eq!(*levels.lock().expect("lock"), [true, false, true]);
        s.write(COM1 + 2, 0x07);
        assert_eq!(s.rx_pending(), 0, "FCR clears the receive FIFO");
        assert!(!s.irq_pending());
    }

    #[test]
    fn transmit_interrupt_is_raised_and_acknowledged() {
        let (mut s, levels) = with_irq();
        s.write(COM1 + 1, IER_THRI);
        assert!(s.irq_pending(), "enabling THRI with THR empty interrupts");
        assert_eq!(s.read(COM1 + 2) & 0x0f, IIR_THRI);
        assert!(!s.irq_pending(), "reading IIR acknowledges it");
        s.write(COM1, b'x');
        assert!(s.irq_pending(), "THR is empty again after a write");
        s.write(COM1 + 1, 0);
        assert!(!s.irq_pending());
        assert_eq!(*levels.lock().expect("lock"), [true, false, true, false]);
        assert_eq!(s.transmitted, 1);
    }

    #[test]
    fn loopback_returns_bytes_and_mirrors_mcr() {
        let mut s = Serial::new(COM1, Vec::new());
        s.write(COM1 + 4, MCR_LOOP | 0x0a);
        assert_eq!(s.read(COM1 + 6) & 0xf0, 0x90, "what the 8250 probe checks");
        s.write(COM1, 0x55);
        assert_eq!(s.transmitted, 0);
        assert_eq!(s.read(COM1), 0x55);
    }
}
