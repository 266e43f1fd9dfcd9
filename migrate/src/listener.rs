//! `stasis receive`: a long-running server that accepts migrations, several at a time (up
//! to a bound), each handed to a worker process of its own (`stasis receive-worker`, the
//! connection on fd 3) that runs [`crate::receive_one`] and exits. A restored process tree
//! is so never a child of the server (it is reparented when its worker exits, as after
//! `stasis restore --detach`), and one migration that crashes takes no other along.
//! SIGINT or SIGTERM stops accepting; migrations under way are finished first.

use crate::MigrateError;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

/// The fd a worker finds its connection on.
pub const WORKER_FD: i32 = 3;

/// How to start a worker: the program and its arguments (the connection goes on fd 3).
#[derive(Debug, Clone)]
pub struct Worker {
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
    /// Where workers store what they receive (see [`crate::incoming::remove_incoming`]:
    /// removed here once the worker is gone, however it ended).
    pub incoming: std::path::PathBuf,
}

/// Serves migrations on `addr` until SIGINT or SIGTERM; `log` says what happens (stderr).
pub fn serve(
    addr: SocketAddr,
    worker: Worker,
    max_parallel: usize,
    log: fn(&str),
) -> Result<(), MigrateError> {
    let err = |what: String| MigrateError::Listener {
        addr: addr.to_string(),
        what,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("starting the runtime: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| err(format!("bind: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| err(format!("local address: {e}")))?;
        log(&format!("listening on {bound}"));
        let slots = Arc::new(tokio::sync::Semaphore::new(max_parallel.max(1)));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| err(format!("SIGTERM handler: {e}")))?;
        let mut running = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(v) => v,
                        Err(e) => {
                            log(&format!("accept: {e}"));
                            continue;
                        }
                    };
                    let (worker, slots) = (worker.clone(), slots.clone());
                    running.spawn(async move {
                        let Ok(_slot) = slots.acquire_owned().await else { return };
                        match run_worker(&worker, stream).await {
                            Ok(status) if status.success() => {
                                log(&format!("{peer}: migration received"))
                            }
                            Ok(status) => log(&format!("{peer}: migration failed ({status})")),
                            Err(e) => log(&format!("{peer}: starting a worker: {e}")),
                        }
                    });
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        log("stopping: finishing the migrations under way");
        while running.join_next().await.is_some() {}
        Ok(())
    })
}

/// Runs one worker with `stream` on fd 3 and waits for it.
async fn run_worker(
    worker: &Worker,
    stream: tokio::net::TcpStream,
) -> std::io::Result<std::process::ExitStatus> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let fd: OwnedFd = stream.into();
    let raw = fd.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&worker.program);
    cmd.args(&worker.args).stdin(Stdio::inherit());
    // SAFETY: between fork and exec only dup2 or fcntl runs (async-signal-safe); `raw` stays open in
    // the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            // On fd 3 already, it only needs to survive the exec.
            let rc = match raw == WORKER_FD {
                true => libc::fcntl(raw, libc::F_SETFD, 0),
                false => libc::dup2(raw, WORKER_FD),
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(fd);
    let pid = child.id();
    let status = child.wait().await;
    // A worker that was killed left what it received behind.
    if let Some(pid) = pid {
        crate::incoming::remove_incoming(&worker.incoming, pid);
    }
    status
}
