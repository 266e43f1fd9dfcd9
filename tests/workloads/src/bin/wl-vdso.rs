//! `wl-vdso`: the vDSO still works and still sits where it was.
//!
//! At start it records the addresses of `[vdso]` and every `[vvar*]` mapping and the clock
//! values. Each check verifies:
//! - `[vdso]` and `[vvar]`/`[vvar_vclock]` have the same start/end as at start (moving
//!   `[vdso]` alone makes `clock_gettime` crash or read garbage);
//! - `getauxval(AT_SYSINFO_EHDR)` and `AT_SYSINFO_EHDR` in `/proc/self/auxv` (the mm's saved
//!   auxv) equal the `[vdso]` start, and the vDSO still begins with an ELF header;
//! - `clock_gettime` through libc (vDSO) for MONOTONIC, REALTIME, BOOTTIME and
//!   MONOTONIC_COARSE agrees with the raw syscall within 1 s (a `[vvar]` restored as a frozen
//!   copy of the old data page instead of the live one breaks this), and the monotonic
//!   clocks are not below the values seen at the previous check / READY;
//! - the vDSO monotonic clock advances across a 20 ms `nanosleep`;
//! - `gettimeofday` and `time` (vDSO) agree with their raw syscalls; REALTIME is after 2020;
//! - `sched_getcpu` (vDSO `getcpu`) returns a valid CPU.
//!
//! Note: across a kexec or a migration to another host, CLOCK_MONOTONIC/BOOTTIME restart or
//! jump; unless the restorer compensates (e.g. a time namespace), the monotonic check fails,
//! which is the point.

use stasis_workloads::maps::{self, MapEntry};
use stasis_workloads::{sys, Ctx, Report, Spec};

const SEC: i128 = 1_000_000_000;
const CLOCKS: [(libc::clockid_t, &str, bool); 4] = [
    (libc::CLOCK_MONOTONIC, "CLOCK_MONOTONIC", true),
    (libc::CLOCK_REALTIME, "CLOCK_REALTIME", false),
    (libc::CLOCK_BOOTTIME, "CLOCK_BOOTTIME", true),
    (libc::CLOCK_MONOTONIC_COARSE, "CLOCK_MONOTONIC_COARSE", true),
];

fn vdso_maps(m: &[MapEntry]) -> Vec<(String, usize, usize)> {
    m.iter()
        .filter(|e| e.path == "[vdso]" || e.path.starts_with("[vvar"))
        .map(|e| (e.path.clone(), e.start, e.end))
        .collect()
}

fn auxv_sysinfo_ehdr() -> Result<u64, String> {
    let b = std::fs::read("/proc/self/auxv").map_err(|e| format!("read /proc/self/auxv: {e}"))?;
    for c in b.chunks_exact(16) {
        let mut t = [0u8; 8];
        let mut v = [0u8; 8];
        t.copy_from_slice(&c[..8]);
        v.copy_from_slice(&c[8..]);
        if u64::from_ne_bytes(t) == libc::AT_SYSINFO_EHDR {
            return Ok(u64::from_ne_bytes(v));
        }
    }
    Err("no AT_SYSINFO_EHDR in /proc/self/auxv".to_string())
}

fn read_clocks() -> Result<Vec<i128>, String> {
    CLOCKS.iter().map(|c| sys::clock_ns(c.0)).collect()
}

