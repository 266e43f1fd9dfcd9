//! Building the new process: fork it with its PID, replace its address space by injected
//! syscalls from the trampoline, write its memory, restore its kernel state and registers.

use crate::error::RestoreError;
use crate::pages::{self, Written};
use crate::validate::special_name;
use stasis_image::proto::{self, FdKind, VmaKind};
use stasis_image::Image;
use stasis_runtime::inject::Injector;
use stasis_runtime::ptrace::{self, Regs, ResumeIn};
use stasis_runtime::spawn::{self, TreeSpec};
use stasis_runtime::{memory, procfs, tcp_repair, RuntimeError, PAGE_SIZE};

// Scratch layout (offsets from the scratch start).
const SCR_MM_MAP: u64 = 0;
const SCR_AUXV: u64 = 512;
const SCR_SIGACTIONS: u64 = 8192;
const SCR_STRING: u64 = 16384;
const SCR_GROUPS: u64 = 32768;
const SCR_MISC: u64 = 40960;
const MAX_STRING: usize = 16383;

/// Creates the tree, builds every process and lets them all run; returns what was written
/// and the root's PID as the restorer sees it. Each process is put in its cgroups first
/// (`cgroups`); `unlock` lets the tree's TCP connections back onto the network once
/// everything is built and before anything runs. On failure every process created is killed
/// and reaped.
pub fn apply(
    image: &Image,
    procs: &[&proto::Process],
    plan: crate::plan::Plan,
    (cgroups, unlock, hold): (
        &crate::cgroups::Placement,
        &dyn Fn() -> Result<(), RuntimeError>,
        Option<&crate::Hold>,
    ),
    precopied: Option<&crate::Precopied>,
) -> Result<(Written, i32), RestoreError> {
    let root = procs.first().map_or(0, |p| p.pid as i32);
    let tree = spawn::spawn_tree(&plan.spec).map_err(|source| RestoreError::Apply {
        pid: root,
        cause: source,
    })?;
    // The tree holds its own copies now.
    drop(plan.descs);
    let host_root = tree.root();
    let last_of_table = last_of_each_fd_table(procs, &tree.procs);
    let mut built: Vec<Builder> = Vec::new();
    let mut written = Written::default();
    // Epoll descriptions whose watches are added (once, by the first process holding one).
    let mut epolls_done = std::collections::BTreeSet::new();
    let result = (|| {
        // Before any memory is written, so it is charged where it was.
        for s in &tree.procs {
            cgroups.place(s.ns_pid, s.pid)?;
        }
        for (k, s) in tree.procs.iter().enumerate() {
            let p = procs
                .iter()
                .find(|p| p.pid as i32 == s.ns_pid)
                .ok_or_else(|| RestoreError::Invalid(format!("process {} is unknown", s.ns_pid)))?;
            let mut b = Builder {
                inj: Injector::new(s.pid, plan.spec.trampoline).map_err(|source| {
                    RestoreError::Apply {
                        pid: s.ns_pid,
                        cause: source,
                    }
                })?,
                pid: s.pid,
                ns_pid: s.ns_pid,
                pid_ns: plan.spec.pid_ns.is_some(),
                tids: vec![s.pid],
                scratch: plan.spec.trampoline + PAGE_SIZE,
                spec: &plan.spec,
                shmem_fds: &plan.shmem_fds,
                ghost_fds: &plan.ghost_fds,
                close_kept: last_of_table.contains(&k),
                extra: Vec::new(),
                precopied,
                kept: precopied.map(|h| h.kept(p)).unwrap_or_default(),
            };
            let r = b.build(image, p, s.ctl_fd, &mut epolls_done);
            built.push(b);
            let w = r?;
            written.pages += w.pages;
            written.bytes += w.bytes;
        }
        // Every file is open and mapped for good now: locks, then signal owners, then the
        // trampolines go.
        let image_proc = |b: &Builder| {
            procs
                .iter()
                .copied()
                .find(|p| p.pid as i32 == b.ns_pid)
                .ok_or_else(|| RestoreError::Invalid(format!("process {} is unknown", b.ns_pid)))
        };
        for pass in [crate::locks::Pass::Locks, crate::locks::Pass::Owners] {
            for b in built.iter_mut() {
                let p = image_proc(b)?;
                b.take_locks(procs, p, pass)?;
            }
        }
        for b in built.iter_mut() {
            let p = image_proc(b)?;
            b.finish(p)?;
        }
        // Whole and stopped: the workflow decides whether it runs.
        if let Some(h) = hold {
            let held = crate::Held {
                pid: host_root,
                processes: built.len() as u64,
            };
            (h.0)(&held)?;
        }
        // Unlocked while still in repair mode: if that fails, they close without a word
        // when the tree is killed, and stay locked for another restore. (Nothing to do,
        // and nft not needed, for a tree without locked connections or held listeners.)
        unlock().map_err(RestoreError::NetworkUnlock)?;
        // Connections leave repair mode last: from now on they may send.
        for (fd, unsent, what) in &plan.tcp {
            tcp_repair::finish(std::os::fd::AsRawFd::as_raw_fd(fd), unsent, what).map_err(|e| {
                RestoreError::Unsupported(format!("finishing a TCP connection: {e}"))
            })?;
        }
        // Nothing runs until everything is built: a parent could otherwise see a child that
        // is not restored yet. Job-control-stopped processes go first and are seen stopped
        // before anything else runs; then children before parents, the root last.
        let stopped = |b: &Builder| procs.iter().any(|p| p.pid as i32 == b.ns_pid && p.stopped);
        for b in built.iter().filter(|b| stopped(b)) {
            b.release(job_stop_signal(procs, b.ns_pid))?;
        }
        for b in built.iter().filter(|b| stopped(b)) {
            b.wait_job_stopped()?;
        }
        for b in built.iter().rev().filter(|b| !stopped(b)) {
            b.release(0)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            tree.release();
            Ok((written, host_root))
        }
        Err(e) => {
            // Traced threads must be reaped before their group leader can be.
            let threads: Vec<i32> = built
                .iter()
                .flat_map(|b| b.extra.iter().map(Injector::pid))
                .collect();
            tree.kill(&threads);
            Err(e)
        }
    }
}

/// The signal that job-control-stopped process `ns_pid` (SIGSTOP for images that do not
/// say).
fn job_stop_signal(procs: &[&proto::Process], ns_pid: i32) -> i32 {
    match procs.iter().find(|p| p.pid as i32 == ns_pid) {
        Some(p)
            if matches!(
                p.stop_signal as i32,
                libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
            ) =>
        {
            p.stop_signal as i32
        }
        _ => libc::SIGSTOP,
    }
}

/// Indexes (into `spawned`) of the processes built last among those sharing one fd table:
/// they close the fds every process kept (TreeSpec::keep_fds) once they are done, and not
/// before, or a process built later would find them closed in its shared table.
fn last_of_each_fd_table(
    procs: &[&proto::Process],
    spawned: &[spawn::Spawned],
) -> std::collections::BTreeSet<usize> {
    let by_pid: std::collections::BTreeMap<u32, &proto::Process> =
        procs.iter().map(|p| (p.pid, *p)).collect();
    // A table is named by the process that owns it: the nearest ancestor (or itself) that
    // does not share its parent's.
    let owner = |pid: u32| {
        let mut at = pid;
        for _ in 0..procs.len() {
            match by_pid.get(&at) {
                Some(p) if p.files_shared_with_parent => at = p.ppid,
                _ => break,
            }
        }
        at
    };
    let mut last = std::collections::BTreeMap::new();
    for (k, s) in spawned.iter().enumerate() {
        last.insert(owner(s.ns_pid as u32), k);
    }
    last.into_values().collect()
}

struct Builder<'a> {
    inj: Injector,
    /// Its PID as the restorer sees it (ptrace, /proc).
    pid: i32,
    /// Its PID as it sees it (the image's; injected syscalls take this one).
    ns_pid: i32,
    /// It is in a pid namespace of its own (the two PIDs differ).
    pid_ns: bool,
    /// Host thread ids of its threads, in image order (main first), as they are created.
    tids: Vec<i32>,
    scratch: u64,
    spec: &'a TreeSpec,
    /// The fd each process kept of every shared memory object and ghost file it maps.
    shmem_fds: &'a std::collections::BTreeMap<u64, i32>,
    ghost_fds: &'a std::collections::BTreeMap<u32, i32>,
    /// It closes the kept fds (see [`last_of_each_fd_table`]).
    close_kept: bool,
    /// Injectors of the threads after the main one, in image order.
    extra: Vec<Injector>,
    /// The pages of its pre-copied mappings (see [`crate::precopied`]).
    precopied: Option<&'a crate::Precopied>,
    /// The regions of them it keeps to move into place (none: they are copied).
    kept: Vec<(u64, u64)>,
}

