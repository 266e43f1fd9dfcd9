//! `wl-regs`: register state across a blocking `read` syscall.
//!
//! stdin is read one byte per `read(0, buf, 1)`, each issued from one inline-asm block that
//! loads distinctive values right before the `syscall` instruction and stores them right
//! after it, with no other code in between:
//! - x87: control word `0x0f7f` (round toward zero), three 80-bit values with 64-bit
//!   mantissas (not representable as f64) on the FPU stack, and the status word (TOP);
//! - MXCSR `0xff80` (round toward zero, flush-to-zero, all exceptions masked);
//! - xmm0-15, and with AVX the full ymm0-15 (upper halves included);
//! - rbx, rbp, r12-r15 (callee-saved) and r8-r10 (preserved by the syscall ABI), and the
//!   syscall arguments rdi/rsi/rdx (the kernel preserves them; a restart rewinds to them).
//!
//! `--sse-only` uses only xmm0-15 even if the CPU has AVX.
//!
//! Every read uses new values (derived from the tag and the read count). A mismatch is a
//! sticky failure reported by the next check. The check also compares the fs base (TLS).
//! What breaks: a restorer that restores only the legacy FXSAVE area loses the ymm upper
//! halves; one that does not restore xstate at all loses everything here; one that restarts
//! the read with clobbered rdi/rsi/rdx reads into the wrong place or from the wrong fd.

use std::mem::offset_of;

use stasis_workloads::pattern::{key, splitmix64};
use stasis_workloads::{sys, Ctx, Report, Spec};

const FCW: u16 = 0x0f7f;
const MXCSR: u32 = 0xff80;
const NGPR: usize = 9;
const GPR_NAMES: [&str; NGPR] = ["rbx", "rbp", "r12", "r13", "r14", "r15", "r8", "r9", "r10"];

#[repr(C, align(64))]
struct Block {
    ymm_in: [[u8; 32]; 16],
    ymm_out: [[u8; 32]; 16],
    x87_in: [[u8; 16]; 3],
    x87_out: [[u8; 16]; 3],
    gpr_in: [u64; NGPR],
    gpr_out: [u64; NGPR],
    args_out: [u64; 3],
    buf: u64,
    len: u64,
    ret: i64,
    mxcsr_in: u32,
    mxcsr_out: u32,
    mxcsr_saved: u32,
    fcw_in: u16,
    fcw_out: u16,
    fcw_saved: u16,
    fsw_before: u16,
    fsw_after: u16,
}