fn check(layout: &[(String, usize, usize)], last: &mut [i128], r: &mut Report) {
    if let Some(m) = r.ok(maps::read_maps()) {
        r.eq(
            "[vdso]/[vvar*] mappings (name, start, end)",
            layout,
            &vdso_maps(&m)[..],
        );
    }
    let vdso = layout.iter().find(|l| l.0 == "[vdso]").map_or(0, |l| l.1);
    // SAFETY: getauxval reads libc's copy of the auxiliary vector.
    let ehdr = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    r.eq_hex(
        "getauxval(AT_SYSINFO_EHDR) vs [vdso] start",
        vdso as u64,
        ehdr,
    );
    if let Some(a) = r.ok(auxv_sysinfo_ehdr()) {
        r.eq_hex(
            "/proc/self/auxv AT_SYSINFO_EHDR vs [vdso] start",
            vdso as u64,
            a,
        );
    }
    if vdso != 0 {
        // SAFETY: [vdso] is mapped readable (checked above to be where it was) and at least
        // one page long.
        let magic = unsafe { std::slice::from_raw_parts(vdso as *const u8, 4) };
        r.eq("[vdso] ELF magic", &b"\x7fELF"[..], magic);
    }
    for (i, &(id, name, monotonic)) in CLOCKS.iter().enumerate() {
        let (Some(v), Some(s)) = (r.ok(sys::clock_ns(id)), r.ok(sys::clock_ns_syscall(id))) else {
            continue;
        };
        r.ensure((v - s).abs() < SEC, || {
            format!("{name}: vDSO says {v} ns, syscall says {s} ns (differ by more than 1 s)")
        });
        if monotonic {
            r.ensure(v >= last[i], || {
                format!(
                    "{name} went backwards: {} ns at the previous check/READY, {v} ns now",
                    last[i]
                )
            });
        }
        last[i] = v;
    }
    if let (Some(a), Some(()), Some(b)) = (
        r.ok(sys::clock_ns(libc::CLOCK_MONOTONIC)),
        r.ok(sys::nanosleep_ms(20)),
        r.ok(sys::clock_ns(libc::CLOCK_MONOTONIC)),
    ) {
        r.ensure(b - a >= 20_000_000, || {
            format!(
                "vDSO CLOCK_MONOTONIC advanced only {} ns across a 20 ms nanosleep",
                b - a
            )
        });
    }
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut tv_s = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval; a null timezone is allowed.
    let a = unsafe { libc::gettimeofday(&mut tv, std::ptr::null_mut()) };
    // SAFETY: as above, through the raw syscall.
    let b = unsafe {
        libc::syscall(
            libc::SYS_gettimeofday,
            &mut tv_s as *mut libc::timeval,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r.ok(sys::cvt(a, "gettimeofday")).is_some()
        && r.ok(sys::cvt_long(b, "syscall gettimeofday")).is_some()
    {
        let d = (tv.tv_sec - tv_s.tv_sec).abs();
        r.ensure(d <= 1, || {
            format!(
                "gettimeofday: vDSO {} s, syscall {} s",
                tv.tv_sec, tv_s.tv_sec
            )
        });
        r.ensure(tv.tv_sec > 1_577_836_800, || {
            format!("gettimeofday says {} s, before 2020", tv.tv_sec)
        });
    }
    // SAFETY: time(NULL) only returns the time.
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: as above, through the raw syscall.
    let ts = unsafe { libc::syscall(libc::SYS_time, std::ptr::null_mut::<libc::time_t>()) };
    r.ensure((t - ts).abs() <= 1, || {
        format!("time(): vDSO {t}, syscall {ts}")
    });
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    // SAFETY: sysconf has no preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    r.ensure(cpu >= 0 && (cpu as libc::c_long) < ncpu.max(1), || {
        format!("sched_getcpu() returned {cpu} with {ncpu} CPUs configured")
    });
}

fn main() {
    let mut ctx = Ctx::start("wl-vdso", &Spec::default());
    let m = maps::read_maps();
    let m = ctx.setup(m);
    let layout = vdso_maps(&m);
    if !layout.iter().any(|l| l.0 == "[vdso]") {
        ctx.fail_exit("setup: no [vdso] in /proc/self/maps");
    }
    let clocks = read_clocks();
    let mut last = ctx.setup(clocks);
    ctx.ready();
    let mut checks = 0u32;
    ctx.serve_blocking(|r| {
        check(&layout, &mut last, r);
        checks += 1;
        r.info(format!("check #{checks}, vDSO layout {layout:x?}"));
    })
}