impl Builder<'_> {
    fn err(&self, source: RuntimeError) -> RestoreError {
        RestoreError::Apply {
            pid: self.ns_pid,
            cause: source,
        }
    }

    fn call(
        &mut self,
        name: &'static str,
        nr: libc::c_long,
        args: &[u64],
    ) -> Result<u64, RestoreError> {
        let pid = self.ns_pid;
        self.inj
            .call(name, nr, args)
            .map_err(|source| RestoreError::Apply { pid, cause: source })
    }

    /// The fd this process kept of shared memory object `id` or ghost file `ghost`.
    fn kept_fd(&self, shmem: Option<u64>, ghost: Option<u32>) -> Result<u64, RestoreError> {
        let fd = match (shmem, ghost) {
            (Some(id), _) => self.shmem_fds.get(&id),
            (None, Some(id)) => self.ghost_fds.get(&id),
            (None, None) => None,
        };
        fd.map(|&fd| fd as u64).ok_or_else(|| {
            RestoreError::Invalid(format!(
                "process {}: a mapped object (shared memory {shmem:?}, ghost file {ghost:?}) was \
                 not prepared",
                self.ns_pid
            ))
        })
    }

    fn poke(&self, off: u64, bytes: &[u8]) -> Result<u64, RestoreError> {
        let addr = self.scratch + off;
        memory::write_remote(self.pid, &[(addr, bytes.len())], bytes).map_err(|e| self.err(e))?;
        Ok(addr)
    }

    fn poke_str(&self, s: &str) -> Result<u64, RestoreError> {
        if s.len() > MAX_STRING || s.contains('\0') {
            return Err(RestoreError::Invalid(format!(
                "string {s:?} is too long or holds NUL"
            )));
        }
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.poke(SCR_STRING, &bytes)
    }

    /// Builds the process up to its final registers; it stays stopped.
    fn build(
        &mut self,
        image: &Image,
        p: &proto::Process,
        ctl_fd: i32,
        epolls_done: &mut std::collections::BTreeSet<u32>,
    ) -> Result<Written, RestoreError> {
        // The child inherited our rseq registration; drop it before its memory goes away.
        if let Some(r) = ptrace::get_rseq(self.pid).map_err(|e| self.err(e))? {
            self.call(
                "rseq(unregister)",
                libc::SYS_rseq,
                &[r.abi_pointer, r.abi_size as u64, 1, r.signature as u64],
            )?;
        }
        // A process sharing its parent's fd table has no control pipe of its own.
        if ctl_fd >= 0 {
            self.inj
                .raw(libc::SYS_close, &[ctl_fd as u64])
                .map_err(|e| self.err(e))?;
        }
        let vdso_block = self.clear_address_space()?;
        self.place_vdso(p, &vdso_block)?;
        // The exe link can only change while the old executable (stasis) is unmapped and
        // before the target maps its own executable, which may be the same file.
        self.set_mm(p)?;
        let fixups = self.map_vmas(p)?;
        if self.close_kept {
            // Mapped: the objects stay reachable through the mappings alone.
            for &fd in &self.spec.keep_fds {
                self.call("close(kept fd)", libc::SYS_close, &[fd as u64])?;
            }
        }
        let written = pages::write_pages(image, p, self.pid)?;
        self.finish_vmas(&fixups)?;
        crate::mmflags::after_contents(p, &mut |n, nr, a| self.call(n, nr, a))?;
        // Before the threads are made (they inherit it) and the credentials dropped.
        self.set_loginuid(p)?;
        self.set_sigactions(p)?;
        self.create_threads(p)?;
        self.in_each_thread(p, |b, t, main| b.set_thread_state(p, t, main))?;
        self.set_signal_state(p)?;
        self.add_epoll_watches(p, epolls_done)?;
        self.call(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, p.pdeathsig as u64],
        )?;
        // chroot after every open by host path (exe, mapped and ghost files), before the
        // credentials drop the right to do it. The cwd (set by the child) lies inside it.
        if p.root != "/" {
            let at = self.poke_str(&p.root)?;
            self.call("chroot", libc::SYS_chroot, &[at])?;
        }
        // seccomp while the restorer's credentials still allow it; suspended for the rest.
        if crate::seccomp::any(p) {
            let mut injs: Vec<&mut Injector> = std::iter::once(&mut self.inj)
                .chain(self.extra.iter_mut())
                .collect();
            let opts =
                libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE;
            let r = crate::seccomp::install(p, &mut injs, opts);
            drop(injs);
            r.map_err(|e| self.err(e))?;
        }
        // Credentials and no_new_privs belong to each thread.
        self.in_each_thread(p, |b, _, _| {
            b.set_creds(p)?;
            if p.no_new_privs {
                b.call(
                    "prctl(PR_SET_NO_NEW_PRIVS)",
                    libc::SYS_prctl,
                    &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
                )?;
            }
            Ok(())
        })?;
        // After the ids: changing them resets dumpable.
        if p.dumpable <= 1 {
            self.call(
                "prctl(PR_SET_DUMPABLE)",
                libc::SYS_prctl,
                &[libc::PR_SET_DUMPABLE as u64, p.dumpable as u64],
            )?;
        }
        self.set_sched(p)?;
        for (i, th) in p.threads.iter().enumerate() {
            let tid = self.tids[i];
            ptrace::set_xstate(tid, &th.xstate).map_err(|e| self.err(e))?;
            // The main thread's mask is set in finish(), after its last injected call: with a
            // signal unblocked there, a pending one would be taken at that call's signal stop.
            if i > 0 {
                ptrace::set_sigmask(tid, th.sigmask).map_err(|e| self.err(e))?;
                ptrace::set_regs(tid, &final_regs_of(th)?).map_err(|e| self.err(e))?;
            }
        }
        Ok(written)
    }

    /// Takes back the locks, leases or signal owners of `p` (see [`crate::locks`]).
    fn take_locks(
        &mut self,
        procs: &[&proto::Process],
        p: &proto::Process,
        pass: crate::locks::Pass,
    ) -> Result<(), RestoreError> {
        let mut t = crate::locks::Target {
            inj: &mut self.inj,
            pid: self.pid,
            scratch: self.scratch + SCR_MISC,
        };
        crate::locks::take(&mut t, procs, p, pass)
    }

    /// Removes the trampoline and sets the final registers and signal mask of the main thread.
    fn finish(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let t = p
            .threads
            .first()
            .ok_or_else(|| RestoreError::Invalid(format!("process {} has no thread", p.pid)))?;
        let main_regs = final_regs_of(t)?;
        crate::mmflags::lock_future(p, &mut |n, nr, a| self.call(n, nr, a))?;
        // Remove the trampoline; the main thread holds at that munmap's exit, where the
        // final registers replace the injected ones. The other threads are stopped with
        // their final registers already and never run trampoline code again.
        let rc = self
            .inj
            .raw(
                libc::SYS_munmap,
                &[self.spec.trampoline, self.spec.trampoline_len()],
            )
            .map_err(|e| self.err(e))?;
        if rc != 0 {
            return Err(self.err(RuntimeError::sys(
                "munmap(trampoline)",
                format!("pid {}", self.pid),
                std::io::Error::from_raw_os_error(-rc as i32),
            )));
        }
        ptrace::set_regs(self.pid, &main_regs).map_err(|e| self.err(e))?;
        // Only now, with nothing left to inject: every signal stayed blocked through the
        // injected calls, and the pending ones are delivered once it runs (the kernel looks
        // at the queues again when a thread leaves its ptrace stop).
        ptrace::set_sigmask(self.pid, t.sigmask).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Lets the built process run, stopped again first by `stop_signal` (nonzero) if job
    /// control had stopped it.
    fn release(&self, stop_signal: i32) -> Result<(), RestoreError> {
        if stop_signal != 0 {
            // Delivered on the way out of the ptrace stop: it stops before running, and its
            // parent's waitpid(WUNTRACED) reports the same signal as before.
            stasis_runtime::sys::kill(self.pid, stop_signal).map_err(|e| self.err(e))?;
        }
        for inj in &self.extra {
            ptrace::detach(inj.pid(), 0).map_err(|e| self.err(e))?;
        }
        ptrace::detach(self.pid, 0).map_err(|e| self.err(e))
    }

    /// Adds the saved watches of every epoll fd (the fd table is complete by now).
    fn add_epoll_watches(
        &mut self,
        p: &proto::Process,
        done: &mut std::collections::BTreeSet<u32>,
    ) -> Result<(), RestoreError> {
        for f in p.fds.iter().filter(|f| f.kind() == FdKind::Epoll) {
            if f.desc_id != 0 && !done.insert(f.desc_id) {
                continue;
            }
            for w in &f.epoll_watches {
                // struct epoll_event is packed on x86_64: u32 events, u64 data.
                let mut ev = Vec::with_capacity(12);
                ev.extend_from_slice(&w.events.to_ne_bytes());
                ev.extend_from_slice(&w.data.to_ne_bytes());
                let at = self.poke(SCR_MISC, &ev)?;
                self.call(
                    "epoll_ctl(EPOLL_CTL_ADD)",
                    libc::SYS_epoll_ctl,
                    &[f.fd as u64, libc::EPOLL_CTL_ADD as u64, w.fd as u64, at],
                )?;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until a released process is in its job-control stop.
    fn wait_job_stopped(&self) -> Result<(), RestoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let st = procfs::read_stat(self.pid).map_err(|e| self.err(e))?;
            if st.state == 'T' {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(self.err(RuntimeError::Protocol {
                    op: "restore: stop again",
                    pid: self.pid,
                    what: format!("it did not stop (state {})", st.state),
                }));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Runs `f` with the injector of every thread in turn (main first).
    fn in_each_thread(
        &mut self,
        p: &proto::Process,
        mut f: impl FnMut(&mut Self, &proto::Thread, bool) -> Result<(), RestoreError>,
    ) -> Result<(), RestoreError> {
        f(self, &p.threads[0], true)?;
        for i in 1..p.threads.len() {
            std::mem::swap(&mut self.inj, &mut self.extra[i - 1]);
            let r = f(self, &p.threads[i], false);
            std::mem::swap(&mut self.inj, &mut self.extra[i - 1]);
            r?;
        }
        Ok(())
    }

    /// Creates the other threads from the main one: clone3 with CLONE_THREAD and set_tid,
    /// each new thread auto-attached (PTRACE_O_TRACECLONE) and stopped before it runs.
    fn create_threads(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        if p.threads.len() < 2 {
            return Ok(());
        }
        let main = self.pid;
        ptrace::set_options(
            main,
            libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE,
        )
        .map_err(|e| self.err(e))?;
        for t in &p.threads[1..] {
            let regs = t.regs.as_ref().ok_or_else(|| {
                RestoreError::Invalid(format!("thread {} has no registers", t.tid))
            })?;
            let mut flags = (libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS) as u64;
            if t.clear_child_tid != 0 {
                flags |= libc::CLONE_CHILD_CLEARTID as u64;
            }
            let set_tid_at = self.scratch + SCR_MISC + 128;
            let args: [u64; 11] = [
                flags,
                0,
                t.clear_child_tid,
                0,
                0,
                0,
                0,
                regs.fs_base,
                set_tid_at,
                1,
                0,
            ];
            let mut raw: Vec<u8> = args.iter().flat_map(|v| v.to_ne_bytes()).collect();
            raw.resize(128, 0);
            raw.extend_from_slice(&(t.tid as i32).to_ne_bytes());
            let at = self.poke(SCR_MISC, &raw)?;
            let got = self.call("clone3(thread)", libc::SYS_clone3, &[at, 88])?;
            if got != t.tid as u64 {
                return Err(self.err(RuntimeError::Protocol {
                    op: "clone3(thread)",
                    pid: main,
                    what: format!("asked for thread id {}, got {got}", t.tid),
                }));
            }
            // The thread id it sees came back; the one to trace it by is the kernel's word.
            let tid = if self.pid_ns {
                stasis_runtime::pidns::host_tid(main, t.tid as i32).map_err(|e| self.err(e))?
            } else {
                t.tid as i32
            };
            self.tids.push(tid);
            loop {
                match ptrace::wait_stop(tid).map_err(|e| self.err(e))? {
                    ptrace::Stop::EventStop(_) => break,
                    ptrace::Stop::Signal(_) => ptrace::cont(tid, 0).map_err(|e| self.err(e))?,
                    other => {
                        return Err(self.err(RuntimeError::Protocol {
                            op: "clone3(thread)",
                            pid: tid,
                            what: format!("new thread reported {other:?}"),
                        }))
                    }
                }
            }
            self.extra
                .push(Injector::new(tid, self.spec.trampoline).map_err(|e| self.err(e))?);
        }
        Ok(())
    }

    /// What each thread sets for itself: rseq (the main thread's inherited registration was
    /// dropped before its memory was replaced), robust futex list, clear-child-tid (main;
    /// the others got it from clone3), sigaltstack, name, personality.
    fn set_thread_state(
        &mut self,
        p: &proto::Process,
        t: &proto::Thread,
        main: bool,
    ) -> Result<(), RestoreError> {
        if let Some(r) = &t.rseq {
            self.call(
                "rseq(register)",
                libc::SYS_rseq,
                &[r.abi_pointer, r.abi_size as u64, 0, r.signature as u64],
            )?;
        }
        if t.robust_list != 0 {
            self.call(
                "set_robust_list",
                libc::SYS_set_robust_list,
                &[t.robust_list, t.robust_list_len],
            )?;
        }
        if main && t.clear_child_tid != 0 {
            self.call(
                "set_tid_address",
                libc::SYS_set_tid_address,
                &[t.clear_child_tid],
            )?;
        }
        if let Some(ss) = &t.sigaltstack {
            if ss.flags & libc::SS_DISABLE as u32 == 0 {
                let mut raw = Vec::with_capacity(24);
                raw.extend_from_slice(&ss.sp.to_ne_bytes());
                // SS_ONSTACK is reported, never set.
                raw.extend_from_slice(
                    &((ss.flags & !(libc::SS_ONSTACK as u32)) as u64).to_ne_bytes(),
                );
                raw.extend_from_slice(&ss.size.to_ne_bytes());
                let at = self.poke(SCR_MISC, &raw)?;
                self.call("sigaltstack", libc::SYS_sigaltstack, &[at, 0])?;
            }
        }
        let name: String = t.name.chars().take(15).collect();
        let at = self.poke_str(&name)?;
        self.call(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            &[libc::PR_SET_NAME as u64, at],
        )?;
        self.call(
            "personality",
            libc::SYS_personality,
            &[p.personality as u64],
        )?;
        Ok(())
    }

    /// Unmaps everything the child inherited except the trampoline and the vDSO block,
    /// which it returns.
    fn clear_address_space(&mut self) -> Result<Vec<procfs::MapEntry>, RestoreError> {
        let block: Vec<procfs::MapEntry> = procfs::read_maps(self.pid)
            .map_err(|e| self.err(e))?
            .into_iter()
            .filter(procfs::MapEntry::is_vdso_block)
            .collect();
        let mut keep: Vec<(u64, u64)> = block.iter().map(|m| (m.start, m.end)).collect();
        keep.push((
            self.spec.trampoline,
            self.spec.trampoline + self.spec.trampoline_len(),
        ));
        keep.extend_from_slice(&self.kept);
        keep.sort_unstable();
        let mut from = 0u64;
        for (s, e) in keep
            .into_iter()
            .chain([(crate::validate::TASK_SIZE, crate::validate::TASK_SIZE)])
        {
            if s > from {
                self.call("munmap", libc::SYS_munmap, &[from, s - from])?;
            }
            from = from.max(e);
        }
        Ok(block)
    }

    /// Moves [vvar], [vvar_vclock] and [vdso] to the target's addresses as one block.
    fn place_vdso(
        &mut self,
        p: &proto::Process,
        ours: &[procfs::MapEntry],
    ) -> Result<(), RestoreError> {
        let theirs: Vec<&proto::Vma> = p
            .vmas
            .iter()
            .filter(|v| special_name(v.kind()).is_some())
            .collect();
        if ours.is_empty() || ours.len() != theirs.len() {
            return Err(RestoreError::Unsupported(
                "vDSO layout differs from the image's".into(),
            ));
        }
        let o_start = ours[0].start;
        let o_end = ours.iter().map(|m| m.end).max().unwrap_or(o_start);
        let t_start = theirs[0].start;
        if o_start == t_start {
            return Ok(());
        }
        let len = o_end - o_start;
        let t_end = t_start + len;
        let tramp_end = self.spec.trampoline + self.spec.trampoline_len();
        let mut current = o_start;
        if t_start < o_end && o_start < t_end {
            // Overlapping: go through a free spot above everything involved.
            let temp = (o_end.max(t_end).max(tramp_end) + (16 << 20)) & !0xffff;
            self.move_block(ours, current, temp)?;
            current = temp;
        }
        self.move_block(ours, current, t_start)
    }

    fn move_block(
        &mut self,
        block: &[procfs::MapEntry],
        from: u64,
        to: u64,
    ) -> Result<(), RestoreError> {
        let base = block[0].start;
        for m in block {
            let old = from + (m.start - base);
            let new = to + (m.start - base);
            self.call(
                "mremap(vdso block)",
                libc::SYS_mremap,
                &[
                    old,
                    m.len(),
                    m.len(),
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    new,
                ],
            )?;
        }
        Ok(())
    }

    /// Maps every target VMA (writable where contents must be written); returns the final
    /// protections to apply afterwards.
    fn map_vmas(&mut self, p: &proto::Process) -> Result<Vec<(u64, u64, u32)>, RestoreError> {
        let mut fixups = Vec::new();
        for v in &p.vmas {
            let len = v.end - v.start;
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
            let fixed = libc::MAP_FIXED_NOREPLACE as u64;
            match v.kind() {
                VmaKind::AnonPrivate if v.precopied => {
                    self.place_precopied(p, v)?;
                    fixups.push((v.start, len, v.prot));
                }
                VmaKind::AnonPrivate => {
                    let flags = crate::mmflags::anon_private_flags(v) | fixed;
                    self.mmap(v.start, len, rw, flags, u64::MAX, 0)?;
                    fixups.push((v.start, len, v.prot));
                }
                VmaKind::AnonShared => {
                    // The object made once for the tree, at its offset: shared again.
                    let fd = self.kept_fd(Some(v.shmem_id), None)?;
                    let flags = libc::MAP_SHARED as u64 | fixed;
                    self.mmap(v.start, len, rw, flags, fd, v.pgoff)?;
                    fixups.push((v.start, len, v.prot));
                }
                VmaKind::FilePrivate | VmaKind::FileShared => {
                    let shared = v.kind() == VmaKind::FileShared;
                    let oflags = if shared {
                        crate::mmflags::shared_file_access(v)
                    } else {
                        libc::O_RDONLY
                    };
                    let map = if shared {
                        (v.prot, libc::MAP_SHARED as u64 | fixed)
                    } else {
                        (v.prot | rw, libc::MAP_PRIVATE as u64 | fixed)
                    };
                    if v.ghost_id != 0 {
                        // Its fd was kept (opened for reading and writing). A mapping holds
                        // the file it was made from: one that may never write is made from a
                        // read-only open, or the file would stay open for writing (and
                        // execve of a memfd fail with ETXTBSY) as it did not before.
                        let fd = self.kept_fd(None, Some(v.ghost_id))?;
                        let may_write = shared && oflags == libc::O_RDWR;
                        if may_write {
                            self.mmap(v.start, len, map.0, map.1, fd, v.pgoff)?;
                        } else {
                            let path = format!("/proc/self/fd/{fd}");
                            let open = ("openat(mapped ghost file)", path.as_str(), libc::O_RDONLY);
                            self.mmap_file(open, v, map)?;
                        }
                    } else {
                        let open = ("openat(mapped file)", v.path.as_str(), oflags);
                        self.mmap_file(open, v, map)?;
                    }
                    if !shared {
                        fixups.push((v.start, len, v.prot));
                    }
                }
                VmaKind::SysvShm => {
                    // The segment was recreated with its id in the container's IPC
                    // namespace; its first mapping attaches it whole (validated), the
                    // others are parts of that attachment with their own protections.
                    if v.pgoff == 0 {
                        let mut flags = 0u64;
                        if !v.vm_flags.iter().any(|f| f == "mw") {
                            flags |= libc::SHM_RDONLY as u64;
                        }
                        if v.vm_flags.iter().any(|f| f == "me") {
                            flags |= libc::SHM_EXEC as u64;
                        }
                        let at = self.call(
                            "shmat",
                            libc::SYS_shmat,
                            &[u64::from(v.sysv_shmid), v.start, flags],
                        )?;
                        if at != v.start {
                            return Err(RestoreError::Invalid(format!(
                                "process {}: System V segment {} attached at {at:#x}, not {:#x}",
                                p.pid, v.sysv_shmid, v.start
                            )));
                        }
                    }
                    fixups.push((v.start, len, v.prot));
                }
                VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => {}
                VmaKind::Unspecified => {
                    return Err(RestoreError::Invalid(format!(
                        "mapping {:#x} has no kind",
                        v.start
                    )))
                }
            }
            crate::mmflags::advise(v, &mut |n, nr, a| self.call(n, nr, a))?;
        }
        Ok(fixups)
    }

    /// Makes pre-copied mapping `v` of `p` with its pages: its region moved into place, or
    /// (see [`crate::precopied`]) mapped as usual and the pages that were sent copied in.
    fn place_precopied(&mut self, p: &proto::Process, v: &proto::Vma) -> Result<(), RestoreError> {
        let held = self
            .precopied
            .and_then(|h| h.mapping(p.pid as i32, v.start, v.end))
            .ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "process {}: the pages of mapping {:#x}-{:#x} are not held here",
                    p.pid, v.start, v.end
                ))
            })?;
        let len = v.end - v.start;
        let at = held.region.addr();
        // Kept (see Precopied::kept) means movable, and nothing of the process's in the way.
        if self.kept.iter().any(|&(s, _)| s == at) {
            self.call(
                "mremap(pre-copied mapping)",
                libc::SYS_mremap,
                &[
                    at,
                    len,
                    len,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    v.start,
                ],
            )?;
            return Ok(());
        }
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let flags = crate::mmflags::anon_private_flags(v) | libc::MAP_FIXED_NOREPLACE as u64;
        self.mmap(v.start, len, rw, flags, u64::MAX, 0)?;
        let bytes = held.region.as_slice();
        for &(s, e) in &held.data {
            let data = s
                .checked_sub(v.start)
                .filter(|_| e <= v.end && s <= e)
                .and_then(|off| bytes.get(off as usize..(off + (e - s)) as usize));
            let Some(data) = data else {
                return Err(RestoreError::Invalid(format!(
                    "process {}: pre-copied pages {s:#x}-{e:#x} lie outside mapping {:#x}-{:#x}",
                    p.pid, v.start, v.end
                )));
            };
            memory::write_remote(self.pid, &[(s, data.len())], data).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Opens `path` in the new process (close-on-exec); returns the fd.
    fn open_path(
        &mut self,
        what: &'static str,
        path: &str,
        flags: i32,
    ) -> Result<u64, RestoreError> {
        let at = self.poke_str(path)?;
        // O_NOATIME: mapping a file counts as reading it, and the restore must not change
        // its access time; only the file's owner (or CAP_FOWNER) may ask for that.
        let quiet = (flags | libc::O_CLOEXEC | libc::O_NOATIME) as u64;
        let rc = self
            .inj
            .raw(libc::SYS_openat, &[libc::AT_FDCWD as u64, at, quiet, 0])
            .map_err(|e| self.err(e))?;
        if rc >= 0 {
            return Ok(rc as u64);
        }
        let flags = (flags | libc::O_CLOEXEC) as u64;
        self.call(
            what,
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, at, flags, 0],
        )
    }

    /// Maps `v`'s range from a file opened (`what`, path, open flags) in the new process, with
    /// (prot, mmap flags), at the mapping's offset; the fd is closed again.
    fn mmap_file(
        &mut self,
        (what, path, oflags): (&'static str, &str, i32),
        v: &proto::Vma,
        (prot, flags): (u32, u64),
    ) -> Result<(), RestoreError> {
        let fd = self.open_path(what, path, oflags)?;
        let r = self.mmap(v.start, v.end - v.start, prot, flags, fd, v.pgoff);
        self.call("close", libc::SYS_close, &[fd])?;
        r
    }

    fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        flags: u64,
        fd: u64,
        off: u64,
    ) -> Result<(), RestoreError> {
        let got = self.call(
            "mmap",
            libc::SYS_mmap,
            &[addr, len, prot as u64, flags, fd, off],
        )?;
        if got != addr {
            return Err(self.err(RuntimeError::Protocol {
                op: "mmap",
                pid: self.pid,
                what: format!("asked for {addr:#x}, got {got:#x}"),
            }));
        }
        Ok(())
    }

    fn finish_vmas(&mut self, fixups: &[(u64, u64, u32)]) -> Result<(), RestoreError> {
        for &(start, len, prot) in fixups {
            self.call("mprotect", libc::SYS_mprotect, &[start, len, prot as u64])?;
        }
        Ok(())
    }

    /// PR_SET_MM_MAP: code/data/brk/stack/arg/env bounds, auxv and the exe link.
    fn set_mm(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let mm =
            p.mm.as_ref()
                .ok_or_else(|| RestoreError::Invalid("no mm state".into()))?;
        if mm.auxv.len() > 4096 || !mm.auxv.len().is_multiple_of(8) {
            return Err(RestoreError::Invalid(format!(
                "auxv is {} bytes",
                mm.auxv.len()
            )));
        }
        let auxv = self.poke(SCR_AUXV, &mm.auxv)?;
        let exe_fd = self.open_path("openat(exe)", &p.exe_path, libc::O_RDONLY)?;
        let mut map = Vec::with_capacity(104);
        for v in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv,
        ] {
            map.extend_from_slice(&v.to_ne_bytes());
        }
        map.extend_from_slice(&(mm.auxv.len() as u32).to_ne_bytes());
        map.extend_from_slice(&(exe_fd as u32).to_ne_bytes());
        let at = self.poke(SCR_MM_MAP, &map)?;
        const PR_SET_MM: u64 = 35;
        const PR_SET_MM_MAP: u64 = 14;
        let r = self.call(
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            &[PR_SET_MM, PR_SET_MM_MAP, at, map.len() as u64, 0],
        );
        self.call("close", libc::SYS_close, &[exe_fd])?;
        r.map(drop)
    }

    fn set_sigactions(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let mut table = vec![0u8; 64 * 32];
        for a in &p.sigactions {
            if a.signo == 0 || a.signo > 64 {
                return Err(RestoreError::Invalid(format!(
                    "sigaction for signal {}",
                    a.signo
                )));
            }
            let off = (a.signo as usize - 1) * 32;
            for (i, v) in [a.handler, a.flags, a.restorer, a.mask]
                .into_iter()
                .enumerate()
            {
                table[off + i * 8..off + i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
            }
        }
        let base = self.poke(SCR_SIGACTIONS, &table)?;
        for sig in 1..=64u64 {
            if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                continue;
            }
            self.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[sig, base + (sig - 1) * 32, 0, 8],
            )?;
        }
        Ok(())
    }

    /// sigaltstack, pending signals (queued while every signal is still blocked, so they
    /// wait for the final mask), interval timers with their remaining time, no_new_privs.
    fn set_signal_state(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        // Every thread's own queue, and the process's shared one (tid 0).
        let queues = p.shared_pending.iter().map(|s| (0u32, s)).chain(
            p.threads
                .iter()
                .flat_map(|t| t.pending.iter().map(|s| (t.tid, s))),
        );
        for (tid, sig) in queues {
            if sig.signo == 0 || sig.signo > 64 || sig.siginfo.len() != ptrace::SIGINFO_SIZE {
                return Err(RestoreError::Invalid(format!(
                    "pending signal {} is malformed",
                    sig.signo
                )));
            }
            if sig.signo == libc::SIGKILL as u32 || sig.signo == libc::SIGSTOP as u32 {
                continue;
            }
            let at = self.poke(SCR_MISC, &sig.siginfo)?;
            // Injected: the PID it sees.
            let pid = self.ns_pid as u64;
            if tid == 0 {
                self.call(
                    "rt_sigqueueinfo",
                    libc::SYS_rt_sigqueueinfo,
                    &[pid, sig.signo as u64, at],
                )?;
            } else {
                self.call(
                    "rt_tgsigqueueinfo",
                    libc::SYS_rt_tgsigqueueinfo,
                    &[pid, tid as u64, sig.signo as u64, at],
                )?;
            }
        }
        for it in &p.itimers {
            if it.which > 2 {
                return Err(RestoreError::Invalid(format!(
                    "interval timer {}",
                    it.which
                )));
            }
            let mut raw = Vec::with_capacity(32);
            for us in [it.interval_us, it.value_us] {
                raw.extend_from_slice(&(us / 1_000_000).to_ne_bytes());
                raw.extend_from_slice(&(us % 1_000_000).to_ne_bytes());
            }
            let at = self.poke(SCR_MISC, &raw)?;
            self.call("setitimer", libc::SYS_setitimer, &[it.which as u64, at, 0])?;
        }
        self.set_posix_timers(p)?;
        Ok(())
    }

    /// POSIX timers with their original ids (PR_TIMER_CREATE_RESTORE_IDS), clocks, signal
    /// settings and remaining time.
    fn set_posix_timers(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
        if p.posix_timers.is_empty() {
            return Ok(());
        }
        let pid = self.pid;
        let on = self
            .inj
            .raw(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 1])
            .map_err(|e| self.err(e))?;
        if on != 0 {
            return Err(RestoreError::Unsupported(format!(
                "process {}: this kernel cannot recreate POSIX timers with their ids \
                 (prctl PR_TIMER_CREATE_RESTORE_IDS failed with errno {})",
                p.pid, -on
            )));
        }
        for t in &p.posix_timers {
            let mut sev = vec![0u8; 64];
            sev[0..8].copy_from_slice(&t.sigval.to_ne_bytes());
            sev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
            sev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
            sev[16..20].copy_from_slice(&t.notify_tid.to_ne_bytes());
            sev.extend_from_slice(&t.id.to_ne_bytes());
            let at = self.poke(SCR_MISC, &sev)?;
            self.call(
                "timer_create",
                libc::SYS_timer_create,
                &[t.clock_id as u64, at, at + 64],
            )?;
            let mut got = [0u8; 4];
            memory::read_remote(pid, &[(at + 64, 4)], &mut got).map_err(|e| self.err(e))?;
            if i32::from_ne_bytes(got) != t.id {
                return Err(self.err(RuntimeError::Protocol {
                    op: "timer_create",
                    pid,
                    what: format!(
                        "asked for timer id {}, got {}",
                        t.id,
                        i32::from_ne_bytes(got)
                    ),
                }));
            }
            if t.value_ns != 0 {
                let mut its = Vec::with_capacity(32);
                for ns in [t.interval_ns, t.value_ns] {
                    its.extend_from_slice(&(ns / 1_000_000_000).to_ne_bytes());
                    its.extend_from_slice(&(ns % 1_000_000_000).to_ne_bytes());
                }
                let at = self.poke(SCR_MISC, &its)?;
                self.call(
                    "timer_settime",
                    libc::SYS_timer_settime,
                    &[t.id as u64, 0, at, 0],
                )?;
            }
        }
        self.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)",
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, 0],
        )?;
        Ok(())
    }

    /// Nice value, scheduling policy and OOM score adjustment, set from outside.
    fn set_sched(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let pid = self.pid;
        // Applied to every thread (the image keeps the main thread's values).
        for tid in self.tids.clone() {
            if let Some(s) = &p.sched {
                let param = libc::sched_param {
                    sched_priority: s.priority as i32,
                };
                // SAFETY: param is a valid sched_param; pid is our stopped child.
                if unsafe { libc::sched_setscheduler(tid, s.policy as i32, &param) } != 0 {
                    return Err(self.err(RuntimeError::last_os(
                        "sched_setscheduler",
                        format!("pid {pid} policy {}", s.policy),
                    )));
                }
                // SAFETY: setpriority takes no pointers.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as u32, s.nice) } != 0 {
                    return Err(self.err(RuntimeError::last_os(
                        "setpriority",
                        format!("pid {pid} nice {}", s.nice),
                    )));
                }
            }
        }
        let path = format!("/proc/{pid}/oom_score_adj");
        std::fs::write(&path, p.oom_score_adj.to_string())
            .map_err(|e| self.err(RuntimeError::sys("write", path, e)))?;
        Ok(())
    }

    /// Credentials last: after them the process may lose the privileges the steps above
    /// needed. Order: securebits (needs CAP_SETPCAP), keep-caps across the uid change,
    /// bounding-set drops, groups/gids/uids, then capset and ambient capabilities.
    fn set_creds(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let Some(c) = &p.creds else { return Ok(()) };
        let me = procfs::read_status(std::process::id() as i32).map_err(|e| self.err(e))?;
        if c.uids.len() != 4 || c.gids.len() != 4 || c.groups.len() > 1024 {
            return Err(RestoreError::Invalid("malformed credentials".into()));
        }
        let ids_same = c.uids == me.uids && c.gids == me.gids && c.groups == me.groups;
        let caps_same = (
            c.cap_inheritable,
            c.cap_permitted,
            c.cap_effective,
            c.cap_bounding,
            c.cap_ambient,
        ) == (me.cap_inh, me.cap_prm, me.cap_eff, me.cap_bnd, me.cap_amb);
        if ids_same && caps_same && c.securebits == 0 {
            return Ok(());
        }
        let lacking = (c.cap_permitted | c.cap_bounding) & !(me.cap_prm & me.cap_bnd);
        if lacking != 0 {
            return Err(RestoreError::Unsupported(format!(
                "process {} holds capabilities {lacking:#x} that stasis itself lacks",
                p.pid
            )));
        }
        const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;
        const PR_CAP_AMBIENT: u64 = 47;
        const PR_CAP_AMBIENT_RAISE: u64 = 2;
        const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
        /// The *_LOCKED bits of every securebit.
        const SECBITS_LOCKS: u32 = 0b1010_1010_1010;
        let prctl = libc::SYS_prctl;
        let set_securebits = |b: &mut Self, bits: u32| {
            b.call(
                "prctl(PR_SET_SECUREBITS)",
                prctl,
                &[libc::PR_SET_SECUREBITS as u64, bits as u64],
            )
        };
        for cap in 0..64u64 {
            if me.cap_bnd & (1 << cap) != 0 && c.cap_bounding & (1 << cap) == 0 {
                self.call(
                    "prctl(PR_CAPBSET_DROP)",
                    prctl,
                    &[libc::PR_CAPBSET_DROP as u64, cap],
                )?;
            }
        }
        if !ids_same {
            // The ids change with the capabilities left alone (no setuid fixup), so every
            // one of the four ids of each set can be given; capset sets the final ones.
            set_securebits(
                self,
                (c.securebits & !SECBITS_LOCKS) | SECBIT_NO_SETUID_FIXUP,
            )?;
            self.set_ids(c)?;
        }
        if c.securebits != 0 || !ids_same {
            set_securebits(self, c.securebits)?;
        }
        // capset v3: header {version, pid}, then two {effective, permitted, inheritable}.
        let mut cap = Vec::with_capacity(32);
        cap.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
        cap.extend_from_slice(&0u32.to_ne_bytes());
        for half in [0, 32] {
            for set in [c.cap_effective, c.cap_permitted, c.cap_inheritable] {
                cap.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
            }
        }
        let at = self.poke(SCR_MISC, &cap)?;
        self.call("capset", libc::SYS_capset, &[at, at + 8])?;
        self.call(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            prctl,
            &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL],
        )?;
        for cap in 0..64u64 {
            if c.cap_ambient & (1 << cap) != 0 {
                self.call(
                    "prctl(PR_CAP_AMBIENT_RAISE)",
                    prctl,
                    &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap],
                )?;
            }
        }
        Ok(())
    }

    /// The audit login uid: only a task itself may write its /proc/PID/loginuid (with
    /// CAP_AUDIT_CONTROL once it is set), so the new process does, unless it inherited the
    /// right one from the restorer. (The audit session id cannot be chosen: the kernel
    /// gives a new one.)
    fn set_loginuid(&mut self, p: &proto::Process) -> Result<(), RestoreError> {
        let Some(uid) = p.loginuid else {
            return Ok(());
        };
        let own = procfs::read_text("/proc/self/loginuid").map_err(|e| self.err(e))?;
        if own.trim().parse::<u32>().ok() == Some(uid) {
            return Ok(());
        }
        let path = self.poke_str("/proc/self/loginuid")?;
        let text = uid.to_string();
        let data = self.poke(SCR_MISC, text.as_bytes())?;
        let fd = self.call(
            "openat(/proc/self/loginuid)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                path,
                (libc::O_WRONLY | libc::O_CLOEXEC) as u64,
            ],
        )?;
        let written = self.call(
            "write(/proc/self/loginuid)",
            libc::SYS_write,
            &[fd, data, text.len() as u64],
        );
        self.call("close", libc::SYS_close, &[fd])?;
        written?;
        Ok(())
    }

    /// Supplementary groups, then real, effective, saved and filesystem gid and uid; each
    /// fs id is read back (setfsuid(2) reports no error).
    fn set_ids(&mut self, c: &proto::Credentials) -> Result<(), RestoreError> {
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        let at = if groups.is_empty() {
            0
        } else {
            self.poke(SCR_GROUPS, &groups)?
        };
        self.call(
            "setgroups",
            libc::SYS_setgroups,
            &[c.groups.len() as u64, at],
        )?;
        let (g, u) = (&c.gids, &c.uids);
        self.call(
            "setresgid",
            libc::SYS_setresgid,
            &[g[0] as u64, g[1] as u64, g[2] as u64],
        )?;
        self.call("setfsgid", libc::SYS_setfsgid, &[g[3] as u64])?;
        self.call(
            "setresuid",
            libc::SYS_setresuid,
            &[u[0] as u64, u[1] as u64, u[2] as u64],
        )?;
        self.call("setfsuid", libc::SYS_setfsuid, &[u[3] as u64])?;
        let fsgid = self.call("setfsgid(-1)", libc::SYS_setfsgid, &[u32::MAX as u64])?;
        let fsuid = self.call("setfsuid(-1)", libc::SYS_setfsuid, &[u32::MAX as u64])?;
        if (fsuid, fsgid) != (u64::from(u[3]), u64::from(g[3])) {
            return Err(self.err(RuntimeError::Protocol {
                op: "setfsuid/setfsgid",
                pid: self.pid,
                what: format!(
                    "fs ids are {fsuid}/{fsgid}, not {}/{} as in the image",
                    u[3], g[3]
                ),
            }));
        }
        Ok(())
    }
}

