//! The built-in demo guest: its code (runtime/guest/demo.S, assembled into this crate), the
//! loader that places it and starts every vCPU in ring 3 through a one-instruction ring-0
//! stub, and the host's model of its workload, which checks every report it makes.
//!
//! With N vCPUs the work area is split into N disjoint slices of consecutive pages (the
//! first `pages % N` slices one page longer), one per vCPU, so together they cover it all.
//! vCPU i has its own iretq frame on the ring-0 stack ([`RING0_FRAME_STRIDE`] apart) and its
//! own ring-3 stack ([`RING3_STACK_STRIDE`] apart); vCPU 0's are where a one-vCPU guest's
//! always were. They share the GDT and the one TSS: the guest never enters ring 0 from ring
//! 3 (no IDT, no interrupts), so the TSS is only read, for its I/O permission bitmap.

use super::memory::GuestMemory;
use super::vm::{self, Vm};
use super::KvmError;
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;

std::arch::global_asm!(include_str!("../../guest/demo.S"));

extern "C" {
    static stasis_demo_start: u8;
    static stasis_demo_ring3: u8;
    static stasis_demo_end: u8;
}

/// Default number of steps between two reports.
pub const REPORT_EVERY: u64 = 1 << 14;

/// The multiplier of the guest's pattern.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The guest's machine code and the offset of its ring-3 entry in it.
pub fn code() -> (&'static [u8], u64) {
    // The three symbols are labels of the one block in demo.S, in this order, in a
    // read-only section of this binary; only their addresses are taken.
    let (start, ring3, end) = (
        std::ptr::addr_of!(stasis_demo_start) as usize,
        std::ptr::addr_of!(stasis_demo_ring3) as usize,
        std::ptr::addr_of!(stasis_demo_end) as usize,
    );
    // SAFETY: [start, end) is the assembled block, immutable for the program's life.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    (bytes, (ring3 - start) as u64)
}

/// What the demo guest is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct DemoConfig {
    /// Steps between reports (> 0).
    pub report_every: u64,
    /// Stop after this many steps (0: run until stopped).
    pub steps: u64,
    /// Iterations of an empty loop before each step (0: none).
    pub step_delay: u64,
}

/// The most vCPUs the demo guest runs (its stacks are laid out for this many).
pub const MAX_VCPUS: u32 = 8;
/// Distance between two vCPUs' iretq frames on the ring-0 stack.
const RING0_FRAME_STRIDE: u64 = 0x800;
/// Distance between two vCPUs' ring-3 stack tops.
const RING3_STACK_STRIDE: u64 = 0x2000;

/// Number of work-area pages of a VM with `mem_size` bytes.
pub fn work_pages(mem_size: u64) -> u64 {
    mem_size.saturating_sub(vm::WORK_ADDR) / 4096
}

/// vCPU `i`'s slice of the work area of a VM with `mem_size` bytes and `n` vCPUs:
/// (guest-physical base, pages).
pub fn slice(mem_size: u64, n: u32, i: u32) -> (u64, u64) {
    let (n, i) = (u64::from(n.max(1)), u64::from(i));
    let total = work_pages(mem_size);
    let (each, extra) = (total / n, total % n);
    let first = i * each + i.min(extra);
    (vm::WORK_ADDR + first * 4096, each + u64::from(i < extra))
}

/// Loads the guest into `vm`'s memory and sets up each of `vcpus` (vCPU i at index i) to
/// start it on its own slice.
pub fn load(vm: &Vm, vcpus: &[VcpuFd], cfg: &DemoConfig) -> Result<(), KvmError> {
    let (code, ring3) = code();
    if code.len() as u64 > vm::CODE_MAX || !vm.mem.write(vm::CODE_ADDR, code) {
        return Err(KvmError::invalid(&vm.name, "the demo guest does not fit"));
    }
    let n = u32::try_from(vcpus.len()).unwrap_or(u32::MAX);
    if !(1..=MAX_VCPUS).contains(&n) {
        return Err(KvmError::invalid(
            &vm.name,
            format!("the demo guest runs 1 to {MAX_VCPUS} vCPUs, not {n}"),
        ));
    }
    if work_pages(vm.mem.size()) < u64::from(n) || cfg.report_every == 0 {
        return Err(KvmError::invalid(
            &vm.name,
            "the demo guest needs a work page per vCPU and a report interval",
        ));
    }
    vm.build_tables()?;
    for (i, vcpu) in (0..n).zip(vcpus) {
        vm.enter_long_mode(vcpu)?;
        let (base, pages) = slice(vm.mem.size(), n, i);
        // The iretq frame on the ring-0 stack: RIP, CS, RFLAGS, RSP, SS.
        let frame = vm::RING0_STACK_TOP - u64::from(i) * RING0_FRAME_STRIDE - 5 * 8;
        let words = [
            vm::CODE_ADDR + ring3,
            u64::from(vm::SEL_USER_CS),
            vm::RFLAGS_IOPL3,
            vm::RING3_STACK_TOP - u64::from(i) * RING3_STACK_STRIDE,
            u64::from(vm::SEL_USER_DS),
        ];
        for (k, w) in words.iter().enumerate() {
            if !vm.mem.write_u64(frame + 8 * k as u64, *w) {
                return Err(KvmError::invalid(&vm.name, "no room for the ring-0 stack"));
            }
        }
        let regs = kvm_regs {
            rip: vm::CODE_ADDR,
            rsp: frame,
            rflags: 0x2,
            r10: u64::from(i),
            r12: base,
            r13: pages,
            r14: cfg.steps,
            r15: cfg.report_every,
            r9: cfg.report_every,
            r8: cfg.step_delay,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| KvmError::ioctl(&vm.name, "KVM_SET_REGS", e))?;
    }
    Ok(())
}

