//! The demo guest's report device: four 32-bit registers at ports 0x700..0x70f (counter
//! low, counter high, checksum low, checksum high; writing the last commits a report), the
//! shutdown port 0x710 and the index port 0x714. Every committed report is checked against
//! the host's model of the workload: the counter must have advanced by exactly the report
//! interval (or reached the step limit) and the checksum must be the model's.
//!
//! Each vCPU has a device of its own (the VMM knows which vCPU made an I/O exit), with its
//! own model of that vCPU's slice of the work area. A guest names its vCPU on the index port
//! before each report; a report whose index is not the device's vCPU is an error. Guests
//! started before multi-vCPU support (restored from older images) never write the index
//! port, so a report without one is accepted.

use super::demo::Model;
use super::vm;
use serde::{Deserialize, Serialize};

pub const REPORT_PORT: u16 = 0x700;
pub const SHUTDOWN_PORT: u16 = 0x710;
pub const INDEX_PORT: u16 = 0x714;

/// The device's registers and what it has seen.
#[derive(Debug, Clone)]
pub struct ReportDevice {
    /// The vCPU whose reports this device checks.
    pub index: u32,
    latch: [u32; 4],
    /// The index the guest wrote for the report being latched (not kept in snapshots: a
    /// report split by a snapshot goes unchecked for its index, nothing worse).
    index_latch: Option<u32>,
    /// Guest-physical base of the vCPU's work slice.
    base: u64,
    model: Model,
    every: u64,
    limit: u64,
    pub reports: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The report device's registers and the host's model, for a snapshot: a restored device
/// expects exactly the counter and checksum that come next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportState {
    pub latch: [u32; 4],
    /// Guest-physical base of the vCPU's work slice; 0 (images of one vCPU written before
    /// multi-vCPU support) means the whole work area at [`super::vm::WORK_ADDR`].
    #[serde(default)]
    pub base: u64,
    pub pages: u64,
    pub counter: u64,
    pub checksum: u64,
    pub every: u64,
    pub limit: u64,
    pub reports: u64,
    pub errors: u64,
}

impl ReportDevice {
    pub fn state(&self) -> ReportState {
        ReportState {
            latch: self.latch,
            base: self.base,
            pages: self.model.pages,
            counter: self.model.counter,
            checksum: self.model.checksum,
            every: self.every,
            limit: self.limit,
            reports: self.reports,
            errors: self.errors,
        }
    }

    /// The device as saved (its error count carries over: a restored VM that had errors
    /// still reports them).
    pub fn from_state(index: u32, s: &ReportState) -> Self {
        ReportDevice {
            index,
            latch: s.latch,
            index_latch: None,
            base: if s.base == 0 { vm::WORK_ADDR } else { s.base },
            model: Model {
                pages: s.pages,
                counter: s.counter,
                checksum: s.checksum,
            },
            every: s.every.max(1),
            limit: s.limit,
            reports: s.reports,
            errors: s.errors,
            last_error: None,
        }
    }

    /// The device of vCPU `index`, whose slice is `pages` pages at `base`.
    pub fn new(index: u32, base: u64, pages: u64, every: u64, limit: u64) -> Self {
        ReportDevice {
            index,
            latch: [0; 4],
            index_latch: None,
            base,
            model: Model::new(pages),
            every,
            limit,
            reports: 0,
            errors: 0,
            last_error: None,
        }
    }

    pub fn handles(port: u16) -> bool {
        (REPORT_PORT..REPORT_PORT + 16).contains(&port) || port == INDEX_PORT
    }

    /// The counter and checksum of the last report.
    pub fn last(&self) -> (u64, u64) {
        (self.model.counter, self.model.checksum)
    }

    /// The host's model of the workload at the last report.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Guest-physical base of the vCPU's work slice.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Records an error found outside a report (e.g. in guest memory).
    pub fn error(&mut self, what: String) {
        self.errors += 1;
        self.last_error = Some(what);
    }

