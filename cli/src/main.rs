//! `ironsan`: the one binary. It parses flags and calls into the component crates.

mod dev;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ironsan", version, about = "IronSAN: distributed block storage served over iSCSI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local IronSAN on this machine, serving volumes over iSCSI, until SIGTERM/SIGINT.
    Dev(dev::DevArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ironsan_common::observe::init_tracing("info");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Dev(args) => runtime.block_on(dev::run(args)),
    }
}
