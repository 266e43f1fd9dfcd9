//! The VMM process of one VM: it owns the VM, runs each vCPU on a thread of its own
//! ([`super::threads`]), writes the serial
//! console to the VM's log (and the terminal in the foreground), and answers on a unix
//! control socket. Its record, `STATE/vms/NAME.json`, names its PID and start time and is
//! believed only while that process lives, like a container's; the log is `NAME.log` and
//! the socket `NAME.sock` beside it.
//!
//! Control protocol (version 1): a client connects, sends one line (`status` or `stop`)
//! and reads one line of JSON, a [`VmReport`]; `stop` answers once every vCPU has left
//! KVM_RUN and the VM is torn down. The snapshot commands (`dirty-log start`, `pause`) are
//! described in [`super::snapshot`]; `console-input` (a stream of bytes for the guest's
//! serial receiver) in [`super::console`].

use super::console::{self, lock};
use super::demo::{self, DemoConfig};
use super::linux;
use super::report::ReportDevice;
use super::serial::{Serial, COM1, COM1_IRQ};
use super::snapshot::{self, Paused, Restore, Resumed, VmSnapshot};
use super::state::VmState;
use super::threads::VcpuThreads;
use super::vcpu::{self, Devices, Ended, VmStatus};
use super::vm::Vm;
use super::{hardware_virtualization, KvmError};
use crate::container::{check_name, process_alive, StateDir};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Version of [`VmRecord`] and of the control protocol.
pub const VERSION: u32 = 1;

/// What the VM runs.
#[derive(Debug, Clone)]
pub enum Guest {
    /// The built-in demo guest.
    Demo,
    /// A Linux bzImage (needs VMX/SVM).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// What `stasis vm run` was asked for.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// Bytes of guest memory.
    pub memory: u64,
    /// 1 to [`demo::MAX_VCPUS`] for the demo guest, 1 for a Linux kernel.
    pub vcpus: u32,
    pub guest: Guest,
    /// The demo guest's steps between reports.
    pub report_every: u64,
    /// The demo guest's step limit (0: none).
    pub steps: u64,
    /// Iterations of a delay loop before each of the demo guest's steps (benchmarks).
    pub step_delay: u64,
    /// Give the VM an in-kernel irqchip and PIT (always for a Linux guest; for the demo
    /// guest, which uses neither, so their state goes through snapshots too).
    pub irqchip: bool,
    /// Start from this snapshot instead of booting the guest.
    pub restore: Option<Restore>,
}

/// The record of a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    /// The VMM process.
    pub pid: i32,
    pub starttime: u64,
    /// Seconds since the epoch.
    pub created: u64,
    pub memory: u64,
    pub vcpus: u32,
    pub guest: String,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl VmRecord {
    pub fn alive(&self) -> bool {
        process_alive(self.pid, self.starttime)
    }
}

/// One vCPU's demo workload, as its report device last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuReport {
    pub index: u32,
    /// Steps done by this vCPU, on its own slice of the work area.
    pub counter: u64,
    pub checksum: u64,
    pub reports: u64,
    pub errors: u64,
}

/// A VM's state as its VMM reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub version: u32,
    pub name: String,
    pub pid: i32,
    /// running, stopped (by the VMM), shutdown (by the guest), halted, failed.
    pub state: String,
    pub guest: String,
    pub memory: u64,
    pub vcpus: u32,
    /// The demo guest's steps at the vCPUs' last reports, summed over its vCPUs (with one
    /// vCPU: its counter; once memory is filled, at least the work area's pages).
    pub counter: u64,
    /// vCPU 0's checksum at its last report (each vCPU's is in `per_vcpu`).
    pub checksum: u64,
    /// Summed over the vCPUs.
    pub reports: u64,
    /// Reports (or memory checks) that did not match the host's model of the workload,
    /// summed over the vCPUs.
    pub errors: u64,
    pub last_error: Option<String>,
    pub serial_bytes: u64,
    pub exits: u64,
    /// Microseconds from the first KVM_RUN to the guest's first port I/O.
    pub setup_us: u64,
    pub uptime_ms: u64,
    pub steps_per_sec: f64,
    /// Why the VM ended (failed: the error).
    pub end: Option<String>,
    /// Where guest memory is mapped in the VMM (for reading it with process_vm_readv).
    #[serde(default)]
    pub mem_host_addr: u64,
    /// Bytes of console input queued for the guest that it has not read yet.
    #[serde(default)]
    pub serial_rx: u64,
    /// Each vCPU's counter and checksum, in vCPU order.
    #[serde(default)]
    pub per_vcpu: Vec<VcpuReport>,
}

/// Refuses what this host or this VMM cannot run, before anything is created.
pub fn check_config(cfg: &VmConfig) -> Result<(), KvmError> {
    let name = &cfg.name;
    check_name(name)?;
    if let Guest::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &cfg.guest
    {
        if hardware_virtualization().is_none() {
            return Err(KvmError::Unsupported {
                vm: name.clone(),
                what: format!(
                    "cannot boot the Linux kernel {}: this host's CPU has no VMX or SVM \
                     (no vmx/svm flag in /proc/cpuinfo), so /dev/kvm is a software \
                     virtualizer (PVM) that cannot boot a stock Linux guest; use --guest demo",
                    kernel.display()
                ),
            });
        }
        if cfg.restore.is_none() {
            linux::check(name, kernel, initrd.as_deref(), cmdline, cfg.memory)?;
        }
    }
    let max = match cfg.guest {
        Guest::Demo => demo::MAX_VCPUS,
        Guest::Kernel { .. } => 1,
    };
    if !(1..=max).contains(&cfg.vcpus) {
        return Err(KvmError::invalid(
            name,
            format!(
                "--vcpus {}: this VMM runs 1 to {max} vCPUs for the {} guest",
                cfg.vcpus,
                match cfg.guest {
                    Guest::Demo => "demo",
                    Guest::Kernel { .. } => "Linux",
                }
            ),
        ));
    }
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmError::Unsupported {
            vm: name.clone(),
            what: "/dev/kvm does not exist (no KVM on this host)".into(),
        });
    }
    Ok(())
}