/// `read(0, blk.buf, blk.len)` with all registers loaded from/stored to `blk` (AVX: ymm).
///
/// # Safety
/// `blk` must point to a valid `Block` whose `buf`/`len` describe writable memory, and the
/// CPU must support AVX.
#[target_feature(enable = "avx")]
unsafe fn read_with_regs_avx(blk: *mut Block) {
    // SAFETY: the asm saves and restores every callee-saved register it uses (rbx, rbp,
    // r12-r15, x87 control word, MXCSR), declares the caller-saved ones clobbered, leaves the
    // x87 stack empty and the upper ymm state clean, and only touches memory inside `*blk`
    // and the caller-provided buffer (per this function's contract).
    unsafe {
        core::arch::asm!(
            "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
            "push rdi",
            "fnstcw word ptr [rdi + {fcw_saved}]",
            "stmxcsr dword ptr [rdi + {mx_saved}]",
            "fldcw word ptr [rdi + {fcw_in}]",
            "ldmxcsr dword ptr [rdi + {mx_in}]",
            "fld tbyte ptr [rdi + {x_in}]",
            "fld tbyte ptr [rdi + {x_in} + 16]",
            "fld tbyte ptr [rdi + {x_in} + 32]",
            "fnstsw word ptr [rdi + {fsw_before}]",
            "vmovdqu ymm0, ymmword ptr [rdi + {y_in} + 0]",
            "vmovdqu ymm1, ymmword ptr [rdi + {y_in} + 32]",
            "vmovdqu ymm2, ymmword ptr [rdi + {y_in} + 64]",
            "vmovdqu ymm3, ymmword ptr [rdi + {y_in} + 96]",
            "vmovdqu ymm4, ymmword ptr [rdi + {y_in} + 128]",
            "vmovdqu ymm5, ymmword ptr [rdi + {y_in} + 160]",
            "vmovdqu ymm6, ymmword ptr [rdi + {y_in} + 192]",
            "vmovdqu ymm7, ymmword ptr [rdi + {y_in} + 224]",
            "vmovdqu ymm8, ymmword ptr [rdi + {y_in} + 256]",
            "vmovdqu ymm9, ymmword ptr [rdi + {y_in} + 288]",
            "vmovdqu ymm10, ymmword ptr [rdi + {y_in} + 320]",
            "vmovdqu ymm11, ymmword ptr [rdi + {y_in} + 352]",
            "vmovdqu ymm12, ymmword ptr [rdi + {y_in} + 384]",
            "vmovdqu ymm13, ymmword ptr [rdi + {y_in} + 416]",
            "vmovdqu ymm14, ymmword ptr [rdi + {y_in} + 448]",
            "vmovdqu ymm15, ymmword ptr [rdi + {y_in} + 480]",
            "mov rbx, [rdi + {g_in}]",
            "mov rbp, [rdi + {g_in} + 8]",
            "mov r12, [rdi + {g_in} + 16]",
            "mov r13, [rdi + {g_in} + 24]",
            "mov r14, [rdi + {g_in} + 32]",
            "mov r15, [rdi + {g_in} + 40]",
            "mov r8, [rdi + {g_in} + 48]",
            "mov r9, [rdi + {g_in} + 56]",
            "mov r10, [rdi + {g_in} + 64]",
            "mov rsi, [rdi + {buf}]",
            "mov rdx, [rdi + {len}]",
            "xor edi, edi",
            "xor eax, eax",
            "syscall",
            "push rdx", "push rsi", "push rdi",
            "mov rdi, [rsp + 24]",
            "pop qword ptr [rdi + {args_out}]",
            "pop qword ptr [rdi + {args_out} + 8]",
            "pop qword ptr [rdi + {args_out} + 16]",
            "mov [rdi + {ret}], rax",
            "mov [rdi + {g_out}], rbx",
            "mov [rdi + {g_out} + 8], rbp",
            "mov [rdi + {g_out} + 16], r12",
            "mov [rdi + {g_out} + 24], r13",
            "mov [rdi + {g_out} + 32], r14",
            "mov [rdi + {g_out} + 40], r15",
            "mov [rdi + {g_out} + 48], r8",
            "mov [rdi + {g_out} + 56], r9",
            "mov [rdi + {g_out} + 64], r10",
            "vmovdqu ymmword ptr [rdi + {y_out} + 0], ymm0",
            "vmovdqu ymmword ptr [rdi + {y_out} + 32], ymm1",
            "vmovdqu ymmword ptr [rdi + {y_out} + 64], ymm2",
            "vmovdqu ymmword ptr [rdi + {y_out} + 96], ymm3",
            "vmovdqu ymmword ptr [rdi + {y_out} + 128], ymm4",
            "vmovdqu ymmword ptr [rdi + {y_out} + 160], ymm5",
            "vmovdqu ymmword ptr [rdi + {y_out} + 192], ymm6",
            "vmovdqu ymmword ptr [rdi + {y_out} + 224], ymm7",
            "vmovdqu ymmword ptr [rdi + {y_out} + 256], ymm8",
            "vmovdqu ymmword ptr [rdi + {y_out} + 288], ymm9",
            "vmovdqu ymmword ptr [rdi + {y_out} + 320], ymm10",
            "vmovdqu ymmword ptr [rdi + {y_out} + 352], ymm11",
            "vmovdqu ymmword ptr [rdi + {y_out} + 384], ymm12",
            "vmovdqu ymmword ptr [rdi + {y_out} + 416], ymm13",
            "vmovdqu ymmword ptr [rdi + {y_out} + 448], ymm14",
            "vmovdqu ymmword ptr [rdi + {y_out} + 480], ymm15",
            "fnstsw word ptr [rdi + {fsw_after}]",
            "fstp tbyte ptr [rdi + {x_out} + 32]",
            "fstp tbyte ptr [rdi + {x_out} + 16]",
            "fstp tbyte ptr [rdi + {x_out}]",
            "fnstcw word ptr [rdi + {fcw_out}]",
            "stmxcsr dword ptr [rdi + {mx_out}]",
            "fldcw word ptr [rdi + {fcw_saved}]",
            "ldmxcsr dword ptr [rdi + {mx_saved}]",
            "vzeroupper",
            "add rsp, 8",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
            y_in = const offset_of!(Block, ymm_in),
            y_out = const offset_of!(Block, ymm_out),
            x_in = const offset_of!(Block, x87_in),
            x_out = const offset_of!(Block, x87_out),
            g_in = const offset_of!(Block, gpr_in),
            g_out = const offset_of!(Block, gpr_out),
            args_out = const offset_of!(Block, args_out),
            buf = const offset_of!(Block, buf),
            len = const offset_of!(Block, len),
            ret = const offset_of!(Block, ret),
            mx_in = const offset_of!(Block, mxcsr_in),
            mx_out = const offset_of!(Block, mxcsr_out),
            mx_saved = const offset_of!(Block, mxcsr_saved),
            fcw_in = const offset_of!(Block, fcw_in),
            fcw_out = const offset_of!(Block, fcw_out),
            fcw_saved = const offset_of!(Block, fcw_saved),
            fsw_before = const offset_of!(Block, fsw_before),
            fsw_after = const offset_of!(Block, fsw_after),
            in("rdi") blk,
            clobber_abi("C"),
        );
    }
}

