//! Memory state beyond page contents: guard pages, what only the process itself can ask
//! about its mm (mlockall's MCL_FUTURE, PR_SET_THP_DISABLE, membarrier registrations), and
//! its audit ids.

use crate::error::CheckpointError;
use crate::freeze::Frozen;
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::memory::{self, GuardSupport, Pagemap, PM_GUARD};
use stasis_runtime::{procfs, RuntimeError, PAGE_SIZE};

/// membarrier(2) command that lists the process's registrations (kernel 6.3+).
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;
/// MEMBARRIER_CMD_PRIVATE_EXPEDITED, _SYNC_CORE and _RSEQ.
const MEMBARRIER_PRIVATE_CMDS: [u64; 3] = [1 << 3, 1 << 5, 1 << 7];
/// Where the probe page of [`query`] goes if that is free: above the lowest address an
/// unprivileged mapping may have (vm.mmap_min_addr, 64 KiB by default), below everything a
/// program maps.
const PROBE_AT: u64 = 0x10000;
/// mlockall(2) flags.
pub const MCL_FUTURE: u32 = 2;
pub const MCL_ONFAULT: u32 = 4;

/// Records in each mapping that may hold guard pages where they are. On kernels whose
/// pagemap does not report guard pages (6.13, 6.14) none are found; such a page makes the
/// page dump fail.
pub fn find_guards(pid: i32, vmas: &mut [proto::Vma]) -> Result<(), CheckpointError> {
    let flagged = match memory::guard_support() {
        GuardSupport::None | GuardSupport::Unreported => return Ok(()),
        GuardSupport::Reported { flagged } => flagged,
    };
    let pagemap = Pagemap::open(pid)?;
    let mut entries = Vec::new();
    for v in vmas.iter_mut() {
        let special = matches!(
            v.kind(),
            VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
        );
        if special || (flagged && !v.vm_flags.iter().any(|f| f == "gu")) {
            continue;
        }
        pagemap.read(v.start, v.end, &mut entries)?;
        v.guards = guard_runs(v.start, &entries);
    }
    Ok(())
}

/// The runs of guard pages among pagemap `entries` of pages from `start` on.
fn guard_runs(start: u64, entries: &[u64]) -> Vec<proto::PageRange> {
    let mut runs: Vec<proto::PageRange> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e & PM_GUARD == 0 {
            continue;
        }
        let addr = start + i as u64 * PAGE_SIZE;
        match runs.last_mut() {
            Some(r) if r.start + r.pages * PAGE_SIZE == addr => r.pages += 1,
            _ => runs.push(proto::PageRange {
                start: addr,
                pages: 1,
            }),
        }
    }
    runs
}

/// What the process told about its mm.
pub struct MmQuery {
    /// prctl(PR_GET_THP_DISABLE).
    pub thp_disable: u32,
    /// MCL_FUTURE (| MCL_ONFAULT) if mlockall(MCL_FUTURE) is in force.
    pub mlockall_future: u32,
    /// membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS).
    pub membarrier: u32,
}

/// Asks the stopped process by injected syscalls: prctl(PR_GET_THP_DISABLE),
/// membarrier(GET_REGISTRATIONS), and whether a page it maps now comes locked (the mm's
/// default flags after mlockall(MCL_FUTURE)); the probe page is unmapped again.
pub fn query(frozen: &mut Frozen, syscall_ip: u64) -> Result<MmQuery, CheckpointError> {
    let pid = frozen.pid();
    let mut inj = frozen.injector(pid, syscall_ip)?;
    let result = (|| -> Result<MmQuery, CheckpointError> {
        let thp_disable = inj.call(
            "prctl(PR_GET_THP_DISABLE)",
            libc::SYS_prctl,
            &[libc::PR_GET_THP_DISABLE as u64],
        )? as u32;
        let rc = inj.raw(
            libc::SYS_membarrier,
            &[MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0],
        )?;
        let membarrier = match rc {
            rc if rc >= 0 => rc as u32,
            // No membarrier in this kernel: nothing can be registered.
            rc if rc == -(libc::ENOSYS as i64) => 0,
            // Before 6.3: each private expedited command fails with EPERM unless its
            // REGISTER_ command (the next bit) was made. (A global expedited registration
            // cannot be seen this way.)
            _ => {
                let mut found = 0;
                for cmd in MEMBARRIER_PRIVATE_CMDS {
                    if inj.raw(libc::SYS_membarrier, &[cmd, 0, 0])? == 0 {
                        found |= (cmd as u32) << 1;
                    }
                }
                found
            }
        };
        // Below everything the process maps, if that place is free: the first mapping
        // /proc/PID/smaps reports (see below).
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let mut probe = inj.raw(
            libc::SYS_mmap,
            &[
                PROBE_AT,
                PAGE_SIZE,
                libc::PROT_NONE as u64,
                anon | libc::MAP_FIXED_NOREPLACE as u64,
                u64::MAX,
                0,
            ],
        )?;
        if probe == -(libc::EEXIST as i64) || probe == -(libc::EPERM as i64) {
            probe = inj.raw(
                libc::SYS_mmap,
                &[0, PAGE_SIZE, libc::PROT_NONE as u64, anon, u64::MAX, 0],
            )?;
        }
        if probe == -(libc::EAGAIN as i64) {
            return Err(CheckpointError::unsupported(
                pid,
                "mlockall(MCL_FUTURE) is in force with its RLIMIT_MEMLOCK used up",
            ));
        }
        if (-4095..0).contains(&probe) {
            return Err(RuntimeError::sys(
                "mmap(probe)",
                format!("injected into pid {pid}"),
                std::io::Error::from_raw_os_error(-probe as i32),
            )
            .into());
        }
        let probe = probe as u64;
        // The first mapping's flags come without walking the rest of a large process.
        let flags = match procfs::first_smaps_flags(pid) {
            Ok(Some((s, e, flags))) if s <= probe && probe < e => Ok(flags),
            _ => procfs::read_smaps_flags(pid).map(|maps| {
                maps.into_iter()
                    .find(|m| m.start <= probe && probe < m.end)
                    .map(|m| m.vm_flags)
                    .unwrap_or_default()
            }),
        };
        inj.call("munmap(probe)", libc::SYS_munmap, &[probe, PAGE_SIZE])?;
        let flags = flags?;
        let has = |f: &str| flags.iter().any(|x| x == f);
        let mlockall_future = match (has("lo"), has("lf")) {
            (false, _) => 0,
            (true, false) => MCL_FUTURE,
            (true, true) => MCL_FUTURE | MCL_ONFAULT,
        };
        Ok(MmQuery {
            thp_disable,
            mlockall_future,
            membarrier,
        })
    })();
    frozen.defer_signals(pid, inj.take_deferred());
    result
}

/// The audit login uid and session id (/proc/PID/loginuid, sessionid), when the kernel
/// has them (CONFIG_AUDIT).
pub fn audit_ids(pid: i32) -> Result<(Option<u32>, Option<u32>), CheckpointError> {
    let read = |name: &str| -> Result<Option<u32>, CheckpointError> {
        let path = format!("/proc/{pid}/{name}");
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                RuntimeError::Parse {
                    path,
                    what: format!("not a number: {text:?}"),
                }
                .into()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::sys("read", &path, e).into()),
        }
    };
    Ok((read("loginuid")?, read("sessionid")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_runs_join_neighbours() {
        let e = [0, PM_GUARD, PM_GUARD, 0, PM_GUARD];
        let runs = guard_runs(0x1000, &e);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].start, runs[0].pages), (0x2000, 2));
        assert_eq!((runs[1].start, runs[1].pages), (0x5000, 1));
    }
}
