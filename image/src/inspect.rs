//! Everything in an image, as a serializable report (`stasis image inspect --json`) and as a
//! readable summary (its `Display`).

use std::fmt;

use serde::Serialize;

use crate::proto::{self, Encoding, FdKind, RunKind, SpaceKind, VmaKind, WorkloadKind};
use crate::Image;

fn hex64(v: u64) -> String {
    format!("{v:#x}")
}

fn enum_name<E>(
    v: i32,
    conv: impl Fn(i32) -> Option<E>,
    name: impl Fn(&E) -> &'static str,
    prefix: &str,
) -> String {
    match conv(v) {
        Some(e) => {
            let n = name(&e);
            n.strip_prefix(prefix).unwrap_or(n).to_string()
        }
        None => format!("UNKNOWN({v})"),
    }
}

macro_rules! named {
    ($ty:ty, $prefix:literal) => {
        |v: i32| enum_name(v, |x| <$ty>::try_from(x).ok(), |e| e.as_str_name(), $prefix)
    };
}

/// The whole image.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub format: String,
    pub file_bytes: u64,
    pub inventory: InventoryReport,
    pub processes: Vec<ProcessReport>,
    /// Page counts of spaces that are not processes (shared memory, guest memory).
    pub other_spaces: Vec<SpaceReport>,
    pub chunks: Vec<ChunkReport>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct InventoryReport {
    pub format_major: u32,
    pub format_minor: u32,
    pub image_id: String,
    pub tool: String,
    pub created_unix_ns: u64,
    /// `created_unix_ns` as an RFC 3339 UTC time.
    pub created: String,
    pub kind: String,
    pub parent: Option<proto::ParentRef>,
    pub kernel_release: String,
    pub hostname: String,
    pub page_size: u32,
    pub root_pid: u32,
    /// The tree is a whole pid namespace: its PIDs are those it saw there.
    pub pid_namespace: bool,
    pub compression: String,
    pub xcr0: String,
    /// A container image's namespaces, mounts, network and limits.
    pub container: Option<proto::Container>,
    /// A VM image's machine: vCPUs, devices, memory.
    pub vm: Option<crate::inspect_vm::VmReport>,
}

/// Pages stored for one address space.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PageCounts {
    pub chunks: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpaceReport {
    pub space: String,
    pub space_id: u64,
    pub pages: PageCounts,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub comm: String,
    pub exe_path: String,
    pub cmdline: Vec<String>,
    pub cwd: String,
    pub root: String,
    /// Octal, e.g. "0022".
    pub umask: String,
    pub personality: String,
    pub creds: Option<proto::Credentials>,
    pub vdso_hash: String,
    pub mm: Option<MmReport>,
    pub threads: Vec<ThreadReport>,
    pub vmas: Vec<VmaReport>,
    pub fds: Vec<FdReport>,
    pub sigactions: Vec<SigActionReport>,
    pub rlimits: Vec<proto::Rlimit>,
    pub itimers: Vec<proto::Itimer>,
    pub sched: Option<proto::SchedState>,
    pub oom_score_adj: i32,
    pub no_new_privs: bool,
    pub dumpable: u32,
    /// Signals pending for the whole process.
    pub shared_pending: Vec<PendingReport>,
    pub pages: PageCounts,
    pub stopped: bool,
    pub zombie: bool,
    /// For a zombie: the status its parent will collect.
    pub wait_status: u32,
    pub child_subreaper: bool,
    pub pdeathsig: u32,
    pub files_shared_with_parent: bool,
    pub pipes: Vec<PipeReport>,
    pub unix_pairs: Vec<UnixPairReport>,
}

/// A unix socket pair stored with the process, with what is queued for each end to read.
#[derive(Debug, Clone, Serialize)]
pub struct UnixPairReport {
    pub id: u64,
    pub peer: u64,
    /// STREAM, DGRAM or SEQPACKET.
    pub sock_type: String,
    pub queued_for_id: Vec<QueuedReport>,
    pub queued_for_peer: Vec<QueuedReport>,
}

