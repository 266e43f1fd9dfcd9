//! `stasis migrate`, `stasis receive` and the receiver's worker.

use crate::{exit, report};
use anyhow::{Context, Result};
use clap::Args;
use stasis_image::Compression;
use stasis_runtime::container::StateDir;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// `stasis migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// PID of the process tree's root, or the name of a container or a VM.
    #[arg(value_name = "PID|NAME")]
    target: String,
    /// The receiver: tcp://HOST:PORT (`stasis receive --listen` there).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    to: String,
    /// Run it under this name on the destination (containers and VMs; default: its own).
    #[arg(long)]
    name: Option<String>,
    /// Keep established TCP connections (locked off the network while they move).
    #[arg(long)]
    tcp_established: bool,
    /// Page data encoding in the image on the wire: none or zstd[:LEVEL] (pre-copy rounds
    /// send pages as they are).
    #[arg(long, default_value = "none")]
    compress: Compression,
    /// Copy memory while the workload runs, round after round (a VM's, tracked with KVM's
    /// dirty log), until the copy of what it writes during one more round is expected to
    /// take at most this many milliseconds; then freeze it and copy the rest.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    max_downtime: u64,
    /// Freeze after at most this many rounds, even if the expected downtime is longer (0:
    /// no pre-copy, freeze at once and copy everything). Rounds also end when the pages
    /// written stop shrinking.
    #[arg(long, value_name = "N", default_value_t = 30)]
    max_rounds: u32,
    /// The most bytes per second the rounds send while the workload runs (e.g. 100M); the
    /// last round, frozen, is never held back. Default: as fast as the network goes.
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<String>,
    /// Seconds to wait for each answer of the receiver.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// The destination sees this host's files at the same paths (shared storage): a
    /// container's own root file system is used there as it is, not copied. Without it the
    /// root file system goes along: whole while the container runs, then, frozen, what
    /// changed since, into the destination's STATE/rootfs/NAME. Process trees always expect
    /// the files they use at the same paths.
    #[arg(long)]
    shared_storage: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print the migration's figures as JSON.
    #[arg(long)]
    json: bool,
}

/// How a side authenticates: mutual TLS, or --insecure.
#[derive(Args)]
pub struct TlsArgs {
    /// This side's certificate chain (PEM); the receiver's must name the host it is
    /// reached by (a DNS name or IP address in its subjectAltName).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates the other side's certificate must chain to (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Plain TCP, neither authenticated nor encrypted (instead of the --tls-* files): only
    /// on a network where every peer is trusted.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    insecure: bool,
}

impl TlsArgs {
    /// The TLS files, or None with --insecure (which warns).
    fn files(&self) -> Result<Option<stasis_migrate::tls::TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca, self.insecure) {
            (Some(cert), Some(key), Some(ca), false) => Ok(Some(stasis_migrate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            (None, None, None, true) => {
                eprintln!(
                    "stasis: warning: --insecure: migrations are neither authenticated nor encrypted"
                );
                Ok(None)
            }
            _ => Err(exit::usage(NO_TLS.into())),
        }
    }
}

/// `stasis receive`.
#[derive(Args)]
pub struct ReceiveArgs {
    /// Address and port to accept migrations on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Restored process trees get this receiver's standard input, output and error where
    /// their image marks them inherited (default: /dev/null).
    #[arg(long)]
    inherit_stdio: bool,
    /// Migrations received at the same time; more wait.
    #[arg(long, default_value_t = 4)]
    max_parallel: usize,
    /// The largest image accepted (e.g. 64G).
    #[arg(long, value_name = "SIZE", default_value = "64G")]
    max_image_size: String,
    /// Seconds to wait for the source at each step.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Received containers' cgroups go below this cgroup in every hierarchy (default:
    /// stasis), e.g. to keep two stasis instances on one host apart.
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// Where this host's CPU flags are read (tests describe another CPU this way).
    #[arg(long, default_value = "/proc/cpuinfo", hide = true)]
    cpuinfo: String,
}

/// The receiver's worker (internal): one migration, its connection on fd 3.
#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    #[arg(long)]
    inherit_stdio: bool,
    #[arg(long)]
    max_image_size: u64,
    #[arg(long)]
    timeout: u64,
    #[arg(long)]
    cpuinfo: String,
    #[arg(long)]
    cgroup_parent: Option<String>,
}

const NO_TLS: &str = "a migration needs mutual TLS (--tls-cert, --tls-key and --tls-ca, all \
                      three) or plain TCP asked for with --insecure";

