//! `ironsan`: the one binary. It parses flags and calls into the component crates.

mod admin;
mod bench;
mod bench_manager;
mod csi;
mod deploy;
mod dev;
mod dev_cluster;
mod gateway;
mod manager;
mod storage;

use std::future::Future;

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
    /// Run a whole IronSAN cluster in one process on this machine (managers, storage daemons, a
    /// gateway) serving replicated volumes over iSCSI, until SIGTERM/SIGINT.
    Dev(dev::DevArgs),
    /// Run a cluster manager member (Raft group), or change the group's membership.
    Manager(manager::ManagerArgs),
    /// Run an iSCSI gateway serving the volumes attached to it, replicated on storage daemons.
    Gateway(gateway::GatewayArgs),
    /// Run a storage daemon serving the chunk store of its data directories.
    Storage(storage::StorageArgs),
    /// Run the CSI driver (csi.ironsan.io) for Kubernetes: controller, node plugin, or both.
    Csi(csi::CsiArgs),
    /// Create, list, inspect, resize, snapshot, clone and delete volumes (through the manager).
    Volume(admin::VolumeArgs),
    /// List and drain storage nodes (through the manager).
    Node(admin::NodeArgs),
    /// Show the manager group and the cluster's health.
    Status(admin::StatusArgs),
    /// Install on Kubernetes: render the manifests.
    #[command(subcommand)]
    Deploy(deploy::DeployCmd),
    /// Load generators for benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => daemon(dev::run(args)),
        Command::Storage(args) => daemon(storage::run(args)),
        Command::Gateway(args) => daemon(gateway::run(args)),
        Command::Csi(args) => daemon(csi::run(args)),
        Command::Manager(args) => match args.member {
            Some(cmd) => admin(admin::run_member(
                cmd,
                &args.daemon.manager,
                args.daemon.json,
            )),
            None => daemon(manager::run(args.daemon)),
        },
        Command::Bench(cmd) => daemon(bench::run(cmd)),
        Command::Deploy(cmd) => {
            if let Err(e) = deploy::run(cmd) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Volume(args) => admin(admin::run_volume(args)),
        Command::Node(args) => admin(admin::run_node(args)),
        Command::Status(args) => admin(admin::run_status(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A long-running command: logs at info; an error ends it through anyhow.
fn daemon(run: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    ironsan_common::observe::init_tracing("info");
    runtime()?.block_on(run)
}

/// An admin command: results on stdout, only warnings in the log, and an error as one readable
/// line (no debug form, no backtrace) with exit status 1.
fn admin(run: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    ironsan_common::observe::init_tracing("warn");
    if let Err(e) = runtime()?.block_on(run) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