fn guest_name(g: &Guest) -> String {
    match g {
        Guest::Demo => "demo".into(),
        Guest::Kernel { kernel, .. } => kernel.display().to_string(),
    }
}

/// Set by SIGINT/SIGTERM: stop the VM cleanly.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn install_stop_handlers(vm: &str) -> Result<(), KvmError> {
    vcpu::install_kick_handler().map_err(|e| KvmError::sys(vm, "sigaction(SIGUSR1)", e))?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vcpu::install_handler(sig, on_stop_signal)
            .map_err(|e| KvmError::sys(vm, format!("sigaction({sig})"), e))?;
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The VM, set up and recorded, before its vCPUs run.
struct Prepared {
    vm: Vm,
    /// vCPU i at index i, each with its devices.
    vcpus: Vec<(kvm_ioctls::VcpuFd, Devices)>,
    rec: VmRecord,
    listener: UnixListener,
}

fn prepare(
    state: &StateDir,
    cfg: &VmConfig,
    mut sinks: Vec<Box<dyn Write + Send>>,
) -> Result<Prepared, KvmError> {
    let name = cfg.name.as_str();
    let vms = state.vms();
    let _lock = vms.lock()?;
    if let Some(old) = vms.read_as::<VmRecord>(name)? {
        if old.alive() {
            return Err(KvmError::Exists(name.to_string()));
        }
        vms.remove(name, true)?;
    }
    let mut vm = Vm::create(name, cfg.memory)?;
    let irqchip = match &cfg.restore {
        Some(r) => r.snapshot.vm.irqchip,
        None => cfg.irqchip || matches!(cfg.guest, Guest::Kernel { .. }),
    };
    // A Linux guest (booted, or restored from a snapshot of one) ends on a reset too.
    let linux = match &cfg.restore {
        Some(r) => r.snapshot.guest != guest_name(&Guest::Demo),
        None => matches!(cfg.guest, Guest::Kernel { .. }),
    };
    if irqchip {
        // Before the vCPU: its local APIC is created with it.
        vm.create_irqchip()?;
    }
    let vcpus = (0..cfg.vcpus)
        .map(|i| vm.create_vcpu(u64::from(i)))
        .collect::<Result<Vec<_>, _>>()?;
    match (&cfg.restore, &cfg.guest) {
        (None, Guest::Demo) => demo::load(
            &vm,
            &vcpus,
            &DemoConfig {
                report_every: cfg.report_every,
                steps: cfg.steps,
                step_delay: cfg.step_delay,
            },
        )?,
        (
            None,
            Guest::Kernel {
                kernel,
                initrd,
                cmdline,
            },
        ) => {
            let [vcpu] = vcpus.as_slice() else {
                return Err(KvmError::invalid(name, "a Linux guest runs one vCPU"));
            };
            linux::load(&vm, vcpu, kernel, initrd.as_deref(), cmdline)?;
        }
        (Some(r), _) => restore_state(&vm, &vcpus, r)?,
    }
    let log = vms.log_path(name);
    let file = std::fs::File::create(&log)
        .map_err(|e| KvmError::sys(name, format!("create {}", log.display()), e))?;
    sinks.push(Box::new(file));
    let socket = vms.file_path(name, "sock");
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(KvmError::sys(
                name,
                format!("remove {}", socket.display()),
                e,
            ))
        }
    }
    let listener = UnixListener::bind(&socket)
        .map_err(|e| KvmError::sys(name, format!("bind {}", socket.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| KvmError::sys(name, "set the control socket non-blocking", e))?;
    let pid = std::process::id() as i32;
    let starttime = crate::procfs::read_stat(pid)
        .map_err(|e| KvmError::invalid(name, format!("reading its own start time: {e}")))?
        .starttime;
    let rec = VmRecord {
        version: VERSION,
        name: name.to_string(),
        pid,
        starttime,
        created: now_secs(),
        memory: cfg.memory,
        vcpus: cfg.vcpus,
        guest: guest_name(&cfg.guest),
        log,
        socket,
    };
    vms.write_as(name, &rec)?;
    let serial = Arc::new(Mutex::new(match &cfg.restore {
        None => Serial::new(COM1, sinks),
        Some(r) => Serial::from_state(&r.snapshot.serial, sinks),
    }));
    let vcpus = (0..cfg.vcpus)
        .zip(vcpus)
        .map(|(i, fd)| {
            let report = match &cfg.restore {
                None => {
                    let (base, pages) = demo::slice(cfg.memory, cfg.vcpus, i);
                    ReportDevice::new(i, base, pages, cfg.report_every, cfg.steps)
                }
                // restore_state checked there is one per vCPU.
                Some(r) => {
                    let s = usize::try_from(i)
                        .ok()
                        .and_then(|i| r.snapshot.reports.get(i))
                        .cloned()
                        .unwrap_or_default();
                    ReportDevice::from_state(i, &s)
                }
            };
            let serial = serial.clone();
            (
                fd,
                Devices {
                    serial,
                    report,
                    linux,
                },
            )
        })
        .collect();
    Ok(Prepared {
        vm,
        vcpus,
        rec,
        listener,
    })
}

/// Puts a snapshot's memory and state into a fresh VM and its vCPUs (all of them before
/// any runs).
fn restore_state(vm: &Vm, vcpus: &[kvm_ioctls::VcpuFd], r: &Restore) -> Result<(), KvmError> {
    let snap = &r.snapshot;
    if snap.memory != vm.mem.size() {
        return Err(KvmError::invalid(
            &vm.name,
            format!(
                "the snapshot has {} MiB of memory, the VM {} MiB",
                snap.memory >> 20,
                vm.mem.size() >> 20
            ),
        ));
    }
    if snap.vcpus.len() != vcpus.len() || snap.reports.len() != vcpus.len() {
        return Err(KvmError::invalid(
            &vm.name,
            format!(
                "the snapshot has {} vCPUs and {} report devices; the VM {} vCPUs",
                snap.vcpus.len(),
                snap.reports.len(),
                vcpus.len()
            ),
        ));
    }
    for (i, cpu) in snap.vcpus.iter().enumerate() {
        if usize::try_from(cpu.id).ok() != Some(i) {
            return Err(KvmError::invalid(
                &vm.name,
                format!("the snapshot's vCPU {i} is numbered {}", cpu.id),
            ));
        }
    }
    (r.fill)(&vm.name, &vm.mem).map_err(|e| KvmError::invalid(&vm.name, e))?;
    snap.vm.restore(&vm.name, &vm.fd)?;
    for (cpu, vcpu) in snap.vcpus.iter().zip(vcpus) {
        let refused = cpu.restore(&vm.name, vcpu)?;
        if !refused.is_empty() {
            eprintln!(
                "stasis: VM {}: KVM refused to set MSRs {refused:x?} of vCPU {}",
                vm.name, cpu.id
            );
        }
    }
    Ok(())
}

/// What the control loop reports from: the record, the shared status and the UART.
struct Reporter<'a> {
    rec: &'a VmRecord,
    status: &'a VmStatus,
    serial: &'a Mutex<Serial>,
    started: Instant,
}