/// Like [`read_with_regs_avx`] with xmm registers only (no AVX).
///
/// # Safety
/// `blk` must point to a valid `Block` whose `buf`/`len` describe writable memory.
unsafe fn read_with_regs_sse(blk: *mut Block) {
    // SAFETY: as in `read_with_regs_avx`, without touching ymm upper halves.
    unsafe {
        core::arch::asm!(
            "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
            "push rdi",
            "fnstcw word ptr [rdi + {fcw_saved}]",
            "stmxcsr dword ptr [rdi + {mx_saved}]",
            "fldcw word ptr [rdi + {fcw_in}]",
            "ldmxcsr dword ptr [rdi + {mx_in}]",
            "fld tbyte ptr [rdi + {x_in}]",
            "fld tbyte ptr [rdi + {x_in} + 16]",
            "fld tbyte ptr [rdi + {x_in} + 32]",
            "fnstsw word ptr [rdi + {fsw_before}]",
            "movdqu xmm0, [rdi + {y_in} + 0]",
            "movdqu xmm1, [rdi + {y_in} + 32]",
            "movdqu xmm2, [rdi + {y_in} + 64]",
            "movdqu xmm3, [rdi + {y_in} + 96]",
            "movdqu xmm4, [rdi + {y_in} + 128]",
            "movdqu xmm5, [rdi + {y_in} + 160]",
            "movdqu xmm6, [rdi + {y_in} + 192]",
            "movdqu xmm7, [rdi + {y_in} + 224]",
            "movdqu xmm8, [rdi + {y_in} + 256]",
            "movdqu xmm9, [rdi + {y_in} + 288]",
            "movdqu xmm10, [rdi + {y_in} + 320]",
            "movdqu xmm11, [rdi + {y_in} + 352]",
            "movdqu xmm12, [rdi + {y_in} + 384]",
            "movdqu xmm13, [rdi + {y_in} + 416]",
            "movdqu xmm14, [rdi + {y_in} + 448]",
            "movdqu xmm15, [rdi + {y_in} + 480]",
            "mov rbx, [rdi + {g_in}]",
            "mov rbp, [rdi + {g_in} + 8]",
            "mov r12, [rdi + {g_in} + 16]",
            "mov r13, [rdi + {g_in} + 24]",
            "mov r14, [rdi + {g_in} + 32]",
            "mov r15, [rdi + {g_in} + 40]",
            "mov r8, [rdi + {g_in} + 48]",
            "mov r9, [rdi + {g_in} + 56]",
            "mov r10, [rdi + {g_in} + 64]",
            "mov rsi, [rdi + {buf}]",
            "mov rdx, [rdi + {len}]",
            "xor edi, edi",
            "xor eax, eax",
            "syscall",
            "push rdx", "push rsi", "push rdi",
            "mov rdi, [rsp + 24]",
            "pop qword ptr [rdi + {args_out}]",
            "pop qword ptr [rdi + {args_out} + 8]",
            "pop qword ptr [rdi + {args_out} + 16]",
            "mov [rdi + {ret}], rax",
            "mov [rdi + {g_out}], rbx",
            "mov [rdi + {g_out} + 8], rbp",
            "mov [rdi + {g_out} + 16], r12",
            "mov [rdi + {g_out} + 24], r13",
            "mov [rdi + {g_out} + 32], r14",
            "mov [rdi + {g_out} + 40], r15",
            "mov [rdi + {g_out} + 48], r8",
            "mov [rdi + {g_out} + 56], r9",
            "mov [rdi + {g_out} + 64], r10",
            "movdqu [rdi + {y_out} + 0], xmm0",
            "movdqu [rdi + {y_out} + 32], xmm1",
            "movdqu [rdi + {y_out} + 64], xmm2",
            "movdqu [rdi + {y_out} + 96], xmm3",
            "movdqu [rdi + {y_out} + 128], xmm4",
            "movdqu [rdi + {y_out} + 160], xmm5",
            "movdqu [rdi + {y_out} + 192], xmm6",
            "movdqu [rdi + {y_out} + 224], xmm7",
            "movdqu [rdi + {y_out} + 256], xmm8",
            "movdqu [rdi + {y_out} + 288], xmm9",
            "movdqu [rdi + {y_out} + 320], xmm10",
            "movdqu [rdi + {y_out} + 352], xmm11",
            "movdqu [rdi + {y_out} + 384], xmm12",
            "movdqu [rdi + {y_out} + 416], xmm13",
            "movdqu [rdi + {y_out} + 448], xmm14",
            "movdqu [rdi + {y_out} + 480], xmm15",
            "fnstsw word ptr [rdi + {fsw_after}]",
            "fstp tbyte ptr [rdi + {x_out} + 32]",
            "fstp tbyte ptr [rdi + {x_out} + 16]",
            "fstp tbyte ptr [rdi + {x_out}]",
            "fnstcw word ptr [rdi + {fcw_out}]",
            "stmxcsr dword ptr [rdi + {mx_out}]",
            "fldcw word ptr [rdi + {fcw_saved}]",
            "ldmxcsr dword ptr [rdi + {mx_saved}]",
            "add rsp, 8",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
            y_in = const offset_of!(Block, ymm_in),
            y_out = const offset_of!(Block, ymm_out),
            x_in = const offset_of!(Block, x87_in),
            x_out = const offset_of!(Block, x87_out),
            g_in = const offset_of!(Block, gpr_in),
            g_out = const offset_of!(Block, gpr_out),
            args_out = const offset_of!(Block, args_out),
            buf = const offset_of!(Block, buf),
            len = const offset_of!(Block, len),
            ret = const offset_of!(Block, ret),
            mx_in = const offset_of!(Block, mxcsr_in),
            mx_out = const offset_of!(Block, mxcsr_out),
            mx_saved = const offset_of!(Block, mxcsr_saved),
            fcw_in = const offset_of!(Block, fcw_in),
            fcw_out = const offset_of!(Block, fcw_out),
            fcw_saved = const offset_of!(Block, fcw_saved),
            fsw_before = const offset_of!(Block, fsw_before),
            fsw_after = const offset_of!(Block, fsw_after),
            in("rdi") blk,
            clobber_abi("C"),
        );
    }
}

