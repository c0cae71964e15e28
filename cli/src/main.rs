//! `ironsan`: the one binary. It parses flags and calls into the component crates.

mod bench;
mod bench_manager;
mod dev;
mod manager;
mod storage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ironsan",
    version,
    about = "IronSAN: distributed block storage served over iSCSI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local IronSAN on this machine, serving volumes over iSCSI, until SIGTERM/SIGINT.
    Dev(dev::DevArgs),
    /// Run a cluster manager member (Raft group), or change the group's membership.
    Manager(manager::ManagerArgs),
    /// Run a storage daemon serving the chunk store of its data directories.
    Storage(storage::StorageArgs),
    /// Load generators for benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ironsan_common::observe::init_tracing("info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Dev(args) => runtime.block_on(dev::run(args)),
        Command::Storage(args) => runtime.block_on(storage::run(args)),
        Command::Manager(args) => runtime.block_on(manager::run(args)),
        Command::Bench(cmd) => runtime.block_on(bench::run(cmd)),
    }
}