pub(crate) fn regs_from_proto(r: &proto::X86Regs) -> Regs {
    // SAFETY: user_regs_struct is plain old data; every field is set below.
    let mut o: Regs = unsafe { std::mem::zeroed() };
    o.r15 = r.r15;
    o.r14 = r.r14;
    o.r13 = r.r13;
    o.r12 = r.r12;
    o.rbp = r.rbp;
    o.rbx = r.rbx;
    o.r11 = r.r11;
    o.r10 = r.r10;
    o.r9 = r.r9;
    o.r8 = r.r8;
    o.rax = r.rax;
    o.rcx = r.rcx;
    o.rdx = r.rdx;
    o.rsi = r.rsi;
    o.rdi = r.rdi;
    o.orig_rax = r.orig_rax;
    o.rip = r.rip;
    o.cs = r.cs;
    o.eflags = r.eflags;
    o.rsp = r.rsp;
    o.ss = r.ss;
    o.fs_base = r.fs_base;
    o.gs_base = r.gs_base;
    o.ds = r.ds;
    o.es = r.es;
    o.fs = r.fs;
    o.gs = r.gs;
    o
}

/// The registers a thread resumes with: as saved, an interrupted syscall rewound so the new
/// task issues it again.
fn final_regs_of(t: &proto::Thread) -> Result<Regs, RestoreError> {
    let regs = t
        .regs
        .as_ref()
        .ok_or_else(|| RestoreError::Invalid(format!("thread {} has no registers", t.tid)))?;
    Ok(ptrace::rewind_interrupted_syscall(
        &regs_from_proto(regs),
        ResumeIn::NewTask,
    ))
}
