//! The `stasis` command: checkpoint, restore and inspect Linux workloads.

mod cli;
mod containers;
mod demo;
mod exit;
mod migration;
mod report;
mod vms;

use clap::Parser;

fn main() {
    #[cfg(feature = "failpoints")]
    let _failpoints = stasis_runtime::failpoints::setup();
    let cli = cli::Cli::parse();
    stasis_restore::validate::on_pid_wait(|why| eprintln!("stasis: {why}"));
    let code = match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("stasis: error: {err:#}");
            exit::code_for(&err)
        }
    };
    std::process::exit(code);
}