impl Reporter<'_> {
    fn report(&self, state: &str) -> VmReport {
        let mut r = report_of(self.rec, self.status, self.started, state);
        r.serial_rx = lock(self.serial).rx_pending() as u64;
        r
    }
}

fn report_of(rec: &VmRecord, st: &VmStatus, started: Instant, state: &str) -> VmReport {
    let up = started.elapsed();
    let per_vcpu: Vec<VcpuReport> = (0u32..)
        .zip(&st.vcpus)
        .map(|(index, v)| VcpuReport {
            index,
            counter: v.counter.load(Ordering::Relaxed),
            checksum: v.checksum.load(Ordering::Relaxed),
            reports: v.reports.load(Ordering::Relaxed),
            errors: v.errors.load(Ordering::Relaxed),
        })
        .collect();
    let sum = |f: fn(&VcpuReport) -> u64| per_vcpu.iter().map(f).fold(0u64, u64::saturating_add);
    let counter = sum(|v| v.counter);
    VmReport {
        version: VERSION,
        name: rec.name.clone(),
        pid: rec.pid,
        state: state.to_string(),
        guest: rec.guest.clone(),
        memory: rec.memory,
        vcpus: rec.vcpus,
        counter,
        checksum: per_vcpu.first().map_or(0, |v| v.checksum),
        reports: sum(|v| v.reports),
        errors: sum(|v| v.errors),
        last_error: st.last_error.lock().ok().and_then(|e| e.clone()),
        serial_bytes: st.serial_bytes.load(Ordering::Relaxed),
        exits: st.exits.load(Ordering::Relaxed),
        setup_us: st.setup_us.load(Ordering::Relaxed),
        uptime_ms: u64::try_from(up.as_millis()).unwrap_or(u64::MAX),
        steps_per_sec: counter as f64 / up.as_secs_f64().max(1e-9),
        end: None,
        mem_host_addr: st.mem_host_addr.load(Ordering::Relaxed),
        serial_rx: 0,
        per_vcpu,
    }
}

/// The control loop's side of `pause`: everything it needs to pause the vCPU threads.
struct PauseControl<'a> {
    vm: &'a Vm,
    rec: &'a VmRecord,
    serial: &'a Mutex<Serial>,
    threads: &'a VcpuThreads,
}

/// How long a paused VM waits for `resume` or `stop` before resuming by itself.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(600);

/// What a paused VM was told to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterPause {
    /// It runs again (told so, or its client went away).
    Resumed,
    /// Stop it: the caller tears the VM down and answers.
    Stop,
    /// Stay paused until `resume` or `stop` comes on another connection (a migration that
    /// committed and never heard back: the operator settles it).
    Stay,
}