    /// A write of `data` to `port`; returns true when it committed a report.
    pub fn write(&mut self, port: u16, data: &[u8]) -> bool {
        let reg = usize::from((port - REPORT_PORT) / 4);
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            self.error(format!("a {}-byte write to port {port:#x}", data.len()));
            return false;
        };
        if port == INDEX_PORT {
            self.index_latch = Some(u32::from_le_bytes(word));
            return false;
        }
        if !port.is_multiple_of(4) || reg >= 4 {
            self.error(format!("a write to unaligned port {port:#x}"));
            return false;
        }
        self.latch[reg] = u32::from_le_bytes(word);
        if reg != 3 {
            return false;
        }
        let counter = u64::from(self.latch[0]) | (u64::from(self.latch[1]) << 32);
        let checksum = u64::from(self.latch[2]) | (u64::from(self.latch[3]) << 32);
        if let Some(i) = self.index_latch.take() {
            if i != self.index {
                self.error(format!(
                    "report {}: vCPU {} reported as vCPU {i}",
                    self.reports + 1,
                    self.index
                ));
            }
        }
        self.commit(counter, checksum);
        true
    }

    fn commit(&mut self, counter: u64, checksum: u64) {
        self.reports += 1;
        let prev = self.model.counter;
        let expected = prev.saturating_add(self.every);
        let at_limit = self.limit != 0 && counter == self.limit && counter > prev;
        if counter != expected && !(at_limit && counter < expected) {
            self.error(format!(
                "report {}: counter {counter} after {prev}, expected {expected}",
                self.reports
            ));
            if counter < prev {
                // Steps were repeated: recompute from the start.
                self.model = Model::new(self.model.pages);
            }
        }
        self.model.advance_to(counter);
        if self.model.checksum != checksum {
            self.error(format!(
                "report {}: checksum {checksum:#018x} at counter {counter}, expected {:#018x}",
                self.reports, self.model.checksum
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(d: &mut ReportDevice, counter: u64, checksum: u64) -> bool {
        let words = [counter as u32, (counter >> 32) as u32, checksum as u32];
        for (i, w) in words.iter().enumerate() {
            assert!(!d.write(REPORT_PORT + 4 * i as u16, &w.to_le_bytes()));
        }
        d.write(REPORT_PORT + 12, &((checksum >> 32) as u32).to_le_bytes())
    }

    #[test]
    fn checks_counter_and_checksum() {
        let mut truth = Model::new(5);
        let mut d = ReportDevice::new(0, vm::WORK_ADDR, 5, 4, 10);
        truth.advance_to(4);
        assert!(report(&mut d, 4, truth.checksum));
        truth.advance_to(8);
        assert!(report(&mut d, 8, truth.checksum));
        truth.advance_to(10);
        assert!(report(&mut d, 10, truth.checksum), "the limit ends early");
        assert_eq!((d.reports, d.errors), (3, 0));

        let mut d = ReportDevice::new(0, vm::WORK_ADDR, 5, 4, 0);
        assert!(report(&mut d, 4, 1234));
        assert_eq!(d.errors, 1, "bad checksum");
        truth = Model::new(5);
        truth.advance_to(12);
        report(&mut d, 12, truth.checksum);
        assert_eq!(d.errors, 2, "a skipped report's steps are an error");
        truth = Model::new(5);
        truth.advance_to(4);
        report(&mut d, 4, truth.checksum);
        assert_eq!(d.errors, 3, "repeated steps are an error");
        truth.advance_to(8);
        report(&mut d, 8, truth.checksum);
        assert_eq!(d.errors, 3, "and it resynchronizes");
    }

    #[test]
    fn a_report_names_its_vcpu() {
        let mut truth = Model::new(5);
        let mut d = ReportDevice::new(2, vm::WORK_ADDR, 5, 4, 0);
        truth.advance_to(4);
        assert!(!d.write(INDEX_PORT, &2u32.to_le_bytes()));
        assert!(report(&mut d, 4, truth.checksum));
        assert_eq!(d.errors, 0, "its own index");
        truth.advance_to(8);
        assert!(report(&mut d, 8, truth.checksum));
        assert_eq!(d.errors, 0, "no index (an older guest): accepted");
        truth.advance_to(12);
        assert!(!d.write(INDEX_PORT, &1u32.to_le_bytes()));
        assert!(report(&mut d, 12, truth.checksum));
        assert_eq!(d.errors, 1, "another vCPU's index");
        let back = ReportDevice::from_state(2, &d.state());
        assert_eq!((back.base(), back.last()), (vm::WORK_ADDR, d.last()));
    }
}
