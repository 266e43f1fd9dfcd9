//! Command-line interface (clap).

use crate::{demo, exit, report};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use stasis_checkpoint::{FileSink, StreamSink};
use stasis_image::{Compression, Image};
use std::io::IsTerminal;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Exit codes:
  0  success (restore without --detach: the restored process's own exit status)
  1  the operation failed; the workload was left as it was
  2  usage error
  3  the image is corrupt, truncated or not a stasis image
  4  refused before anything changed: no such process, PID in use, or an unsupported feature
  128+N  checkpoint interrupted by signal N (Ctrl-C: 130); the process was left as it was";

/// Checkpoint, restore and live-migrate Linux workloads.
#[derive(Parser)]
#[command(name = "stasis", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save a running process into an image file (like `criu dump`).
    ///
    /// The process is stopped with ptrace, its registers, memory, files and signal state are
    /// written to IMAGE, and only once the image is completely written and synced is the
    /// process killed (default) or let run on (--leave-running). If anything fails, the
    /// process is resumed exactly as it was.
    Checkpoint {
        /// PID of the process to checkpoint.
        pid: i32,
        /// Image file to write ("-" streams it to standard output).
        #[arg(short, long)]
        output: PathBuf,
        /// Let the process run on after the checkpoint instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// Keep established TCP connections (as criu's --tcp-established): their packets
        /// are dropped by an nftables lock while they are read with TCP_REPAIR, and stay
        /// locked from the kill until `stasis restore` rebuilds them, so the peer sees only
        /// a pause. Without it a tree holding a connection is refused.
        #[arg(long)]
        tcp_established: bool,
        /// Page data encoding: none (raw, page-aligned, mappable) or zstd[:LEVEL].
        #[arg(long, default_value = "none")]
        compress: Compression,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recreate a process from an image, with its original PID.
    ///
    /// The whole image is verified and the PID checked free before anything is created.
    /// Without --detach stasis waits for the restored process and exits with its status;
    /// standard input/output that was a terminal or pipe is taken from stasis's own.
    Restore {
        /// Image file.
        image: PathBuf,
        /// Leave the restored process running and exit (prints its PID).
        #[arg(short, long)]
        detach: bool,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Look into image files.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the built-in demo: a counter is checkpointed, killed, restored, and carries on.
    Demo {
        /// Print the demo's results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The demo's counter workload (internal).
    #[command(hide = true, name = "__demo-counter")]
    DemoCounter,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Show everything in an image: processes, registers, mappings, fds, pages, chunks.
    Inspect {
        image: PathBuf,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every byte of an image (headers, hashes, index); exit 3 with the reason if bad.
    Verify {
        /// Image file, or "-" to read a stream from standard input.
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Checkpoint {
            pid,
            output,
            leave_running,
            tcp_established,
            compress,
            json,
        } => {
            let opts = stasis_checkpoint::Options {
                leave_running,
                compression: compress,
                tcp_established,
            };
            checkpoint(pid, output, opts, json)
        }
        Command::Restore {
            image,
            detach,
            json,
        } => restore(image, detach, json),
        Command::Image(ImageCommand::Inspect { image, json }) => inspect(image, json),
        Command::Image(ImageCommand::Verify { image, json }) => verify(image, json),
        Command::Demo { json } => demo::run(json),
        Command::DemoCounter => demo::counter(),
    }
}

fn checkpoint(
    pid: i32,
    output: PathBuf,
    opts: stasis_checkpoint::Options,
    json: bool,
) -> Result<i32> {
    let bar = report::progress_bar(json || output.as_os_str() == "-", "checkpoint");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let stats = if output.as_os_str() == "-" {
        if std::io::stdout().is_terminal() {
            bail!("refusing to write an image to a terminal; redirect standard output");
        }
        let out = std::os::fd::AsFd::as_fd(&std::io::stdout())
            .try_clone_to_owned()
            .context("duplicating standard output")?;
        let sink = StreamSink::new(std::fs::File::from(out));
        stasis_checkpoint::checkpoint_tree(pid, &opts, sink, &progress)?
    } else {
        let sink =
            FileSink::create(&output).with_context(|| format!("creating {}", output.display()))?;
        stasis_checkpoint::checkpoint_tree(pid, &opts, sink, &progress)?
    };
    bar.finish_and_clear();
    if json {
        report::json(&stats)?;
    } else if output.as_os_str() != "-" {
        crate::outln!(
            "checkpointed PID {} into {} ({}), process {}",
            stats.pid,
            output.display(),
            report::bytes(stats.image_bytes),
            stats.process
        );
        if stats.tcp_connections > 0 {
            crate::outln!(
                "  {} established TCP connections kept{}",
                stats.tcp_connections,
                if opts.leave_running {
                    ""
                } else {
                    " (locked off the network until restored)"
                }
            );
        }
        crate::outln!(
            "  frozen {}  (freeze {}), total {}",
            report::ms(stats.frozen_us),
            report::ms(stats.freeze_us),
            report::ms(stats.total_us)
        );
        crate::outln!(
            "  pages: {} stored, {} zero, {} never touched; {} raw -> {} stored ({})",
            stats.pages_data,
            stats.pages_zero,
            stats.pages_skipped,
            report::bytes(stats.bytes_raw),
            report::bytes(stats.bytes_stored),
            stats.compression
        );
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct RestoreReport {
    #[serde(flatten)]
    stats: stasis_restore::Stats,
    detached: bool,
    exit_status: Option<i32>,
}

fn restore(path: PathBuf, detach: bool, json: bool) -> Result<i32> {
    let image = open_image(&path)?;
    let stats = stasis_restore::restore_tree(&image, &stasis_restore::Options::default())?;
    drop(image);
    let pid = stats.pid;
    for w in &stats.warnings {
        eprintln!("stasis: warning: {w}");
    }
    if detach {
        if json {
            report::json(&RestoreReport {
                stats,
                detached: true,
                exit_status: None,
            })?;
        } else {
            crate::outln!("{pid}");
        }
        return Ok(exit::OK);
    }
    if !json {
        eprintln!(
            "stasis: restored PID {pid} in {} (verify {}); waiting for it to exit",
            report::ms(stats.total_us),
            report::ms(stats.verify_us)
        );
    }
    let status = stasis_restore::wait_exit(pid)?;
    if json {
        report::json(&RestoreReport {
            stats,
            detached: false,
            exit_status: Some(status),
        })?;
    }
    Ok(status)
}

fn inspect(path: PathBuf, json: bool) -> Result<i32> {
    let image = open_image(&path)?;
    let rep = stasis_image::inspect::report(&image);
    if json {
        report::json(&rep)?;
    } else {
        report::out(&rep.to_string());
    }
    Ok(exit::OK)
}

fn verify(path: PathBuf, json: bool) -> Result<i32> {
    if path.as_os_str() == "-" {
        // A stream (e.g. `stasis checkpoint PID -o - | stasis image verify -`).
        let rep = stasis_image::verify_stream(std::io::BufReader::with_capacity(
            1 << 20,
            std::io::stdin().lock(),
        ))
        .context("image on standard input is invalid")?;
        if json {
            report::json(&rep)?;
        } else {
            crate::outln!("-: OK ({} frames, {} bytes)", rep.frames, rep.file_bytes);
        }
        return Ok(exit::OK);
    }
    let image = open_image(&path)?;
    let rep = image
        .verify()
        .with_context(|| format!("verifying {}", path.display()))?;
    if json {
        report::json(&rep)?;
    } else {
        crate::outln!(
            "{}: OK ({} frames, {} bytes)",
            path.display(),
            rep.frames,
            image.file_len()
        );
    }
    Ok(exit::OK)
}

/// Opens an image; a corrupt one is reported as "image PATH is invalid: <what and where>".
fn open_image(path: &std::path::Path) -> Result<Image> {
    match Image::open(path) {
        Ok(i) => Ok(i),
        Err(e @ stasis_image::ImageError::File { .. }) => Err(e.into()),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("image {} is invalid", path.display())))
        }
    }
}