impl PauseControl<'_> {
    /// Pauses every vCPU, answers a [`Paused`], then waits for `resume`, `stop` or `stay`.
    fn serve(&self, conn: &mut UnixStream, dirty_logging: bool) -> AfterPause {
        let saved = match self.threads.pause_all() {
            Ok(s) => s,
            Err(e) => {
                reply_error(conn, &e);
                return AfterPause::Resumed;
            }
        };
        // Every vCPU is out of KVM_RUN: the VM-wide state and the shared UART are still.
        let vm_state = match VmState::save(&self.vm.name, &self.vm.fd, self.vm.irqchip) {
            Ok(v) => v,
            Err(e) => {
                self.threads.resume_all();
                reply_error(conn, &e);
                return AfterPause::Resumed;
            }
        };
        let serial = lock(self.serial).state();
        let at = saved
            .iter()
            .map(|s| s.at)
            .min()
            .unwrap_or_else(Instant::now);
        // Dirty logging is turned off only once the guest runs again: changing the memory
        // slot's flags takes KVM milliseconds (4-19 ms for 1 GiB here) that would otherwise
        // all be pause.
        let dirty = if dirty_logging {
            let d = self.vm.dirty_log();
            match d {
                Ok(bitmap) => Some(snapshot::dirty_runs(&bitmap)),
                Err(e) => {
                    self.threads.resume_all();
                    let _ = self.vm.set_dirty_logging(false);
                    reply_error(conn, &e);
                    return AfterPause::Resumed;
                }
            }
        } else {
            None
        };
        let (vcpus, reports) = saved.into_iter().map(|s| (s.vcpu, s.report)).unzip();
        let paused = Paused {
            snapshot: VmSnapshot {
                version: VERSION,
                name: self.rec.name.clone(),
                guest: self.rec.guest.clone(),
                memory: self.rec.memory,
                vcpus,
                vm: vm_state,
                serial,
                reports,
            },
            pid: self.rec.pid,
            mem_host_addr: self.vm.mem.host_addr(),
            dirty,
            pause_us: micros(at.elapsed()),
        };
        send_json(conn, &paused);
        let _ = conn.set_read_timeout(Some(PAUSE_TIMEOUT));
        let mut line = String::new();
        let _ = BufReader::new(&mut *conn).read_line(&mut line);
        match line.trim() {
            "stop" => {
                self.threads.stop_paused();
                return AfterPause::Stop;
            }
            "stay" => {
                if dirty_logging {
                    let _ = self.vm.set_dirty_logging(false);
                }
                send_json(conn, &Resumed { paused_us: 0 });
                return AfterPause::Stay;
            }
            _ => {}
        }
        self.threads.resume_all();
        let paused_us = micros(at.elapsed());
        if dirty_logging {
            let _ = self.vm.set_dirty_logging(false);
        }
        send_json(conn, &Resumed { paused_us });
        AfterPause::Resumed
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn send_json<T: Serialize>(conn: &mut UnixStream, v: &T) {
    if let Ok(mut text) = serde_json::to_string(v) {
        text.push('\n');
        // The client may have gone; nothing to do about it.
        let _ = conn.write_all(text.as_bytes());
    }
}

fn reply_error(conn: &mut UnixStream, e: &KvmError) {
    send_json(conn, &serde_json::json!({ "error": e.to_string() }));
}

fn reply(conn: &mut UnixStream, rep: &VmReport) {
    if let Ok(mut text) = serde_json::to_string(rep) {
        text.push('\n');
        // The client may have gone; nothing to do about it.
        let _ = conn.write_all(text.as_bytes());
    }
}

/// What the starter of a VM hears on its ready pipe: `running` once the vCPU runs, then
/// `ok` once a restored image's deferred check has passed (at once without one), or why not.
struct Confirmation {
    ready: Option<std::fs::File>,
    check: Option<std::thread::JoinHandle<Result<(), String>>>,
    failed: Option<String>,
}

impl Confirmation {
    fn new(ready: Option<OwnedFd>) -> Self {
        Confirmation {
            ready: ready.map(std::fs::File::from),
            check: None,
            failed: None,
        }
    }

    /// Starts the deferred check (before the vCPU, so a failure to start it changes nothing).
    fn start_check(&mut self, vm: &str, restore: Option<&Restore>) -> Result<(), KvmError> {
        if let Some(c) = restore.and_then(|r| r.check.clone()) {
            self.check = Some(
                std::thread::Builder::new()
                    .name("verify".into())
                    .spawn(move || c())
                    .map_err(|e| KvmError::sys(vm, "spawn the image check thread", e))?,
            );
        }
        Ok(())
    }

    fn say(&mut self, what: &str) {
        if let Some(r) = self.ready.as_mut() {
            let _ = writeln!(r, "{what}");
        }
    }

    /// The vCPU runs.
    fn running(&mut self) {
        self.say("running");
        if self.check.is_none() {
            self.confirm();
        }
    }

    fn confirm(&mut self) {
        self.say("ok");
        self.ready = None;
    }

    /// Collects the check's result if it is done (or `wait`); true when it failed.
    fn poll(&mut self, wait: bool) -> bool {
        if self.check.as_ref().is_some_and(|h| wait || h.is_finished()) {
            if let Some(h) = self.check.take() {
                match h.join() {
                    Ok(Ok(())) => self.confirm(),
                    Ok(Err(e)) => self.failed = Some(e),
                    Err(_) => self.failed = Some("the image check thread panicked".into()),
                }
            }
        }
        self.failed.is_some()
    }
}

/// Runs the VM in this process until it ends; `ready` (a pipe) hears from a
/// [`Confirmation`]: "running" and "ok", or the error that prevented either. With `go` (a
/// pipe), the VM is held once built, before any vCPU runs: `ready` hears "held PID", and
/// the guest runs only if "go" comes on `go`; anything else removes the VM.
fn serve(
    state: &StateDir,
    cfg: &VmConfig,
    sinks: Vec<Box<dyn Write + Send>>,
    (ready, go): (Option<OwnedFd>, Option<OwnedFd>),
) -> Result<VmReport, KvmError> {
    let name = cfg.name.clone();
    let mut confirm = Confirmation::new(ready);
    let prepared = install_stop_handlers(&name)
        .and_then(|()| prepare(state, cfg, sinks))
        .and_then(|p| confirm.start_check(&name, cfg.restore.as_ref()).map(|()| p));
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            confirm.say(&e.to_string());
            return Err(e);
        }
    };
    let Prepared {
        vm,
        vcpus,
        rec,
        listener,
    } = p;
    if let Some(go) = go {
        confirm.say(&format!("held {}", rec.pid));
        let mut line = String::new();
        let _ = BufReader::new(std::fs::File::from(go)).read_line(&mut line);
        if line.trim() != "go" {
            drop(listener);
            remove_record(state, &rec, false)?;
            return Err(KvmError::Discarded { vm: name });
        }
    }
    let status = Arc::new(VmStatus::new(vcpus.len()));
    status
        .mem_host_addr
        .store(vm.mem.host_addr(), Ordering::Relaxed);
    // A restored VM carries on from its snapshot's last reports.
    for (_, d) in &vcpus {
        status.take_report(&d.report);
    }
    let Some(serial) = vcpus.first().map(|(_, d)| d.serial.clone()) else {
        return Err(KvmError::invalid(&name, "a VM needs a vCPU"));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let vm = Arc::new(vm);
    if vm.irqchip {
        let line = vm.clone();
        lock(&serial).set_irq(Box::new(move |level| {
            // KVM_IRQ_LINE on a VM with an irqchip fails only for a bad GSI.
            let _ = line.fd.set_irq_line(COM1_IRQ, level);
        }));
    }
    let ended = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut threads = VcpuThreads::new(&name, stop.clone());
    for (fd, devices) in vcpus {
        if let Err(e) = threads.spawn(&vm, fd, devices, &status) {
            // The vCPUs already started must not outlive the error.
            stop.store(true, Ordering::SeqCst);
            while !threads.all_finished() {
                threads.kick_all();
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = threads.join();
            confirm.say(&e.to_string());
            return Err(e);
        }
    }
    confirm.running();
    let reporter = Reporter {
        rec: &rec,
        status: &status,
        serial: &serial,
        started,
    };
    let mut waiting: Vec<UnixStream> = Vec::new();
    let mut dirty_logging = false;
    // The connection of the snapshot that turned the dirty log on: once it closes before
    // that snapshot paused the VM (the snapshot failed or its process died), the log is
    // turned off again, so a failed snapshot leaves the VM as fast as it was.
    let mut dirty_owner: Option<UnixStream> = None;
    // Paused and told to stay so (see [`AfterPause::Stay`]).
    let mut settle_paused = false;
    while !threads.all_finished() {
        if SIGNALLED.load(Ordering::SeqCst) || confirm.poll(false) {
            stop.store(true, Ordering::SeqCst);
        }
        if dirty_owner.as_ref().is_some_and(closed) {
            dirty_owner = None;
            if std::mem::take(&mut dirty_logging) {
                if let Err(e) = vm.set_dirty_logging(false) {
                    eprintln!("stasis: VM {name}: turning the dirty log off: {e}");
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            threads.kick_all();
        }
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = BufReader::new(&mut conn).read_line(&mut line);
                match line.trim() {
                    "stop" => {
                        if std::mem::take(&mut settle_paused) {
                            threads.stop_paused();
                        }
                        stop.store(true, Ordering::SeqCst);
                        waiting.push(conn);
                    }
                    "resume" if settle_paused => {
                        settle_paused = false;
                        threads.resume_all();
                        reply(&mut conn, &reporter.report("running"));
                    }
                    "pause" | "dirty-log start" if settle_paused => reply_error(
                        &mut conn,
                        &KvmError::invalid(
                            &name,
                            "it is paused after a migration that was never confirmed: settle it \
                             first (stasis vm resume, or stasis vm stop)",
                        ),
                    ),
                    "dirty-log start" => {
                        let r = if dirty_owner.is_some() {
                            Err(KvmError::invalid(
                                &name,
                                "another snapshot is already tracking its dirty pages",
                            ))
                        } else {
                            vm.set_dirty_logging(true).and_then(|()| vm.dirty_log())
                        };
                        match r {
                            Ok(_) => {
                                dirty_logging = true;
                                reply(&mut conn, &reporter.report("running"));
                                if conn.set_nonblocking(true).is_ok() {
                                    dirty_owner = Some(conn);
                                }
                            }
                            Err(e) => reply_error(&mut conn, &e),
                        }
                    }
                    "dirty-log fetch" => {
                        let r = if dirty_logging {
                            vm.dirty_log()
                        } else {
                            Err(KvmError::invalid(&name, "the dirty log is not on"))
                        };
                        match r {
                            Ok(bitmap) => send_json(
                                &mut conn,
                                &snapshot::Dirty {
                                    runs: snapshot::dirty_runs(&bitmap),
                                },
                            ),
                            Err(e) => reply_error(&mut conn, &e),
                        }
                    }
                    "pause" => {
                        let ctl = PauseControl {
                            vm: &vm,
                            rec: &rec,
                            serial: &serial,
                            threads: &threads,
                        };
                        dirty_owner = None;
                        match ctl.serve(&mut conn, std::mem::take(&mut dirty_logging)) {
                            AfterPause::Stop => {
                                stop.store(true, Ordering::SeqCst);
                                waiting.push(conn);
                            }
                            AfterPause::Stay => settle_paused = true,
                            AfterPause::Resumed => {}
                        }
                    }
                    console::INPUT_COMMAND => {
                        reply(&mut conn, &reporter.report("running"));
                        let (serial, ended) = (serial.clone(), ended.clone());
                        let spawned = std::thread::Builder::new()
                            .name("console-input".into())
                            .spawn(move || console::serve_input(conn, serial, ended));
                        if let Err(e) = spawned {
                            eprintln!("stasis: VM {name}: console input: {e}");
                        }
                    }
                    _ => reply(
                        &mut conn,
                        &reporter.report(if settle_paused { "paused" } else { "running" }),
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(&listener, 20);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                eprintln!("stasis: VM {name}: control socket: {e}");
            }
        }
    }
    ended.store(true, Ordering::SeqCst);
    let ended = threads.join();
    // A guest that ended before its image was checked has not been confirmed either.
    confirm.poll(true);
    let unverified = confirm.failed.take().map(|what| KvmError::Unverified {
        vm: name.clone(),
        what,
    });
    let (state_word, end) = match (&ended, &unverified) {
        (_, Some(e)) => ("failed", e.to_string()),
        (Ok(Ended::Shutdown(code)), _) => {
            ("shutdown", format!("the guest shut down (code {code})"))
        }
        (Ok(Ended::Halted), _) => ("halted", "the guest halted".to_string()),
        (Ok(Ended::Reset(how)), _) => ("shutdown", format!("the guest reset the machine: {how}")),
        (Ok(Ended::Stopped | Ended::Paused), _) => ("stopped", "stopped by the VMM".to_string()),
        (Err(e), _) => ("failed", e.to_string()),
    };
    let mut rep = reporter.report(state_word);
    rep.end = Some(end);
    // A restore that failed leaves nothing behind, not even the log of a VM that never was.
    let keep_log = cfg.restore.is_none() || (unverified.is_none() && ended.is_ok());
    let cleaned = remove_record(state, &rec, keep_log);
    for mut conn in waiting {
        reply(&mut conn, &rep);
    }
    if let Some(e) = unverified {
        if let KvmError::Unverified { what, .. } = &e {
            confirm.say(&format!("{UNVERIFIED}{what}"));
        }
        return Err(e);
    }
    ended?;
    cleaned?;
    Ok(rep)
}

/// Removes the VM's control socket and record (if still its own), and its log unless
/// `keep_log`.
fn remove_record(state: &StateDir, rec: &VmRecord, keep_log: bool) -> Result<(), KvmError> {
    let vms = state.vms();
    let _lock = vms.lock()?;
    let _ = std::fs::remove_file(&rec.socket);
    match vms.read_as::<VmRecord>(&rec.name)? {
        Some(r) if r.pid == rec.pid => Ok(vms.remove(&rec.name, keep_log)?),
        _ => Ok(()),
    }
}

/// Runs the VM in this process, its console on standard output (unless `quiet`), until
/// the guest shuts down or SIGINT/SIGTERM stops it.
pub fn run_foreground(state: &StateDir, cfg: &VmConfig, quiet: bool) -> Result<VmReport, KvmError> {
    check_config(cfg)?;
    let sinks: Vec<Box<dyn Write + Send>> = if quiet {
        Vec::new()
    } else {
        vec![Box::new(std::io::stdout())]
    };
    let ready = match (&cfg.restore, quiet) {
        (Some(_), false) => Some(announce_running(&cfg.name)?),
        _ => None,
    };
    serve(state, cfg, sinks, (ready, None))
}

/// A ready pipe for a VM restored in the foreground: once the VMM says the restored guest
/// runs (and its image checked), the user hears so on standard error, as a process restore
/// says it, instead of nothing until the VM stops.
fn announce_running(vm: &str) -> Result<OwnedFd, KvmError> {
    let (r, w) = pipe(vm)?;
    let name = vm.to_string();
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let lines = BufReader::new(std::fs::File::from(r)).lines();
            for line in lines.map_while(Result::ok) {
                if line == "ok" {
                    eprintln!(
                        "stasis: restored VM {name}; it runs (its console follows; Ctrl-C stops it)"
                    );
                    break;
                }
            }
        })
        .map_err(|e| KvmError::sys(vm, "spawn the announcing thread", e))?;
    Ok(w)
}

fn pipe(vm: &str) -> Result<(OwnedFd, OwnedFd), KvmError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(KvmError::sys(vm, "pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn fork(vm: &str) -> Result<i32, KvmError> {
    // SAFETY: the caller (the stasis CLI) is single-threaded here; the child only runs Rust
    // code of this process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(KvmError::sys(vm, "fork", std::io::Error::last_os_error()));
    }
    Ok(pid)
}

/// Closes the sockets the detached VMM inherited from its starter (a migration's connection,
/// say): they are never its own, and one held open here would keep its peer waiting for as
/// long as the VM runs. (Its own control socket is made later.)
fn close_inherited_sockets() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: stat is plain old data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills `st`, owned by this frame; an fd that is not open (the
        // directory's own) just fails.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        if rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
            // SAFETY: closing an inherited socket this process never uses.
            unsafe { libc::close(fd) };
        }
    }
}