fn new_block(seed: u64, n: u64, buf: &mut [u8; 16]) -> Block {
    let k = key(seed, &[n]);
    let mut b = Block {
        ymm_in: [[0; 32]; 16],
        ymm_out: [[0; 32]; 16],
        x87_in: [[0; 16]; 3],
        x87_out: [[0; 16]; 3],
        gpr_in: [0; NGPR],
        gpr_out: [0; NGPR],
        args_out: [0; 3],
        buf: buf.as_mut_ptr() as u64,
        len: 1,
        ret: 0,
        mxcsr_in: MXCSR,
        mxcsr_out: 0,
        mxcsr_saved: 0,
        fcw_in: FCW,
        fcw_out: 0,
        fcw_saved: 0,
        fsw_before: 0,
        fsw_after: 0,
    };
    for (r, y) in b.ymm_in.iter_mut().enumerate() {
        for (j, c) in y.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&splitmix64(k ^ ((r * 4 + j) as u64) << 8).to_le_bytes());
        }
    }
    for (i, x) in b.x87_in.iter_mut().enumerate() {
        // A normal 80-bit value: explicit integer bit set, 64 random mantissa bits, a
        // moderate exponent, alternating signs.
        let mant = splitmix64(k ^ 0x87 ^ i as u64) | (1 << 63) | 1;
        let exp: u16 = 0x3fff + (i as u16 * 7) - 5 + if i % 2 == 1 { 0x8000 } else { 0 };
        x[..8].copy_from_slice(&mant.to_le_bytes());
        x[8..10].copy_from_slice(&exp.to_le_bytes());
    }
    for (i, g) in b.gpr_in.iter_mut().enumerate() {
        *g = splitmix64(k ^ 0x6770 ^ i as u64);
    }
    b
}