/// One queued message (a segment of a stream).
#[derive(Debug, Clone, Serialize)]
pub struct QueuedReport {
    pub bytes: usize,
    /// blake3 of the bytes, hex.
    pub data_hash: String,
    /// The files in flight (SCM_RIGHTS) attached to it, in the order the reader gets them.
    pub in_flight: Vec<InFlightReport>,
}

/// A file in flight: the description of the fds with `desc_id`, or (`desc_id` 0) a file no
/// fd holds, described as an fd is.
#[derive(Debug, Clone, Serialize)]
pub struct InFlightReport {
    pub desc_id: u32,
    pub file: Option<FdReport>,
}

/// A pipe stored with the process: its capacity and buffered bytes.
#[derive(Debug, Clone, Serialize)]
pub struct PipeReport {
    pub id: u64,
    pub size: u32,
    pub buffered: usize,
    /// blake3 of the buffered bytes, hex.
    pub data_hash: String,
}

/// A pending signal: its number and its siginfo (hex).
#[derive(Debug, Clone, Serialize)]
pub struct PendingReport {
    pub signo: u32,
    pub siginfo: String,
}

fn pending_report(list: &[proto::PendingSignal]) -> Vec<PendingReport> {
    list.iter()
        .map(|s| PendingReport {
            signo: s.signo,
            siginfo: hex::encode(&s.siginfo),
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct MmReport {
    pub start_code: String,
    pub end_code: String,
    pub start_data: String,
    pub end_data: String,
    pub start_brk: String,
    pub brk: String,
    pub start_stack: String,
    pub arg_start: String,
    pub arg_end: String,
    pub env_start: String,
    pub env_end: String,
    /// auxv as (type, value) pairs, hex.
    pub auxv: Vec<(String, String)>,
}

macro_rules! regs_report {
    ($($f:ident),* $(,)?) => {
        /// `user_regs_struct`, every register as hex.
        #[derive(Debug, Clone, Serialize)]
        pub struct RegsReport { $(pub $f: String,)* }
        impl From<&proto::X86Regs> for RegsReport {
            fn from(r: &proto::X86Regs) -> Self {
                Self { $($f: format!("{:#018x}", r.$f),)* }
            }
        }
    };
}
regs_report!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
);

#[derive(Debug, Clone, Serialize)]
pub struct ThreadReport {
    pub tid: u32,
    pub name: String,
    pub regs: Option<RegsReport>,
    pub xstate_len: usize,
    /// The NT_X86_XSTATE regset, hex.
    pub xstate: String,
    pub sigmask: String,
    pub rseq: Option<RseqReport>,
    pub sigaltstack: Option<proto::SigAltStack>,
    /// Signals pending for this thread only.
    pub pending: Vec<PendingReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RseqReport {
    pub abi_pointer: String,
    pub abi_size: u32,
    pub flags: u32,
    pub signature: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmaReport {
    pub start: String,
    pub end: String,
    pub size: u64,
    /// "rwx" style.
    pub prot: String,
    pub kind: String,
    pub pgoff: String,
    pub path: String,
    pub name: String,
    pub vm_flags: Vec<String>,
    pub shmem_id: u64,
    /// For SYSV_SHM: the segment's id.
    pub sysv_shmid: u32,
    pub file: Option<proto::FileId>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FdReport {
    pub fd: u32,
    pub kind: String,
    pub path: String,
    /// open(2) flags, octal as in fdinfo.
    pub flags: String,
    pub offset: u64,
    pub file: Option<proto::FileId>,
    pub inherited_from: String,
    /// Fds with the same nonzero desc_id share one open file description.
    pub desc_id: u32,
    pub pipe_id: u64,
    /// eventfd counter and semaphore mode; timerfd state; signalfd mask; epoll watches.
    pub eventfd_count: u64,
    pub eventfd_semaphore: bool,
    pub timerfd: Option<proto::TimerFd>,
    pub signalfd_mask: String,
    pub epoll_watches: Vec<proto::EpollWatch>,
    pub inotify_watches: Vec<proto::InotifyWatch>,
    /// Sockets: what the socket is ("tcp 10.0.0.1:80 <-> 10.0.0.2:4711, ...").
    pub socket: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SigActionReport {
    pub signo: u32,
    pub handler: String,
    pub flags: String,
    pub restorer: String,
    pub mask: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub vaddr: String,
    pub pages: u64,
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChunkReport {
    pub index: usize,
    pub space: String,
    pub space_id: u64,
    pub vaddr_start: String,
    pub vaddr_end: String,
    pub runs: Vec<RunReport>,
    pub encoding: String,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    pub raw_len: u64,
    pub stored_len: u64,
    pub raw_hash: String,
    pub data_hash: String,
    pub chunk_offset: u64,
    pub data_offset: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub processes: u64,
    pub threads: u64,
    pub vmas: u64,
    pub fds: u64,
    pub chunks: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub file_bytes: u64,
}

fn prot_string(prot: u32) -> String {
    let bit = |b: u32, c: char| if prot & b != 0 { c } else { '-' };
    [bit(1, 'r'), bit(2, 'w'), bit(4, 'x')].iter().collect()
}

/// RFC 3339 UTC time of a Unix time in nanoseconds (civil-from-days, proleptic Gregorian).
fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn counts_of(c: &crate::ChunkRef) -> PageCounts {
    PageCounts {
        chunks: 1,
        data_pages: c.data_pages,
        zero_pages: c.zero_pages,
        parent_pages: c.parent_pages,
        raw_bytes: c.raw_len,
        stored_bytes: c.data_len,
    }
}

impl PageCounts {
    fn add(&mut self, o: &PageCounts) {
        self.chunks += o.chunks;
        self.data_pages += o.data_pages;
        self.zero_pages += o.zero_pages;
        self.parent_pages += o.parent_pages;
        self.raw_bytes += o.raw_bytes;
        self.stored_bytes += o.stored_bytes;
    }
}

fn process_report(p: &proto::Process, pages: PageCounts) -> ProcessReport {
    let vma_kind = named!(VmaKind, "VMA_KIND_");
    ProcessReport {
        itimers: p.itimers.clone(),
        sched: p.sched,
        oom_score_adj: p.oom_score_adj,
        no_new_privs: p.no_new_privs,
        dumpable: p.dumpable,
        shared_pending: pending_report(&p.shared_pending),
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        comm: p.comm.clone(),
        exe_path: p.exe_path.clone(),
        cmdline: p.cmdline.clone(),
        cwd: p.cwd.clone(),
        root: p.root.clone(),
        umask: format!("{:04o}", p.umask),
        personality: format!("{:#x}", p.personality),
        creds: p.creds.clone(),
        vdso_hash: hex::encode(&p.vdso_hash),
        mm: p.mm.as_ref().map(|m| MmReport {
            start_code: hex64(m.start_code),
            end_code: hex64(m.end_code),
            start_data: hex64(m.start_data),
            end_data: hex64(m.end_data),
            start_brk: hex64(m.start_brk),
            brk: hex64(m.brk),
            start_stack: hex64(m.start_stack),
            arg_start: hex64(m.arg_start),
            arg_end: hex64(m.arg_end),
            env_start: hex64(m.env_start),
            env_end: hex64(m.env_end),
            auxv: m
                .auxv
                .chunks_exact(16)
                .map(|pair| {
                    let mut a = [0u8; 8];
                    let mut b = [0u8; 8];
                    a.copy_from_slice(&pair[..8]);
                    b.copy_from_slice(&pair[8..]);
                    (hex64(u64::from_ne_bytes(a)), hex64(u64::from_ne_bytes(b)))
                })
                .collect(),
        }),
        threads: p
            .threads
            .iter()
            .map(|t| ThreadReport {
                tid: t.tid,
                name: t.name.clone(),
                regs: t.regs.as_ref().map(RegsReport::from),
                xstate_len: t.xstate.len(),
                xstate: hex::encode(&t.xstate),
                sigmask: format!("{:#018x}", t.sigmask),
                rseq: t.rseq.as_ref().map(|r| RseqReport {
                    abi_pointer: hex64(r.abi_pointer),
                    abi_size: r.abi_size,
                    flags: r.flags,
                    signature: format!("{:#010x}", r.signature),
                }),
                sigaltstack: t.sigaltstack,
                pending: pending_report(&t.pending),
            })
            .collect(),
        vmas: p
            .vmas
            .iter()
            .map(|v| VmaReport {
                start: hex64(v.start),
                end: hex64(v.end),
                size: v.end.saturating_sub(v.start),
                prot: prot_string(v.prot),
                kind: vma_kind(v.kind),
                pgoff: hex64(v.pgoff),
                path: v.path.clone(),
                name: v.name.clone(),
                vm_flags: v.vm_flags.clone(),
                shmem_id: v.shmem_id,
                sysv_shmid: v.sysv_shmid,
                file: v.file,
            })
            .collect(),
        fds: p.fds.iter().map(fd_report).collect(),
        sigactions: p
            .sigactions
            .iter()
            .map(|s| SigActionReport {
                signo: s.signo,
                handler: hex64(s.handler),
                flags: hex64(s.flags),
                restorer: hex64(s.restorer),
                mask: format!("{:#018x}", s.mask),
            })
            .collect(),
        rlimits: p.rlimits.clone(),
        pages,
        stopped: p.stopped,
        zombie: p.zombie,
        wait_status: p.wait_status,
        child_subreaper: p.child_subreaper,
        pdeathsig: p.pdeathsig,
        files_shared_with_parent: p.files_shared_with_parent,
        pipes: p
            .pipes
            .iter()
            .map(|x| PipeReport {
                id: x.id,
                size: x.size,
                buffered: x.data.len(),
                data_hash: blake3::hash(&x.data).to_hex().to_string(),
            })
            .collect(),
        unix_pairs: p.unix_pairs.iter().map(unix_pair_report).collect(),
    }
}

fn fd_report(f: &proto::Fd) -> FdReport {
    let fd_kind = named!(FdKind, "FD_KIND_");
    FdReport {
        fd: f.fd,
        kind: fd_kind(f.kind),
        path: f.path.clone(),
        flags: format!("{:#o}", f.flags),
        offset: f.offset,
        file: f.file,
        inherited_from: f.inherited_from.clone(),
        desc_id: f.desc_id,
        pipe_id: f.pipe_id,
        eventfd_count: f.eventfd_count,
        eventfd_semaphore: f.eventfd_semaphore,
        timerfd: f.timerfd,
        signalfd_mask: format!("{:#018x}", f.signalfd_mask),
        epoll_watches: f.epoll_watches.clone(),
        inotify_watches: f.inotify_watches.clone(),
        socket: socket_summary(f),
    }
}

fn unix_pair_report(u: &proto::UnixPair) -> UnixPairReport {
    let queue = |msgs: &[Vec<u8>], attached: &[proto::Attachment]| {
        msgs.iter()
            .enumerate()
            .map(|(k, m)| QueuedReport {
                bytes: m.len(),
                data_hash: blake3::hash(m).to_hex().to_string(),
                in_flight: attached
                    .iter()
                    .filter(|a| a.message as usize == k)
                    .flat_map(|a| a.files.iter())
                    .map(|f| InFlightReport {
                        desc_id: f.desc_id,
                        file: f.file.as_ref().map(fd_report),
                    })
                    .collect(),
            })
            .collect()
    };
    let sock_type = match u.sock_type {
        1 => "STREAM".to_string(),
        2 => "DGRAM".to_string(),
        5 => "SEQPACKET".to_string(),
        t => format!("UNKNOWN({t})"),
    };
    UnixPairReport {
        id: u.id,
        peer: u.peer,
        sock_type,
        queued_for_id: queue(&u.queued_for_id, &u.attached_for_id),
        queued_for_peer: queue(&u.queued_for_peer, &u.attached_for_peer),
    }
}

/// Everything in `image`. Uses only what [`Image::open`] validated; reads no page data.
pub fn report(image: &Image) -> InspectReport {
    let space_name = named!(SpaceKind, "SPACE_KIND_");
    let run_kind = named!(RunKind, "RUN_KIND_");
    let encoding = named!(Encoding, "ENCODING_");
    let workload = named!(WorkloadKind, "WORKLOAD_KIND_");

    let mut per_space: std::collections::BTreeMap<(i32, u64), PageCounts> = Default::default();
    let mut totals = Totals::default();
    let chunks: Vec<ChunkReport> = image
        .chunks()
        .iter()
        .map(|c| {
            let counts = counts_of(c);
            per_space
                .entry((c.space as i32, c.space_id))
                .or_default()
                .add(&counts);
            ChunkReport {
                index: c.index,
                space: space_name(c.space as i32),
                space_id: c.space_id,
                vaddr_start: hex64(c.vaddr_start),
                vaddr_end: hex64(c.vaddr_end),
                runs: c
                    .runs
                    .iter()
                    .map(|r| RunReport {
                        vaddr: hex64(r.vaddr),
                        pages: r.pages,
                        kind: run_kind(r.kind),
                    })
                    .collect(),
                encoding: encoding(c.encoding as i32),
                data_pages: c.data_pages,
                zero_pages: c.zero_pages,
                parent_pages: c.parent_pages,
                raw_len: c.raw_len,
                stored_len: c.data_len,
                raw_hash: hex::encode(c.raw_hash),
                data_hash: hex::encode(c.data_hash),
                chunk_offset: c.chunk_offset,
                data_offset: c.data_offset,
            }
        })
        .collect();
    for c in per_space.values() {
        totals.chunks += c.chunks;
        totals.data_pages += c.data_pages;
        totals.zero_pages += c.zero_pages;
        totals.parent_pages += c.parent_pages;
        totals.raw_bytes += c.raw_bytes;
        totals.stored_bytes += c.stored_bytes;
    }
    let processes: Vec<ProcessReport> = image
        .processes()
        .iter()
        .map(|p| {
            let key = (SpaceKind::Process as i32, u64::from(p.pid));
            let pages = per_space.remove(&key).unwrap_or_default();
            totals.processes += 1;
            totals.threads += p.threads.len() as u64;
            totals.vmas += p.vmas.len() as u64;
            totals.fds += p.fds.len() as u64;
            process_report(p, pages)
        })
        .collect();
    let other_spaces = per_space
        .into_iter()
        .map(|((space, space_id), pages)| SpaceReport {
            space: space_name(space),
            space_id,
            pages,
        })
        .collect();
    totals.file_bytes = image.file_len();
    let inv = image.inventory();
    let (major, minor) = image.version();
    InspectReport {
        format: format!("{major}.{minor}"),
        file_bytes: image.file_len(),
        inventory: InventoryReport {
            format_major: inv.format_major,
            format_minor: inv.format_minor,
            image_id: inv.image_id.clone(),
            tool: inv.tool.clone(),
            created_unix_ns: inv.created_unix_ns,
            created: rfc3339(inv.created_unix_ns),
            kind: workload(inv.kind),
            parent: inv.parent.clone(),
            kernel_release: inv.kernel_release.clone(),
            hostname: inv.hostname.clone(),
            page_size: inv.page_size,
            root_pid: inv.root_pid,
            pid_namespace: inv.pid_namespace,
            compression: inv.compression.clone(),
            xcr0: hex64(inv.xcr0),
            container: inv.container.clone(),
            vm: inv.vm.as_ref().map(crate::inspect_vm::VmReport::of),
        },
        processes,
        other_spaces,
        chunks,
        totals,
    }
}

/// Human-readable size.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn pages_line(p: &PageCounts) -> String {
    format!(
        "{} data ({} stored as {}), {} zero, {} parent, in {} chunks",
        p.data_pages,
        size(p.raw_bytes),
        size(p.stored_bytes),
        p.zero_pages,
        p.parent_pages,
        p.chunks
    )
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inventory;
        writeln!(
            f,
            "stasis image {}  (format {}, {})",
            i.image_id,
            self.format,
            size(self.file_bytes)
        )?;
        writeln!(f, "  written by   {} at {}", i.tool, i.created)?;
        writeln!(
            f,
            "  source       {} (kernel {}), page size {}, xcr0 {}",
            i.hostname, i.kernel_release, i.page_size, i.xcr0
        )?;
        let ns = if i.pid_namespace {
            " (a whole pid namespace; PIDs as seen in it)"
        } else {
            ""
        };
        writeln!(
            f,
            "  workload     {}, root pid {}{ns}, compression {}",
            i.kind, i.root_pid, i.compression
        )?;
        if let Some(p) = &i.parent {
            writeln!(f, "  parent       {} ({})", p.image_id, p.path_hint)?;
        }
        if let Some(c) = &i.container {
            fmt_container(f, c)?;
        }
        if let Some(vm) = &i.vm {
            write!(f, "{vm}")?;
        }
        writeln!(f, "  pages        {}", pages_line(&self.totals_counts()))?;
        for p in &self.processes {
            writeln!(f)?;
            writeln!(
                f,
                "process {} ({})  ppid {} pgid {} sid {}",
                p.pid, p.comm, p.ppid, p.pgid, p.sid
            )?;
            if p.zombie {
                writeln!(f, "  zombie, wait status {:#x}", p.wait_status)?;
                continue;
            }
            let mut notes = Vec::new();
            if p.stopped {
                notes.push("stopped".to_string());
            }
            if p.child_subreaper {
                notes.push("child subreaper".to_string());
            }
            if p.files_shared_with_parent {
                notes.push("fd table shared with its parent".to_string());
            }
            if p.pdeathsig != 0 {
                notes.push(format!("pdeathsig {}", p.pdeathsig));
            }
            if !notes.is_empty() {
                writeln!(f, "  state    {}", notes.join(", "))?;
            }
            writeln!(f, "  exe      {}", p.exe_path)?;
            if !p.cmdline.is_empty() {
                writeln!(f, "  cmdline  {}", p.cmdline.join(" "))?;
            }
            writeln!(
                f,
                "  cwd      {}  root {}  umask {}",
                p.cwd, p.root, p.umask
            )?;
            writeln!(f, "  pages    {}", pages_line(&p.pages))?;
            writeln!(f, "  threads ({}):", p.threads.len())?;
            for t in &p.threads {
                let (rip, rsp) = t
                    .regs
                    .as_ref()
                    .map_or(("-", "-"), |r| (r.rip.as_str(), r.rsp.as_str()));
                writeln!(
                    f,
                    "    {:>7} {:<16} rip {rip} rsp {rsp}  xstate {} B",
                    t.tid, t.name, t.xstate_len
                )?;
            }
            writeln!(f, "  VMAs ({}):", p.vmas.len())?;
            for v in &p.vmas {
                let label = if v.name.is_empty() { &v.path } else { &v.name };
                writeln!(
                    f,
                    "    {:>18}-{:<18} {} {:>10} {:<14} {:<24} {}",
                    v.start,
                    v.end,
                    v.prot,
                    size(v.size),
                    v.kind,
                    label,
                    v.vm_flags.join(" ")
                )?;
            }
            writeln!(f, "  fds ({}):", p.fds.len())?;
            for d in &p.fds {
                let what = if !d.socket.is_empty() {
                    &d.socket
                } else if d.inherited_from.is_empty() {
                    &d.path
                } else {
                    &d.inherited_from
                };
                writeln!(
                    f,
                    "    {:>4} {:<12} {}  flags {} offset {} desc {}",
                    d.fd, d.kind, what, d.flags, d.offset, d.desc_id
                )?;
            }
            for x in &p.pipes {
                writeln!(
                    f,
                    "  pipe {}: {} of {} bytes buffered",
                    x.id, x.buffered, x.size
                )?;
            }
            for u in &p.unix_pairs {
                u.fmt_into(f)?;
            }
            if !p.sigactions.is_empty() {
                let sigs: Vec<String> = p.sigactions.iter().map(|s| s.signo.to_string()).collect();
                writeln!(f, "  signal handlers for: {}", sigs.join(" "))?;
            }
        }
        for s in &self.other_spaces {
            writeln!(f)?;
            writeln!(f, "{} {}: {}", s.space, s.space_id, pages_line(&s.pages))?;
        }
        Ok(())
    }
}

impl UnixPairReport {
    fn fmt_into(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = |q: &[QueuedReport]| q.iter().map(|m| m.bytes).sum::<usize>();
        writeln!(
            f,
            "  unix pair {} <-> {} ({}): {} messages ({} bytes) queued for {}, {} ({} bytes) for {}",
            self.id,
            self.peer,
            self.sock_type,
            self.queued_for_id.len(),
            bytes(&self.queued_for_id),
            self.id,
            self.queued_for_peer.len(),
            bytes(&self.queued_for_peer),
            self.peer
        )?;
        for (end, q) in [
            (self.id, &self.queued_for_id),
            (self.peer, &self.queued_for_peer),
        ] {
            for (k, m) in q
                .iter()
                .enumerate()
                .filter(|(_, m)| !m.in_flight.is_empty())
            {
                let files: Vec<String> = m
                    .in_flight
                    .iter()
                    .map(|x| match &x.file {
                        Some(d) => format!(
                            "{} {} offset {} flags {}",
                            d.kind, d.path, d.offset, d.flags
                        ),
                        None => format!("desc {}", x.desc_id),
                    })
                    .collect();
                writeln!(
                    f,
                    "    for {end}, message {k} ({} bytes) carries in flight: {}",
                    m.bytes,
                    files.join(", ")
                )?;
            }
        }
        Ok(())
    }
}

impl InspectReport {
    fn totals_counts(&self) -> PageCounts {
        let t = &self.totals;
        PageCounts {
            chunks: t.chunks,
            data_pages: t.data_pages,
            zero_pages: t.zero_pages,
            parent_pages: t.parent_pages,
            raw_bytes: t.raw_bytes,
            stored_bytes: t.stored_bytes,
        }
    }
}

/// One line naming a socket fd's addresses and queues; empty for other fds.
fn socket_summary(f: &proto::Fd) -> String {
    let addr = |ip: &str, port: u32| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    if let Some(t) = &f.tcp {
        return format!(
            "tcp {} <-> {}, {} bytes unacknowledged ({} unsent), {} bytes unread",
            addr(&t.ip, t.port),
            addr(&t.peer_ip, t.peer_port),
            t.send_queue.len(),
            t.unsent,
            t.recv_queue.len()
        );
    }
    if let Some(t) = &f.tcp_listen {
        if f.kind == proto::FdKind::TcpSocket as i32 {
            return format!("tcp, not connected, bound to {}", addr(&t.ip, t.port));
        }
        return format!("tcp listening on {}", addr(&t.ip, t.port));
    }
    if let Some(u) = &f.udp {
        return match u.peer_ip.is_empty() {
            true => format!("udp {}", addr(&u.ip, u.port)),
            false => format!(
                "udp {} -> {}",
                addr(&u.ip, u.port),
                addr(&u.peer_ip, u.peer_port)
            ),
        };
    }
    if let Some(u) = &f.unix_listen {
        if f.kind == proto::FdKind::UnixBound as i32 {
            return match u.name.is_empty() {
                true => "unix, unbound".to_string(),
                false => format!(
                    "unix bound to {:?}{}",
                    String::from_utf8_lossy(&u.name).trim_end_matches('\0'),
                    if u.deleted { " (deleted)" } else { "" }
                ),
            };
        }
        return format!(
            "unix listening on {:?}{}",
            String::from_utf8_lossy(&u.name).trim_end_matches('\0'),
            if u.deleted { " (deleted)" } else { "" }
        );
    }
    if f.socket_id != 0 {
        return format!("unix socket {} <-> {}", f.socket_id, f.socket_peer);
    }
    String::new()
}

fn fmt_container(f: &mut fmt::Formatter<'_>, c: &proto::Container) -> fmt::Result {
    writeln!(
        f,
        "  container    {} (host name {}), command {:?}",
        c.name, c.hostname, c.command
    )?;
    let root = if c.rootfs.is_empty() {
        "the host's"
    } else {
        &c.rootfs
    };
    writeln!(f, "    rootfs     {root}")?;
    writeln!(f, "    network    {}", c.net_mode)?;
    for i in &c.interfaces {
        writeln!(
            f,
            "      {} ({}{}, mtu {}, {}) {}",
            i.name,
            i.kind,
            if i.mac.is_empty() {
                String::new()
            } else {
                format!(" {}", i.mac)
            },
            i.mtu,
            if i.up { "up" } else { "down" },
            i.addresses.join(" ")
        )?;
    }
    for r in &c.routes {
        let via = if r.gateway.is_empty() {
            String::new()
        } else {
            format!(" via {}", r.gateway)
        };
        writeln!(f, "      route {}{via} dev {}", r.destination, r.dev)?;
    }
    if let Some(l) = &c.limits {
        let mut parts = Vec::new();
        if let Some(m) = l.memory {
            parts.push(format!("memory {}", size(m)));
        }
        if let Some(m) = l.swap {
            parts.push(format!("swap {}", size(m)));
        }
        if let Some(c) = l.cpus {
            parts.push(format!("cpus {c}"));
        }
        if let Some(w) = l.cpu_weight {
            parts.push(format!("cpu weight {w}"));
        }
        if let Some(p) = l.pids {
            parts.push(format!("pids {p}"));
        }
        for t in &l.io {
            parts.push(format!("io {}:{} {} {}", t.major, t.minor, t.kind, t.value));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        writeln!(f, "    limits     {}", parts.join(", "))?;
    }
    if let Some(i) = &c.ipc {
        let msgs: usize = i.msg.iter().map(|q| q.messages.len()).sum();
        writeln!(
            f,
            "    ipc        {} shm segments ({}), {} semaphore sets, {} message queues ({msgs} messages)",
            i.shm.len(),
            size(i.shm.iter().map(|s| s.size).sum()),
            i.sem.len(),
            i.msg.len()
        )?;
    }
    let mounts: Vec<String> = c
        .mounts
        .iter()
        .map(|m| format!("{} ({})", m.path, m.fstype))
        .collect();
    writeln!(f, "    mounts     {}", mounts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_and_names() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(named!(VmaKind, "VMA_KIND_")(1), "ANON_PRIVATE");
        assert_eq!(named!(VmaKind, "VMA_KIND_")(99), "UNKNOWN(99)");
        assert_eq!(prot_string(5), "r-x");
        assert_eq!(size(4096), "4.0 KiB");
    }
}