/// The detached VMM's standard input/output/error: /dev/null.
fn null_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of an fd we own onto the standard fds; no pointers.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Starts the VM in a detached VMM process (double fork, new session) and returns its
/// record once it runs (and a restored VM's image passed its check), or the error that
/// stopped it. With `hold`, the VM is built and held before any vCPU runs, and `hold` is
/// called with its VMM's PID: the guest runs if it says true, else the VM is removed and
/// this returns [`KvmError::Discarded`].
pub fn run_detached(
    state: &StateDir,
    cfg: &VmConfig,
    hold: Option<&dyn Fn(i32) -> bool>,
) -> Result<Detached, KvmError> {
    check_config(cfg)?;
    let name = cfg.name.as_str();
    let (r, w) = pipe(name)?;
    let go = hold.map(|_| pipe(name)).transpose()?;
    let child = fork(name)?;
    if child == 0 {
        drop(r);
        // Only the VMM reads `go`; the starter's end must close with the starter.
        let go = go.map(|(r, w)| {
            drop(w);
            r
        });
        // SAFETY: setsid in the child, which leads no group; no pointers.
        unsafe { libc::setsid() };
        let code = match fork(name) {
            Ok(0) => {
                null_stdio();
                close_inherited_sockets();
                let log = state.vms().log_path(name);
                match serve(state, cfg, Vec::new(), (Some(w), go)) {
                    Ok(_) => 0,
                    // A VM of that name runs: the log is its, not ours to write in (the
                    // starter hears why on the ready pipe).
                    Err(KvmError::Exists(_)) => 1,
                    Err(e) => {
                        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log) {
                            let _ = writeln!(f, "\nstasis: VMM error: {e}");
                        }
                        1
                    }
                }
            }
            Ok(_) => 0,
            Err(_) => 1,
        };
        // SAFETY: ends this forked process without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(w);
    let go = go.map(|(r, w)| {
        drop(r);
        w
    });
    let mut st = 0;
    // SAFETY: waiting for the intermediate child we just forked; `st` is a valid pointer.
    unsafe { libc::waitpid(child, &mut st, 0) };
    let mut lines = BufReader::new(std::fs::File::from(r)).lines();
    let mut line = || -> Result<String, KvmError> {
        lines
            .next()
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(|e| KvmError::sys(name, "read the VMM's start message", e))
    };
    let mut first = line()?;
    if let (Some(held), Some(hold), Some(go)) = (first.strip_prefix("held "), hold, go) {
        let pid = held.parse().unwrap_or(0);
        if !hold(pid) {
            // Closed without "go": the VMM removes the VM; its end closes the ready pipe.
            drop(go);
            while !line()?.is_empty() {}
            return Err(KvmError::Discarded {
                vm: name.to_string(),
            });
        }
        let mut go = std::fs::File::from(go);
        writeln!(go, "go").map_err(|e| KvmError::sys(name, "tell the held VMM to go", e))?;
        first = line()?;
    }
    let running_at = Instant::now();
    if first != "running" {
        return Err(start_error(name, &first, "started"));
    }
    let second = line()?;
    if second != "ok" {
        return Err(start_error(name, &second, "was confirmed"));
    }
    Ok(Detached {
        record: running(state, name)?,
        running_at,
    })
}