fn compare(b: &Block, avx: bool, buf: &[u8; 16]) -> Vec<String> {
    let mut f = Vec::new();
    let width = if avx { 32 } else { 16 };
    for r in 0..16 {
        let (e, g) = (&b.ymm_in[r][..width], &b.ymm_out[r][..width]);
        if e != g {
            let reg = if avx { "ymm" } else { "xmm" };
            let upper = avx && b.ymm_in[r][..16] == b.ymm_out[r][..16];
            f.push(format!(
                "{reg}{r}{}: expected {}, got {}",
                if upper { " (upper half)" } else { "" },
                hex(e),
                hex(g)
            ));
        }
    }
    for i in 0..3 {
        if b.x87_in[i][..10] != b.x87_out[i][..10] {
            f.push(format!(
                "x87 st({}): expected {}, got {}",
                2 - i,
                hex(&b.x87_in[i][..10]),
                hex(&b.x87_out[i][..10])
            ));
        }
    }
    if b.fcw_out != FCW {
        f.push(format!(
            "x87 control word: expected {FCW:#06x}, got {:#06x}",
            b.fcw_out
        ));
    }
    if b.fsw_after != b.fsw_before {
        f.push(format!(
            "x87 status word: expected {:#06x}, got {:#06x}",
            b.fsw_before, b.fsw_after
        ));
    }
    if b.mxcsr_out != MXCSR {
        f.push(format!(
            "MXCSR: expected {MXCSR:#06x}, got {:#06x}",
            b.mxcsr_out
        ));
    }
    for ((name, e), g) in GPR_NAMES.iter().zip(&b.gpr_in).zip(&b.gpr_out) {
        if e != g {
            f.push(format!("{name}: expected {e:#018x}, got {g:#018x}"));
        }
    }
    let args = [0, b.buf, b.len];
    for (i, name) in ["rdi", "rsi", "rdx"].iter().enumerate() {
        if b.args_out[i] != args[i] {
            f.push(format!(
                "{name} after syscall: expected {:#x}, got {:#x}",
                args[i], b.args_out[i]
            ));
        }
    }
    if b.ret == 1 && buf[1..].iter().any(|&x| x != 0xa5) {
        f.push("read(0, buf, 1) wrote past its one byte".to_string());
    }
    f
}

fn hex(b: &[u8]) -> String {
    b.iter().rev().map(|x| format!("{x:02x}")).collect()
}

fn fs_base() -> Result<u64, String> {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to the given address.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut v as *mut u64) };
    sys::cvt_long(r, "arch_prctl(ARCH_GET_FS)")?;
    Ok(v)
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-regs",
        &Spec {
            flags: &["--sse-only"],
            values: &[],
        },
    );
    let avx = is_x86_feature_detected!("avx") && !ctx.args.flag("--sse-only");
    let fs = fs_base();
    let fs = ctx.setup(fs);
    ctx.ready();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let mut buf = [0xa5u8; 16];
        let mut blk = new_block(ctx.seed, n, &mut buf);
        if avx {
            // SAFETY: `blk` is a valid Block whose buf/len describe `buf`; AVX was detected.
            unsafe { read_with_regs_avx(&mut blk) };
        } else {
            // SAFETY: `blk` is a valid Block whose buf/len describe `buf`.
            unsafe { read_with_regs_sse(&mut blk) };
        }
        for m in compare(&blk, avx, &buf) {
            ctx.note(format!("after read #{n}: {m}"));
        }
        match blk.ret {
            1 => ctx.feed(&buf[..1]),
            0 => ctx.eof(),
            r if r == -(libc::EINTR as i64) => ctx.fail_exit("read on stdin returned EINTR"),
            r if r < 0 => ctx.fail_exit(&format!(
                "read(0) on stdin failed: {}",
                std::io::Error::from_raw_os_error(-r as i32)
            )),
            r => ctx.fail_exit(&format!("read(0, buf, 1) returned {r}")),
        }
        while let Some(cmd) = ctx.take_cmd() {
            let reads = n;
            ctx.respond(cmd, |r: &mut Report| {
                if let Some(now) = r.ok(fs_base()) {
                    r.eq_hex("fs base (TLS)", fs, now);
                }
                r.info(format!(
                    "{reads} register-checked reads ({})",
                    if avx {
                        "x87, MXCSR, ymm0-15, GPRs"
                    } else {
                        "x87, MXCSR, xmm0-15, GPRs"
                    }
                ));
            });
        }
    }
}
