//! The line protocol shared by every workload (see the crate documentation).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::report::{one_line, Report};
use crate::sys;

/// The umask every workload sets at start (and checks).
pub const UMASK: libc::mode_t = 0o027;
/// The soft `RLIMIT_NOFILE` every workload sets at start (capped by the hard limit).
pub const NOFILE_SOFT: u64 = 3999;
/// The byte a stdin read buffer is pre-filled with.
const SENTINEL: u8 = 0xa5;

/// Which arguments a workload accepts besides `--tag`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spec {
    /// Flags without a value, e.g. `--quiet`.
    pub flags: &'static [&'static str],
    /// Options with a value, e.g. `--mib`.
    pub values: &'static [&'static str],
}

/// Parsed command-line arguments.
#[derive(Debug, Clone, Default)]
pub struct Args {
    flags: Vec<String>,
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parses `args` (without argv\[0\]) against `spec`.
    pub fn parse(args: &[String], spec: &Spec) -> Result<Args, String> {
        let mut out = Args::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--tag" || spec.values.contains(&a.as_str()) {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                out.values.insert(a.clone(), v.clone());
            } else if spec.flags.contains(&a.as_str()) {
                out.flags.push(a.clone());
            } else {
                return Err(format!(
                    "unknown argument {a:?} (accepted: --tag <s>{}{})",
                    spec.values
                        .iter()
                        .map(|v| format!(", {v} <value>"))
                        .collect::<String>(),
                    spec.flags
                        .iter()
                        .map(|f| format!(", {f}"))
                        .collect::<String>()
                ));
            }
        }
        Ok(out)
    }

    /// True if `flag` was given.
    pub fn flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The value of option `name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of option `name` as a number, or `default`.
    pub fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name} needs a non-negative integer, got {v:?}")),
        }
    }
}

/// A command read from stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// `check`: report and exit.
    Check,
    /// `verify`: report and keep running.
    Verify,
}

/// What the process looked like at `READY`, compared on every check.
#[derive(Debug, Clone)]
struct Identity {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cmdline: Vec<u8>,
    environ: Vec<u8>,
    cwd: PathBuf,
    /// /proc/self/exe (the mm's exe link, which a restorer must set).
    exe: PathBuf,
    comm: Vec<u8>,
    nofile: (u64, u64),
    tag_env: Option<OsString>,
}

/// One workload process: its name, arguments, identity at `READY` and stdin state.
#[derive(Debug)]
pub struct Ctx {
    /// The workload's name (`wl-...`), used in every output line.
    pub name: &'static str,
    /// Parsed arguments.
    pub args: Args,
    /// The tag (from `--tag`, else `STASIS_WL_TAG`, else `"untagged"`).
    pub tag: String,
    /// A pid-independent seed derived from the tag.
    pub seed: u64,
    pid: i32,
    ident: Option<Identity>,
    pending: Vec<u8>,
    sticky: Vec<String>,
    cleanup: Vec<PathBuf>,
    /// Successful `read`s on stdin so far.
    pub reads: u64,
    /// Bytes read from stdin so far.
    pub bytes_read: u64,
    /// Bytes of stdin consumed as complete command lines so far.
    pub bytes_consumed: u64,
    /// How many threads the process must have at every check (1 unless a workload runs
    /// threads of its own).
    pub threads: u64,
}

impl Ctx {
    /// Closes inherited fds above 2, parses arguments (exit 2 on error), sets the umask and the `RLIMIT_NOFILE` soft limit.
    pub fn start(name: &'static str, spec: &Spec) -> Ctx {
        let raw: Vec<String> = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args = match Args::parse(&raw, spec) {
            Ok(a) => a,
            Err(e) => {
                sys::out_line(&format!("FAIL {name}: bad arguments: {}", one_line(&e)));
                std::process::exit(2);
            }
        };
        let env_tag = std::env::var("STASIS_WL_TAG").ok();
        let tag = match (args.value("--tag"), env_tag.as_deref()) {
            (Some(a), Some(e)) if a != e => {
                sys::out_line(&format!(
                    "FAIL {name}: bad arguments: --tag {a:?} differs from STASIS_WL_TAG={e:?}"
                ));
                std::process::exit(2);
            }
            (Some(a), _) => a.to_string(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "untagged".to_string(),
        };
        let seed = crate::pattern::fnv1a64(tag.as_bytes());
        let mut ctx = Ctx {
            name,
            args,
            tag,
            seed,
            pid: 0,
            ident: None,
            pending: Vec::new(),
            sticky: Vec::new(),
            cleanup: Vec::new(),
            reads: 0,
            bytes_read: 0,
            bytes_consumed: 0,
            threads: 1,
        };
        close_inherited_fds();
        // SAFETY: umask only changes this process's file-creation mask.
        unsafe { libc::umask(UMASK) };
        let r = lower_nofile();
        ctx.setup(r);
        ctx
    }

    /// Unwraps a set-up result; on error prints `FAIL <name>: setup: ..` and exits 1.
    pub fn setup<T>(&mut self, r: Result<T, String>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail_exit(&format!("setup: {e}")),
        }
    }

    /// Registers a file to delete when the process exits through the protocol.
    pub fn remove_at_exit(&mut self, path: PathBuf) {
        self.cleanup.push(path);
    }

    /// Records a failure seen outside a check; every later check reports it.
    pub fn note(&mut self, msg: impl Into<String>) {
        if self.sticky.len() < 64 {
            self.sticky.push(msg.into());
        }
    }

    /// The pid printed at `READY` (0 before).
    pub fn ready_pid(&self) -> i32 {
        self.pid
    }

    /// Sets O_NONBLOCK on stdin (for workloads that poll it between sleeps); a failure is a
    /// setup failure.
    pub fn set_stdin_nonblocking(&mut self) {
        let fl = sys::fcntl_get(0, libc::F_GETFL, "F_GETFL");
        let fl = self.setup(fl);
        // SAFETY: F_SETFL only changes the file status flags of fd 0.
        let r = unsafe { libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK) };
        let r = sys::cvt(r, "fcntl(0, F_SETFL, O_NONBLOCK)");
        self.setup(r);
    }

    /// Records the identity and prints `READY <pid>`.
    pub fn ready(&mut self) {
        let r = snapshot_identity();
        let ident = self.setup(r);
        self.ident = Some(ident);
        self.pid = sys::getpid_raw();
        sys::out_line(&format!("READY {}", self.pid));
    }

    /// Prints `FAIL <name>: msg`, removes temp files and exits 1.
    pub fn fail_exit(&mut self, msg: &str) -> ! {
        sys::out_line(&format!("FAIL {}: {}", self.name, one_line(msg)));
        self.exit(1)
    }

    fn exit(&mut self, code: i32) -> ! {
        // Files, or (empty) directories, in the order they were registered.
        for p in self.cleanup.drain(..) {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
        }
        std::process::exit(code)
    }

    /// Adds raw stdin bytes (for workloads that do their own `read`).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.reads += 1;
        self.bytes_read += bytes.len() as u64;
        self.pending.extend_from_slice(bytes);
    }

    /// Handles end of file on stdin: `FAIL` and exit 1.
    pub fn eof(&mut self) -> ! {
        self.fail_exit("stdin closed (EOF) before a check command")
    }

    /// The next complete command line already received, if any. Unknown commands exit 1.
    pub fn take_cmd(&mut self) -> Option<Cmd> {
        let nl = self.pending.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=nl).collect();
        self.bytes_consumed += line.len() as u64;
        match &line[..line.len() - 1] {
            b"check" => Some(Cmd::Check),
            b"verify" => Some(Cmd::Verify),
            other => {
                let s = String::from_utf8_lossy(other).into_owned();
                self.fail_exit(&format!("unknown command {s:?} (expected check or verify)"))
            }
        }
    }

    /// One `read(0, ..)`. Returns false if it would block (non-blocking stdin only).
    fn read_stdin(&mut self) -> bool {
        let mut buf = [SENTINEL; 4096];
        let want = 4000usize;
        // SAFETY: `buf` is a live, writable buffer of at least `want` bytes.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = sys::errno();
            if e == libc::EINTR {
                self.fail_exit("read on stdin returned EINTR");
            }
            if e == libc::EAGAIN {
                return false;
            }
            self.fail_exit(&sys::os_err("read(0) on stdin"));
        }
        let n = n as usize;
        if n == 0 {
            self.eof();
        }
        if n > want {
            self.fail_exit(&format!(
                "read(0, buf, {want}) returned {n}, more than asked"
            ));
        }
        if let Some(i) = buf[n..].iter().position(|&b| b != SENTINEL) {
            self.note(format!(
                "read(0) returned {n} bytes but changed buffer byte {} beyond them",
                n + i
            ));
        }
        self.feed(&buf[..n]);
        true
    }

    /// Blocks in `read(0, ..)` until a complete command arrives.
    pub fn read_blocking(&mut self) -> Cmd {
        loop {
            if let Some(c) = self.take_cmd() {
                return c;
            }
            self.read_stdin();
        }
    }

    /// One non-blocking attempt: a command if one is complete, else `None`.
    pub fn poll_nonblocking(&mut self) -> Option<Cmd> {
        if let Some(c) = self.take_cmd() {
            return Some(c);
        }
        if self.read_stdin() {
            self.take_cmd()
        } else {
            None
        }
    }

    /// Runs the common checks, the sticky failures and `check`, prints `INFO`s and
    /// `PASS`/`FAIL`, and exits (0 or 1) if `cmd` is [`Cmd::Check`].
    pub fn respond(&mut self, cmd: Cmd, check: impl FnOnce(&mut Report)) {
        let mut r = Report::new();
        self.check_identity(&mut r);
        for s in &self.sticky {
            r.fail(s.clone());
        }
        check(&mut r);
        for i in r.infos() {
            sys::out_line(&format!("INFO {}: {}", self.name, one_line(i)));
        }
        let passed = r.passed();
        if passed {
            sys::out_line(&format!("PASS {}", self.name));
        } else {
            sys::out_line(&format!("FAIL {}: {}", self.name, r.fail_text()));
        }
        if cmd == Cmd::Check {
            self.exit(if passed { 0 } else { 1 });
        }
    }

    /// The plain protocol: block in `read`, answer commands, until `check` exits.
    pub fn serve_blocking(&mut self, mut check: impl FnMut(&mut Report)) -> ! {
        loop {
            let cmd = self.read_blocking();
            self.respond(cmd, &mut check);
        }
    }

    /// The checks every workload makes (see the crate documentation).
    pub fn check_identity(&self, r: &mut Report) {
        r.eq("getpid() vs pid at READY", self.pid, sys::getpid_raw());
        r.eq("gettid() vs pid at READY", self.pid, sys::gettid_raw());
        let Some(id) = &self.ident else {
            r.fail("identity was never recorded (no READY)");
            return;
        };
        let args: Vec<OsString> = std::env::args_os().collect();
        r.eq("argv (std::env::args_os)", &id.args, &args);
        if let Some(cmdline) = r.ok(read_proc("/proc/self/cmdline")) {
            r.eq(
                "/proc/self/cmdline",
                String::from_utf8_lossy(&id.cmdline),
                String::from_utf8_lossy(&cmdline),
            );
            r.eq(
                "/proc/self/cmdline vs argv",
                String::from_utf8_lossy(&nul_join(&args)),
                String::from_utf8_lossy(&cmdline),
            );
        }
        let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        if env != id.env {
            r.fail(format!(
                "environment (std::env::vars_os) differs: {} vars at READY, {} now, first difference {}",
                id.env.len(),
                env.len(),
                first_env_diff(&id.env, &env)
            ));
        }
        r.eq(
            "STASIS_WL_TAG",
            id.tag_env.as_ref(),
            std::env::var_os("STASIS_WL_TAG").as_ref(),
        );
        if let Some(environ) = r.ok(read_proc("/proc/self/environ")) {
            if environ != id.environ {
                r.fail(format!(
                    "/proc/self/environ differs: {} bytes at READY, {} now: {:?}",
                    id.environ.len(),
                    environ.len(),
                    String::from_utf8_lossy(&environ[..environ.len().min(200)])
                ));
            }
        }
        match std::fs::read_to_string("/proc/self/status") {
            Ok(s) => {
                let threads = s
                    .lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .map(|v| v.trim().to_string());
                r.eq(
                    "threads (/proc/self/status)",
                    Some(self.threads.to_string()),
                    threads,
                );
            }
            Err(e) => r.fail(format!("read /proc/self/status: {e}")),
        }
        match std::env::current_dir() {
            Ok(cwd) => r.eq("current directory", &id.cwd, &cwd),
            Err(e) => r.fail(format!("getcwd: {e}")),
        }
        match std::fs::read_link("/proc/self/exe") {
            Ok(exe) => r.eq("/proc/self/exe", &id.exe, &exe),
            Err(e) => r.fail(format!("readlink /proc/self/exe: {e}")),
        }
        // SAFETY: umask only changes this process's mask; the old value is put back at once.
        let old = unsafe { libc::umask(0o077) };
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        r.eq("umask", format!("{UMASK:03o}"), format!("{old:03o}"));
        if let Some(comm) = r.ok(read_proc("/proc/self/comm")) {
            r.eq(
                "/proc/self/comm",
                String::from_utf8_lossy(&id.comm),
                String::from_utf8_lossy(&comm),
            );
        }
        if let Some(n) = r.ok(get_nofile()) {
            r.eq("RLIMIT_NOFILE (soft, hard)", id.nofile, n);
        }
    }
}

/// Closes every fd above 2 the process inherited, so a workload holds only the fds it
/// opens itself (whatever the harness leaked).
fn close_inherited_fds() {
    // SAFETY: close_range(3, ~0, 0) closes fds this process does not use (nothing has been
    // opened yet by this program).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        for fd in 3..4096 {
            // SAFETY: as above, one fd at a time (kernels without close_range).
            unsafe { libc::close(fd) };
        }
    }
}

fn read_proc(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {path}: {e}"))
}

fn nul_join(args: &[OsString]) -> Vec<u8> {
    let mut v = Vec::new();
    for a in args {
        v.extend_from_slice(a.as_bytes());
        v.push(0);
    }
    v
}

fn first_env_diff(a: &[(OsString, OsString)], b: &[(OsString, OsString)]) -> String {
    for i in 0..a.len().max(b.len()) {
        if a.get(i) != b.get(i) {
            return format!("at #{i}: expected {:?}, got {:?}", a.get(i), b.get(i));
        }
    }
    "none".to_string()
}

fn get_nofile() -> Result<(u64, u64), String> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    sys::cvt(r, "getrlimit(RLIMIT_NOFILE)")?;
    Ok((rl.rlim_cur, rl.rlim_max))
}

fn lower_nofile() -> Result<(), String> {
    let (_, hard) = get_nofile()?;
    let rl = libc::rlimit {
        rlim_cur: NOFILE_SOFT.min(hard),
        rlim_max: hard,
    };
    // SAFETY: `rl` is a valid rlimit; lowering the soft limit needs no privilege.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    sys::cvt(r, "setrlimit(RLIMIT_NOFILE)")?;
    Ok(())
}

fn snapshot_identity() -> Result<Identity, String> {
    Ok(Identity {
        args: std::env::args_os().collect(),
        env: std::env::vars_os().collect(),
        cmdline: read_proc("/proc/self/cmdline")?,
        environ: read_proc("/proc/self/environ")?,
        cwd: std::env::current_dir().map_err(|e| format!("getcwd: {e}"))?,
        exe: std::fs::read_link("/proc/self/exe")
            .map_err(|e| format!("readlink /proc/self/exe: {e}"))?,
        comm: read_proc("/proc/self/comm")?,
        nofile: get_nofile()?,
        tag_env: std::env::var_os("STASIS_WL_TAG"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_args() {
        let spec = Spec {
            flags: &["--quiet"],
            values: &["--mib"],
        };
        let a: Vec<String> = ["--tag", "x", "--mib", "5", "--quiet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = Args::parse(&a, &spec).unwrap();
        assert!(p.flag("--quiet"));
        assert_eq!(p.num("--mib", 1).unwrap(), 5);
        assert_eq!(p.value("--tag"), Some("x"));
        assert!(Args::parse(&["--bogus".to_string()], &spec).is_err());
        assert!(Args::parse(&["--mib".to_string()], &spec).is_err());
    }
}