/// How the VMM says on its ready pipe that the deferred image check failed.
const UNVERIFIED: &str = "unverified: ";

/// A detached VM that runs.
#[derive(Debug)]
pub struct Detached {
    pub record: VmRecord,
    /// When its VMM said the vCPU runs (a restored VM's image may have been checked later).
    pub running_at: Instant,
}

/// What the VMM said instead of `running` or `ok` on its ready pipe.
fn start_error(name: &str, said: &str, before: &str) -> KvmError {
    if said.is_empty() {
        return KvmError::Guest {
            vm: name.to_string(),
            what: format!("the VMM process ended before the VM {before}"),
        };
    }
    if let Some(what) = said.strip_prefix(UNVERIFIED) {
        return KvmError::Unverified {
            vm: name.to_string(),
            what: what.to_string(),
        };
    }
    KvmError::invalid(name, format!("starting the VMM: {said}"))
}

/// The record of a running VM, or why there is none (a stale record is removed).
pub fn running(state: &StateDir, name: &str) -> Result<VmRecord, KvmError> {
    let vms = state.vms();
    let rec = vms
        .read_as::<VmRecord>(name)?
        .ok_or_else(|| KvmError::NoSuch(name.to_string()))?;
    if rec.alive() {
        return Ok(rec);
    }
    let _lock = vms.lock()?;
    vms.remove(name, true)?;
    let _ = std::fs::remove_file(&rec.socket);
    Err(KvmError::NoSuch(name.to_string()))
}

