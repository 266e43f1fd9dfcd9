//! The VM commands: `stasis vm run/ps/stop/console`.

use crate::{exit, report};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use stasis_runtime::container::StateDir;
use stasis_runtime::kvm::console;
use stasis_runtime::kvm::vmm::{self, Guest, VmConfig, VmReport};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Start a VM: the built-in demo guest (--guest demo) or a Linux kernel (--kernel, on
    /// hosts with VMX/SVM).
    ///
    /// Without --detach the VM runs in the foreground with its serial console on standard
    /// output until the guest shuts down or Ctrl-C stops it. With --detach a VMM process
    /// keeps it running; its console goes to the VM's log (`stasis vm console NAME`).
    Run(RunArgs),
    /// List running VMs with the demo guest's counter and error count.
    Ps {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM cleanly and remove its record.
    Stop {
        /// The VM's name.
        name: String,
        /// Seconds to wait for the VMM to tear the VM down.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Print the VM's final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let a VM run that a migration left paused (its commit was never confirmed, and the
    /// destination does not run it).
    Resume {
        /// The VM's name.
        name: String,
        /// Print the VM's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a VM's serial console: show its log as it grows and send standard input
    /// to the guest (a terminal in raw mode), until Ctrl-] detaches or the VM ends.
    Console {
        /// The VM's name.
        name: String,
        /// Print what the console has shown so far and exit (no input is sent).
        #[arg(long)]
        no_follow: bool,
    },
}

/// `stasis vm run`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["kernel", "guest"])))]
pub struct RunArgs {
    /// Name of the VM (unique on this host).
    #[arg(long)]
    pub name: String,
    /// Guest memory (bytes, or with a suffix: 64m, 1g); a multiple of 2 MiB.
    #[arg(long, value_name = "SIZE")]
    pub memory: String,
    /// vCPUs: the demo guest runs 1 to 8, each on its own slice of memory; a kernel, 1.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// A Linux bzImage to boot (needs hardware virtualization, VMX or SVM).
    #[arg(long, value_name = "BZIMAGE", conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,
    /// An initramfs for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line for --kernel.
    #[arg(
        long,
        value_name = "S",
        requires = "kernel",
        default_value = "console=ttyS0"
    )]
    pub cmdline: String,
    /// A built-in guest: demo.
    #[arg(long, value_parser = ["demo"])]
    pub guest: Option<String>,
    /// Run in the background: print the name and exit.
    #[arg(short, long)]
    pub detach: bool,
    /// Print the VM's report as JSON (in the foreground the console then goes only to
    /// the log).
    #[arg(long)]
    pub json: bool,
    /// Stop the demo guest after this many steps (tests).
    #[arg(long, hide = true, default_value_t = 0)]
    pub steps: u64,
    /// Iterations of an empty loop before each of the demo guest's steps: a slow guest
    /// that dirties few pages (pre-copy benchmarks).
    #[arg(long, hide = true, default_value_t = 0)]
    pub step_delay: u64,
    /// The demo guest's steps between reports.
    #[arg(long, hide = true, default_value_t = stasis_runtime::kvm::demo::REPORT_EVERY)]
    pub report_every: u64,
    /// Give the demo guest an in-kernel irqchip and PIT it does not use (a Linux guest
    /// always has them): their state goes through snapshots (tests).
    #[arg(long, hide = true)]
    pub irqchip: bool,
}

pub fn command(state: &StateDir, cmd: VmCommand) -> Result<i32> {
    match cmd {
        VmCommand::Run(a) => run(state, a),
        VmCommand::Ps { json } => ps(state, json),
        VmCommand::Stop {
            name,
            timeout,
            json,
        } => {
            let rep = vmm::stop(state, &name, Duration::from_secs_f64(timeout.max(0.0)))
                .with_context(|| format!("stopping VM {name}"))?;
            if json {
                report::json(&rep)?;
            } else {
                crate::outln!("{name}: {}", summary(&rep));
            }
            Ok(exit::OK)
        }
        VmCommand::Resume { name, json } => {
            let rep = vmm::resume(state, &name).with_context(|| format!("resuming VM {name}"))?;
            if json {
                report::json(&rep)?;
            } else {
                crate::outln!("{name}: {}", summary(&rep));
            }
            Ok(exit::OK)
        }
        VmCommand::Console { name, no_follow } => console(state, &name, no_follow),
    }
}

/// `stasis vm console`.
fn console(state: &StateDir, name: &str, no_follow: bool) -> Result<i32> {
    let ctx = || format!("console of VM {name}");
    if no_follow {
        console::console(state, name, false, &mut std::io::stdout()).with_context(ctx)?;
        return Ok(exit::OK);
    }
    let raw = console::RawTerminal::enter().context("putting the terminal in raw mode")?;
    if raw.is_some() {
        eprint!("stasis: connected to VM {name} (detach: Ctrl-])\r\n");
    }
    let end = console::attach(state, name, std::io::stdin(), &mut std::io::stdout());
    drop(raw);
    match end.with_context(ctx)? {
        console::ConsoleEnd::Detached => eprintln!("\nstasis: detached from VM {name}"),
        console::ConsoleEnd::VmEnded => {}
    }
    Ok(exit::OK)
}

fn summary(r: &VmReport) -> String {
    format!(
        "{}, counter {} ({:.0} steps/s), {} reports, {} errors{}",
        r.end.as_deref().unwrap_or(&r.state),
        r.counter,
        r.steps_per_sec,
        r.reports,
        r.errors,
        r.last_error
            .as_deref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    )
}

fn run(state: &StateDir, a: RunArgs) -> Result<i32> {
    let memory = stasis_runtime::cgroups::parse_size(&a.memory).context("--memory")?;
    let guest = match a.kernel {
        Some(kernel) => Guest::Kernel {
            kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
        },
        None => Guest::Demo,
    };
    let cfg = VmConfig {
        name: a.name.clone(),
        memory,
        vcpus: a.vcpus,
        guest,
        report_every: a.report_every,
        steps: a.steps,
        step_delay: a.step_delay,
        irqchip: a.irqchip,
        restore: None,
    };
    if a.detach {
        let rec = vmm::run_detached(state, &cfg, None)
            .with_context(|| format!("starting VM {}", a.name))?
            .record;
        if a.json {
            report::json(&rec)?;
        } else {
            crate::outln!("{}", rec.name);
        }
        return Ok(exit::OK);
    }
    let rep = vmm::run_foreground(state, &cfg, a.json)
        .with_context(|| format!("running VM {}", a.name))?;
    if a.json {
        report::json(&rep)?;
    } else {
        eprintln!(
            "stasis: VM {}: {}; ring-0 setup {} us",
            rep.name,
            summary(&rep),
            rep.setup_us
        );
    }
    Ok(if rep.errors == 0 {
        exit::OK
    } else {
        exit::FAILED
    })
}

fn ps(state: &StateDir, json: bool) -> Result<i32> {
    let (live, stale) = vmm::list(state)?;
    for s in &stale {
        eprintln!("stasis: removed the stale record of VM {s} (its VMM was gone)");
    }
    let mut rows = Vec::new();
    for rec in &live {
        rows.push(vmm::query(state, &rec.name).with_context(|| format!("asking VM {}", rec.name))?);
    }
    if json {
        report::json(&rows)?;
        return Ok(exit::OK);
    }
    crate::outln!(
        "{:<20} {:>8} {:<8} {:>8} {:>14} {:>6} GUEST",
        "NAME",
        "PID",
        "STATE",
        "MEMORY",
        "COUNTER",
        "ERRORS"
    );
    for r in rows {
        crate::outln!(
            "{:<20} {:>8} {:<8} {:>8} {:>14} {:>6} {}",
            r.name,
            r.pid,
            r.state,
            report::bytes(r.memory),
            r.counter,
            r.errors,
            r.guest
        );
    }
    Ok(exit::OK)
}

/// Reports a VM checkpoint.
pub fn checkpointed(
    stats: &stasis_checkpoint::vm::VmStats,
    output: &std::path::Path,
    opts: &stasis_checkpoint::vm::VmCheckpointOptions,
    json: bool,
) -> Result<i32> {
    if json {
        report::json(stats)?;
        return Ok(exit::OK);
    }
    let name = &stats.name;
    crate::outln!(
        "checkpointed VM {name} into {} ({}), VM {}",
        output.display(),
        report::bytes(stats.image_bytes),
        stats.vm
    );
    crate::outln!(
        "  paused {} (VMM {}), pre-copy {}, total {}",
        report::ms(stats.pause_us),
        report::ms(stats.vmm_pause_us),
        report::ms(stats.precopy_us),
        report::ms(stats.total_us)
    );
    crate::outln!(
        "  pages: {} stored, {} zero, {} dirty during pre-copy; {} raw -> {} stored ({})",
        stats.pages_data,
        stats.pages_zero,
        stats.pages_dirty,
        report::bytes(stats.bytes_raw),
        report::bytes(stats.bytes_stored),
        stats.compression
    );
    if opts.leave_running && !stats.staged {
        crate::outln!(
            "  paused while its memory was written: {} resident is more than the staging limit {} (--staging-limit)",
            report::bytes(stats.pages_resident * stasis_runtime::PAGE_SIZE),
            report::bytes(stats.staging_limit)
        );
    }
    Ok(exit::OK)
}

/// Reports a VM restore: its record's name (detached) or the guest's final report
/// (foreground; exit 1 if the guest found errors).
pub fn restored(stats: &stasis_restore::vm::VmRestoreStats, json: bool) -> Result<i32> {
    if json {
        report::json(stats)?;
    } else if let Some(rec) = &stats.record {
        crate::outln!("{}", rec.name);
    }
    match &stats.report {
        Some(rep) => {
            if !json {
                eprintln!("stasis: VM {}: {}", rep.name, summary(rep));
            }
            Ok(if rep.errors == 0 {
                exit::OK
            } else {
                exit::FAILED
            })
        }
        None => Ok(exit::OK),
    }
}