/// `stasis migrate`.
pub fn migrate(state: &StateDir, a: MigrateArgs) -> Result<i32> {
    let tls = a.tls.files()?;
    let addr =
        a.to.strip_prefix("tcp://")
            .ok_or_else(|| exit::usage(format!("--to {}: expected tcp://HOST:PORT", a.to)))?;
    let opts = stasis_workload::SourceOptions {
        tree: stasis_checkpoint::Options {
            compression: a.compress,
            tcp_established: a.tcp_established,
            ..Default::default()
        },
        vm: stasis_checkpoint::vm::VmCheckpointOptions {
            compression: a.compress,
            ..Default::default()
        },
    };
    let mut w = stasis_workload::open(state, &a.target, &opts)?;
    if a.tcp_established && w.kind() == stasis_workload::Kind::Vm {
        // A guest's connections live in its own kernel: they move with its memory.
        return Err(exit::usage(format!(
            "--tcp-established is for process trees and containers; VM {} keeps its guest's \
             connections in its memory",
            a.target
        )));
    }
    let name = match w.kind() {
        stasis_workload::Kind::ProcessTree => {
            if let Some(n) = &a.name {
                return Err(exit::usage(format!("--name {n} is for containers and VMs")));
            }
            None
        }
        stasis_workload::Kind::Container | stasis_workload::Kind::Vm => {
            Some(a.name.clone().unwrap_or(a.target.clone()))
        }
    };
    let rootfs = match w.kind() {
        stasis_workload::Kind::Container if !a.shared_storage => {
            stasis_runtime::container::running(state, &a.target)
                .with_context(|| format!("container {}", a.target))?
                .rootfs
        }
        _ => None,
    };
    let conn = connect(addr, Duration::from_secs(a.timeout), tls.as_ref())?;
    let cpu_flags = stasis_runtime::procfs::cpu_flags("/proc/cpuinfo")?;
    let bandwidth = a
        .bandwidth
        .as_deref()
        .map(|b| {
            stasis_runtime::cgroups::parse_size(b)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    exit::usage(format!(
                        "--bandwidth {b}: expected bytes per second, e.g. 100M"
                    ))
                })
        })
        .transpose()?;
    let mopts = stasis_migrate::MigrateOptions {
        name,
        cpu_flags,
        max_downtime: Duration::from_millis(a.max_downtime),
        max_rounds: a.max_rounds,
        bandwidth,
        rootfs,
    };
    let bar = report::progress_bar(a.json, "migrate");
    let progress = report::follow(&bar);
    let on_round = |r: &stasis_migrate::source::RoundReport| {
        bar.println(round_line(r));
    };
    let migrated = stasis_migrate::migrate(w.as_mut(), conn, &mopts, &progress, &on_round);
    bar.finish_and_clear();
    let r = migrated?;
    if a.json {
        report::json(&r)?;
    } else {
        crate::outln!(
            "migrated {} to {} (PID {} there): {} in {} rounds and {} of state sent, down {} (transfer {}, build {}, resume {}), total {}",
            r.workload,
            a.to,
            r.destination_pid,
            report::bytes(r.page_bytes),
            r.rounds.len(),
            report::bytes(r.image_bytes),
            report::ms(r.downtime_us),
            report::ms(r.transfer_us),
            report::ms(r.build_us),
            report::ms(r.resume_us),
            report::ms(r.total_us)
        );
    }
    Ok(exit::OK)
}

/// This process's peak resident memory, bytes (what receiving took; a VM's received memory
/// is a memfd it never maps, so it is not in it).
fn peak_rss() -> u64 {
    // SAFETY: rusage is plain old data; getrusage fills the one this frame owns.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to that rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024
}

/// One round, as the progress bar shows it.
fn round_line(r: &stasis_migrate::source::RoundReport) -> String {
    let rate = |b: u64| format!("{}/s", report::bytes(b));
    let mut line = format!(
        "round {}{}: {} sent in {} ({})",
        r.round,
        if r.frozen { " (frozen)" } else { "" },
        report::bytes(r.bytes),
        report::ms(r.us),
        rate(r.rate)
    );
    if let (Some(d), Some(e)) = (r.dirty_rate, r.expected_downtime_us) {
        line += &format!(
            ", written meanwhile {}, downtime now {}",
            rate(d),
            report::ms(e)
        );
    }
    line
}

/// Connects to the receiver (each address it resolves to in turn), with TLS if given;
/// `timeout` bounds the connect and every wait for an answer.
fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<&stasis_migrate::tls::TlsFiles>,
) -> Result<Box<dyn stasis_migrate::tls::Conn>> {
    let tcp = connect_tcp(addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))
        .context("setting the connection's timeout")?;
    let _ = tcp.set_nodelay(true);
    let Some(files) = tls else {
        return Ok(Box::new(tcp));
    };
    let cfg = stasis_migrate::tls::client_config(files)?;
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let conn = stasis_migrate::tls::connect(tcp, host, cfg)
        .map_err(|e| exit::refused(format!("{e}; nothing was changed")))?;
    Ok(Box::new(conn))
}

fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| exit::usage(format!("--to tcp://{addr}: {e}")))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
    Err(exit::refused(format!(
        "no receiver at tcp://{addr} ({why}); nothing was changed"
    )))
}

/// `stasis receive`.
pub fn receive(state: &StateDir, a: ReceiveArgs) -> Result<i32> {
    let tls = a.tls.files()?;
    // Read now: a receiver that cannot tell what its CPU has does not start.
    stasis_runtime::procfs::cpu_flags(&a.cpuinfo)?;
    if let Some(files) = &tls {
        // Bad files are found now, not at the first migration.
        stasis_migrate::tls::server_config(files)?;
    }
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| exit::usage(format!("--listen {}: {e}", a.listen)))?;
    let max = stasis_runtime::cgroups::parse_size(&a.max_image_size).context("--max-image-size")?;
    let program = std::env::current_exe().context("finding the stasis binary")?;
    let mut args = vec![
        "--state-dir".to_string(),
        state.root().display().to_string(),
        "receive-worker".into(),
        "--max-image-size".into(),
        max.to_string(),
        "--timeout".into(),
        a.timeout.to_string(),
        "--cpuinfo".into(),
        a.cpuinfo.clone(),
    ];
    if a.inherit_stdio {
        args.push("--inherit-stdio".into());
    }
    if let Some(p) = &a.cgroup_parent {
        stasis_runtime::container::check_cgroup_parent(p)
            .map_err(|e| exit::usage(e.to_string()))?;
        args.extend(["--cgroup-parent".into(), p.clone()]);
    }
    if let Some(f) = &tls {
        for (flag, path) in [
            ("--tls-cert", &f.cert),
            ("--tls-key", &f.key),
            ("--tls-ca", &f.ca),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
    }
    eprintln!(
        "stasis receive: {}",
        match tls {
            Some(_) => "mutual TLS: only peers with a certificate from --tls-ca are accepted",
            None => "plain TCP (--insecure): any peer that connects is accepted",
        }
    );
    let worker = stasis_migrate::listener::Worker {
        program,
        args,
        incoming: stasis_migrate::incoming::incoming_dir(state),
    };
    stasis_migrate::listener::serve(addr, worker, a.max_parallel, |m| {
        eprintln!("stasis receive: {m}")
    })?;
    Ok(exit::OK)
}

/// `stasis receive-worker`: one migration on fd 3.
pub fn worker(state: &StateDir, a: WorkerArgs) -> Result<i32> {
    // SAFETY: fd 3 is the connection the receiver passed on (see listener::WORKER_FD);
    // nothing else in this process owns it.
    let tcp = unsafe { TcpStream::from_raw_fd(stasis_migrate::listener::WORKER_FD) };
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    tcp.set_read_timeout(Some(Duration::from_secs(a.timeout)))
        .context("setting the connection's timeout")?;
    let _ = tcp.set_nodelay(true);
    let conn: Box<dyn stasis_migrate::tls::Conn> = match (a.tls_cert, a.tls_key, a.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let cfg = stasis_migrate::tls::server_config(&stasis_migrate::tls::TlsFiles {
                cert,
                key,
                ca,
            })?;
            // Nothing of the protocol is read before the peer proved who it is.
            let tls = stasis_migrate::tls::accept(tcp, &peer, cfg)
                .map_err(|e| exit::refused(format!("refused: {e}")))?;
            Box::new(tls)
        }
        _ => Box::new(tcp),
    };
    let opts = stasis_migrate::ReceiveOptions {
        state: state.clone(),
        max_image_bytes: a.max_image_size,
        inherit_stdio: a.inherit_stdio,
        cpu_flags: stasis_runtime::procfs::cpu_flags(&a.cpuinfo)?,
        cgroup_parent: a.cgroup_parent,
    };
    let r = stasis_migrate::receive_one(conn, &peer, &opts)?;
    let peak = peak_rss();
    eprintln!(
        "stasis receive: {} runs here as PID {} ({} of image and {} of pages received, built in {}; peak RSS of the receiving process {}: its own {}, the workload's memory held for it {})",
        r.workload,
        r.pid,
        report::bytes(r.image_bytes),
        report::bytes(r.page_bytes),
        report::ms(r.build_us),
        report::bytes(peak),
        report::bytes(peak.saturating_sub(r.held_bytes)),
        report::bytes(r.held_bytes)
    );
    Ok(exit::OK)
}