/// Every running VM; the names of stale records (removed) second.
pub fn list(state: &StateDir) -> Result<(Vec<VmRecord>, Vec<String>), KvmError> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for name in state.vms().names()? {
        match running(state, &name) {
            Ok(r) => live.push(r),
            Err(KvmError::NoSuch(_)) => stale.push(name),
            Err(e) => return Err(e),
        }
    }
    Ok((live, stale))
}

fn ask<T: serde::de::DeserializeOwned>(
    rec: &VmRecord,
    what: &str,
    timeout: Duration,
) -> Result<T, KvmError> {
    command(rec, what, timeout)?.1
}

/// Sends the control command `what` to the VM's VMM on a new connection and reads its
/// answer (waiting up to `timeout`); returns the connection (for commands whose session
/// lives on it) and the answer.
pub(crate) fn command<T: serde::de::DeserializeOwned>(
    rec: &VmRecord,
    what: &str,
    timeout: Duration,
) -> Result<(BufReader<UnixStream>, Result<T, KvmError>), KvmError> {
    let err = |what: String| KvmError::Control {
        vm: rec.name.clone(),
        path: rec.socket.clone(),
        what,
    };
    let mut conn = UnixStream::connect(&rec.socket).map_err(|e| err(format!("connect: {e}")))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| err(format!("set timeout: {e}")))?;
    conn.write_all(format!("{what}\n").as_bytes())
        .map_err(|e| err(format!("send {what}: {e}")))?;
    let mut conn = BufReader::new(conn);
    let answered = answer(rec, &mut conn, what);
    Ok((conn, answered))
}