/// The host's model of the guest's workload: from the counter alone it knows the checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub pages: u64,
    pub counter: u64,
    pub checksum: u64,
}

impl Model {
    pub fn new(pages: u64) -> Self {
        Model {
            pages,
            counter: 0,
            checksum: 0,
        }
    }

    /// The value step `c` writes (first word of its page).
    fn value(c: u64) -> u64 {
        c.wrapping_add(1).wrapping_mul(GOLDEN)
    }

    /// Advances the model to `counter` (which must not be behind it).
    pub fn advance_to(&mut self, counter: u64) {
        while self.counter < counter {
            let c = self.counter;
            let old = if c >= self.pages {
                Self::value(c - self.pages)
            } else {
                0
            };
            self.checksum = self.checksum.rotate_left(7) ^ old ^ Self::value(c);
            self.counter += 1;
        }
    }

    /// What page `p` of the work area holds in word `j` after the model's steps (for
    /// checking guest memory directly).
    pub fn word(&self, p: u64, j: u64) -> u64 {
        if self.counter <= p {
            return 0;
        }
        let last = p + (self.counter - 1 - p) / self.pages * self.pages;
        Self::value(last).wrapping_add(j)
    }

    /// Checks the slice at `base` of `mem` against the model: the first mismatching page.
    pub fn check_memory(&self, mem: &GuestMemory, slice: u64) -> Option<u64> {
        (0..self.pages).find(|&p| {
            let base = slice + p * 4096;
            mem.read_u64(base) != Some(self.word(p, 0))
                || mem.read_u64(base + 4088) != Some(self.word(p, 511))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_assembled() {
        let (code, ring3) = code();
        assert_eq!(code[0..2], [0x48, 0xcf], "the entry is iretq");
        assert!(ring3 > 0 && (ring3 as usize) < code.len());
        assert!(code.windows(20).any(|w| w == b"stasis demo guest up"));
    }

    #[test]
    fn model_words_follow_the_steps() {
        let mut m = Model::new(3);
        m.advance_to(7);
        assert_eq!(m.word(0, 0), Model::value(6));
        assert_eq!(m.word(1, 5), Model::value(4).wrapping_add(5));
        assert_eq!(m.word(2, 0), Model::value(5));
        let mut n = Model::new(3);
        n.advance_to(3);
        n.advance_to(7);
        assert_eq!(m, n);
    }

    #[test]
    fn slices_split_the_work_area() {
        let mem = 16 << 20;
        assert_eq!(slice(mem, 1, 0), (vm::WORK_ADDR, work_pages(mem)));
        let total = work_pages(10 << 20);
        let mut next = vm::WORK_ADDR;
        for i in 0..7 {
            let (base, pages) = slice(10 << 20, 7, i);
            assert_eq!(base, next, "slice {i} follows the one before");
            assert!(pages == total / 7 || pages == total / 7 + 1);
            next = base + pages * 4096;
        }
        assert_eq!(next, vm::WORK_ADDR + total * 4096, "they cover it all");
    }

    #[test]
    fn memory_check_finds_a_stale_page() {
        let mem = GuestMemory::new("t", 2 << 20).expect("memfd");
        let mut m = Model::new(work_pages(mem.size()));
        assert_eq!(m.pages, 256);
        assert_eq!(
            m.check_memory(&mem, vm::WORK_ADDR),
            None,
            "fresh memory is all zero"
        );
        m.advance_to(600);
        for p in 0..m.pages {
            for j in [0, 511] {
                assert!(mem.write_u64(vm::WORK_ADDR + p * 4096 + j * 8, m.word(p, j)));
            }
        }
        assert_eq!(m.check_memory(&mem, vm::WORK_ADDR), None);
        assert!(mem.write_u64(vm::WORK_ADDR + 7 * 4096, Model::value(7)));
        assert_eq!(m.check_memory(&mem, vm::WORK_ADDR), Some(7));
    }
}
