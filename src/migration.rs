//! `stasis migrate`, `stasis receive` and the receiver's worker.

use crate::{exit, report};
use anyhow::{Context, Result};
use clap::Args;
use stasis_image::Compression;
use stasis_runtime::container::StateDir;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::FromRawFd;
use std::time::Duration;

/// `stasis migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// PID of the process tree's root, or the name of a container.
    #[arg(value_name = "PID|NAME")]
    target: String,
    /// The receiver: tcp://HOST:PORT (`stasis receive --listen` there).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    to: String,
    /// Run it under this name on the destination (containers; default: its own).
    #[arg(long)]
    name: Option<String>,
    /// Keep established TCP connections (locked off the network while they move).
    #[arg(long)]
    tcp_established: bool,
    /// Page data encoding on the wire: none or zstd[:LEVEL].
    #[arg(long, default_value = "none")]
    compress: Compression,
    /// Seconds to wait for each answer of the receiver.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Plain TCP without authentication (required today: mutual TLS is not there yet).
    #[arg(long)]
    insecure: bool,
    /// Print the migration's figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `stasis receive`.
#[derive(Args)]
pub struct ReceiveArgs {
    /// Address and port to accept migrations on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// Plain TCP without authentication (required today: mutual TLS is not there yet).
    #[arg(long)]
    insecure: bool,
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
}

/// The receiver's worker (internal): one migration, its connection on fd 3.
#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    inherit_stdio: bool,
    #[arg(long)]
    max_image_size: u64,
    #[arg(long)]
    timeout: u64,
}

const NO_TLS: &str = "mutual TLS (--tls-cert, --tls-key, --tls-ca) is not implemented yet; \
                      plain TCP must be asked for with --insecure";

fn warn_insecure() {
    eprintln!("stasis: warning: --insecure: the migration is neither authenticated nor encrypted");
}

/// `stasis migrate`.
pub fn migrate(state: &StateDir, a: MigrateArgs) -> Result<i32> {
    if !a.insecure {
        return Err(exit::usage(NO_TLS.into()));
    }
    warn_insecure();
    let addr =
        a.to.strip_prefix("tcp://")
            .ok_or_else(|| exit::usage(format!("--to {}: expected tcp://HOST:PORT", a.to)))?;
    let opts = stasis_workload::SourceOptions {
        tree: stasis_checkpoint::Options {
            compression: a.compress,
            tcp_established: a.tcp_established,
            ..Default::default()
        },
        vm: Default::default(),
    };
    let mut w = stasis_workload::open(state, &a.target, &opts)?;
    let name = match w.kind() {
        stasis_workload::Kind::ProcessTree => {
            if let Some(n) = &a.name {
                return Err(exit::usage(format!("--name {n} is for containers")));
            }
            None
        }
        stasis_workload::Kind::Container => Some(a.name.clone().unwrap_or(a.target.clone())),
        stasis_workload::Kind::Vm => {
            return Err(exit::refused(format!(
                "VM {}: migrating a VM is not implemented yet (a paused VM cannot be left \
                 paused for an operator to settle)",
                a.target
            )))
        }
    };
    let conn = connect(addr, Duration::from_secs(a.timeout))?;
    let mopts = stasis_migrate::MigrateOptions {
        name,
        answer_timeout: Duration::from_secs(a.timeout),
    };
    let bar = report::progress_bar(a.json, "migrate");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let migrated = stasis_migrate::migrate(w.as_mut(), conn, &mopts, &progress);
    bar.finish_and_clear();
    let r = migrated?;
    if a.json {
        report::json(&r)?;
    } else {
        crate::outln!(
            "migrated {} to {} (PID {} there): {} sent, down {} (transfer {}, build {}, resume {}), total {}",
            r.workload,
            a.to,
            r.destination_pid,
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

/// Connects to the receiver, trying each address it resolves to.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream> {
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
    if !a.insecure {
        return Err(exit::usage(NO_TLS.into()));
    }
    warn_insecure();
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
    ];
    if a.inherit_stdio {
        args.push("--inherit-stdio".into());
    }
    let worker = stasis_migrate::listener::Worker {
        program,
        args,
        incoming: state.root().join("incoming"),
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
    let conn = unsafe { TcpStream::from_raw_fd(stasis_migrate::listener::WORKER_FD) };
    let opts = stasis_migrate::ReceiveOptions {
        state: state.clone(),
        incoming: state.root().join("incoming"),
        max_image_bytes: a.max_image_size,
        timeout: Duration::from_secs(a.timeout),
        inherit_stdio: a.inherit_stdio,
    };
    let r = stasis_migrate::receive_one(conn, &opts)?;
    eprintln!(
        "stasis receive: {} runs here as PID {} ({} received, built in {})",
        r.workload,
        r.pid,
        report::bytes(r.image_bytes),
        report::ms(r.build_us)
    );
    Ok(exit::OK)
}