/// Reads one answer line: a `T`, or the VMM's `{"error": ...}`.
pub(crate) fn answer<T: serde::de::DeserializeOwned>(
    rec: &VmRecord,
    conn: &mut BufReader<UnixStream>,
    what: &str,
) -> Result<T, KvmError> {
    let err = |what: String| KvmError::Control {
        vm: rec.name.clone(),
        path: rec.socket.clone(),
        what,
    };
    let mut line = String::new();
    conn.read_line(&mut line)
        .map_err(|e| err(format!("no answer to {what}: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| err(format!("bad answer to {what}: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err(format!("{what}: {e}")));
    }
    serde_json::from_value(v).map_err(|e| err(format!("bad answer to {what}: {e}")))
}

/// Whether the peer of a non-blocking connection has closed it (or it failed).
fn closed(conn: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let mut conn = conn;
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Waits up to `ms` for a connection (or a signal), so a command is served at once rather
/// than after a fixed sleep.
fn wait_readable(listener: &UnixListener, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; the result only says whether
    // to accept again.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// The guest pages written since the dirty log was turned on or last fetched (KVM's
/// dirty log is fetched and cleared in one step), while the guest runs.
pub fn dirty_log_fetch(state: &StateDir, name: &str) -> Result<Vec<(u64, u64)>, KvmError> {
    let rec = running(state, name)?;
    let d: snapshot::Dirty = ask(&rec, "dirty-log fetch", Duration::from_secs(5))?;
    Ok(d.runs)
}

/// Dirty logging turned on by [`dirty_log_start`]: dropped before the VM is paused, it
/// turns the log off again (the VMM sees its connection close).
pub struct DirtyLogSession {
    _conn: UnixStream,
}

/// Turns on KVM's dirty log of the VM's memory (pre-copy starts now). One snapshot at a
/// time: refused while another holds its session.
pub fn dirty_log_start(
    state: &StateDir,
    name: &str,
) -> Result<(DirtyLogSession, VmReport), KvmError> {
    let (conn, rep) = command(
        &running(state, name)?,
        "dirty-log start",
        Duration::from_secs(5),
    )?;
    Ok((
        DirtyLogSession {
            _conn: conn.into_inner(),
        },
        rep?,
    ))
}

/// A paused VM, waiting for [`PauseSession::resume`] or [`PauseSession::stop`]; dropped,
/// it resumes (the VMM sees the connection close).
pub struct PauseSession {
    rec: VmRecord,
    conn: BufReader<UnixStream>,
}

/// Pauses a VM's vCPU and returns its state (see [`super::snapshot`]).
pub fn pause(state: &StateDir, name: &str) -> Result<(PauseSession, Paused), KvmError> {
    let rec = running(state, name)?;
    let (conn, paused) = command(&rec, "pause", Duration::from_secs(15))?;
    let paused: Paused = paused?;
    Ok((PauseSession { rec, conn }, paused))
}

impl PauseSession {
    fn send(&mut self, what: &str) -> Result<(), KvmError> {
        self.conn
            .get_mut()
            .write_all(format!("{what}\n").as_bytes())
            .map_err(|e| KvmError::Control {
                vm: self.rec.name.clone(),
                path: self.rec.socket.clone(),
                what: format!("send {what}: {e}"),
            })
    }

    /// Lets the vCPU run on; returns how long it was paused.
    pub fn resume(mut self) -> Result<Resumed, KvmError> {
        self.send("resume")?;
        answer(&self.rec, &mut self.conn, "resume")
    }

    /// Stops the paused VM (its VMM tears it down and removes its record); returns its
    /// final report once the VMM has exited.
    pub fn stop(mut self, timeout: Duration) -> Result<VmReport, KvmError> {
        self.send("stop")?;
        let rep = answer(&self.rec, &mut self.conn, "stop")?;
        let deadline = Instant::now() + timeout;
        while self.rec.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(rep)
    }

    /// Leaves the VM paused after this process lets go of it, until `resume` or `stop`
    /// comes (see [`resume`] and [`stop`]): for a migration whose outcome is unknown.
    pub fn stay(mut self) -> Result<(), KvmError> {
        self.send("stay")?;
        answer::<Resumed>(&self.rec, &mut self.conn, "stay").map(drop)
    }

    /// The record of the paused VM.
    pub fn record(&self) -> &VmRecord {
        &self.rec
    }
}

/// The VMM's report on a running VM.
pub fn query(state: &StateDir, name: &str) -> Result<VmReport, KvmError> {
    ask(&running(state, name)?, "status", Duration::from_secs(5))
}

/// Lets a VM run that was left paused ([`PauseSession::stay`]); returns its report.
pub fn resume(state: &StateDir, name: &str) -> Result<VmReport, KvmError> {
    ask(&running(state, name)?, "resume", Duration::from_secs(5))
}

/// Stops a VM cleanly; returns its final report once its VMM has torn it down.
pub fn stop(state: &StateDir, name: &str, timeout: Duration) -> Result<VmReport, KvmError> {
    let rec = running(state, name)?;
    let rep = ask(&rec, "stop", timeout)?;
    let deadline = Instant::now() + timeout;
    while rec.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(rep)
}
