//! `ironsan manager`: one member of the manager's Raft group, serving the cluster API until
//! SIGTERM/SIGINT. With a subcommand (`add-member`, `remove-member`, `transfer-leader`) it is
//! instead a client that changes the running group.
//!
//! For a StatefulSet: `--id-from-hostname` takes the id from the pod name (`NAME-ORDINAL`,
//! id = ordinal + 1), every pod may get the same `--peer` list (its own entry is skipped, and
//! names its address when `--advertise` is not given), `/readyz` is ready once this member is
//! a voter that knows a leader, and SIGTERM on the leader hands leadership over before exiting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::observe::Readiness;
use ironsan_manager::health::HealthConfig;
use ironsan_manager::node::NodeConfig;
use ironsan_manager::{Server, ServerConfig};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ManagerArgs {
    #[command(subcommand)]
    pub member: Option<crate::admin::MemberCmd>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// This member's id in the Raft group (non-zero, unique, never reused).
    #[arg(long, env = "IRONSAN_MANAGER_ID")]
    pub(crate) id: Option<u64>,
    /// Take the id from the hostname of a StatefulSet pod, NAME-ORDINAL: id = ORDINAL + 1
    /// (ironsan-manager-0 is member 1).
    #[arg(long, conflicts_with = "id")]
    pub(crate) id_from_hostname: bool,
    /// gRPC address for clients and members.
    #[arg(long, env = "IRONSAN_MANAGER_LISTEN", default_value = "127.0.0.1:7400")]
    pub(crate) listen: SocketAddr,
    /// Address the other members and clients reach this member at (default: --listen).
    #[arg(long, env = "IRONSAN_MANAGER_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// Raft log, hard state and snapshots (a RocksDB under DIR/raft).
    #[arg(long, env = "IRONSAN_MANAGER_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// A member of the group, ID=HOST:PORT (a DNS name may resolve only later). Repeat for
    /// each; omit for a 1-member group. This member's own entry may be listed too (the same
    /// list on every member): it is skipped, and is the default of --advertise.
    #[arg(long = "peer", value_parser = parse_peer, env = "IRONSAN_MANAGER_PEERS", value_delimiter = ',')]
    pub(crate) peers: Vec<(u64, String)>,
    /// Join an existing group (after `add-member`) instead of bootstrapping a new one.
    #[arg(long)]
    pub(crate) join: bool,
    /// Serve Prometheus metrics on /metrics, /healthz and /readyz at this address.
    #[arg(long, env = "IRONSAN_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// A storage node silent this long is declared Down (e.g. 10s).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) node_timeout: Duration,
    /// A Down node's chunks get new replicas after this long (e.g. 30s).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub(crate) recovery_grace: Duration,
    /// Heartbeat interval asked of storage daemons.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub(crate) heartbeat_interval: Duration,
    /// Refuse creating or growing volumes past this many times the raw capacity of the Up
    /// storage nodes (size x replicas, all volumes; 0: never refuse, only warn past 1x).
    #[arg(long, value_parser = parse_overcommit, default_value = "0")]
    pub(crate) max_overcommit: f64,
    /// Raft tick: elections time out after 10 to 20 ticks.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub(crate) raft_tick: Duration,
    /// Snapshot the state and compact the Raft log every this many entries. The log keeps a
    /// tail of at most this many entries (and at most 1000) behind the snapshot for lagging
    /// followers; one further behind is sent the snapshot.
    #[arg(long, default_value_t = 5000)]
    pub(crate) snapshot_every: u64,
    /// Manager to send a member command to (with a subcommand).
    #[arg(
        long,
        env = "IRONSAN_MANAGER",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    pub manager: String,
    /// Print JSON instead of a table (with a subcommand).
    #[arg(long, global = true)]
    pub json: bool,
}

/// An over-commit ratio: 0 (off) or from 0.1 to 1000.
pub(crate) fn parse_overcommit(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a ratio such as 1.5"))?;
    if r == 0.0 || (0.1..=1000.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!(
            "{s}: the ratio must be 0 (off) or from 0.1 to 1000"
        ))
    }
}

fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} is not ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("peer id {id:?} is not a number"))?;
    let addr = addr.trim();
    if id == 0 || !addr.contains(':') {
        return Err(format!("peer {s:?} is not ID=HOST:PORT with a non-zero ID"));
    }
    Ok((id, addr.to_string()))
}

/// `250ms`, `10s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} is not a number with ms, s or m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("duration {s:?}: unit must be ms, s or m")),
    };
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

/// How long a stopping leader waits at most for a follower to take over. A live follower
/// takes over within a few round trips; raft-rs gives a transfer up after an election timeout,
/// so waiting longer than two would only delay the exit.
const HANDOVER_MAX: Duration = Duration::from_secs(3);

pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let ready = crate::dev::start_metrics(args.metrics).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(stop.clone()));
    serve(args, stop, ready).await
}

/// The member id a StatefulSet pod's hostname implies: `NAME-ORDINAL` is member ORDINAL + 1
/// (ids are non-zero). A fully qualified name counts by its first label.
pub(crate) fn id_from_hostname(host: &str) -> Result<u64, String> {
    let short = host.split('.').next().unwrap_or(host);
    let ordinal = short
        .rsplit_once('-')
        .filter(|(name, n)| {
            !name.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "hostname {host:?} does not end in -ORDINAL (a StatefulSet pod is named \
                 NAME-0, NAME-1, ...): give --id instead of --id-from-hostname"
            )
        })?;
    ordinal
        .checked_add(1)
        .ok_or_else(|| format!("hostname {host:?}: ordinal {ordinal} is too large"))
}

/// Runs one member until `stop` (`ironsan dev` runs its members in one process); `ready`
/// answers `/readyz`.
pub async fn serve(
    args: DaemonArgs,
    stop: tokio_util::sync::CancellationToken,
    ready: Readiness,
) -> anyhow::Result<()> {
    let a = args;
    let id = match (a.id, a.id_from_hostname) {
        (Some(id), _) => id,
        (None, true) => {
            let host = crate::storage::hostname().context("--id-from-hostname")?;
            let id = id_from_hostname(&host).map_err(anyhow::Error::msg)?;
            tracing::info!(hostname = %host, member = id, "member id from the hostname");
            id
        }
        (None, false) => bail!("--id (or --id-from-hostname) is required to run a manager member"),
    };
    let data_dir = a
        .data_dir
        .context("--data-dir is required to run a manager member")?;
    let mut peers = BTreeMap::new();
    let mut own = None;
    for (pid, addr) in a.peers {
        if pid == id {
            // The same --peer list on every member (a StatefulSet's pods share their args).
            if own.replace(addr).is_some() {
                bail!("--peer {pid} given twice");
            }
            continue;
        }
        if peers.insert(pid, addr).is_some() {
            bail!("--peer {pid} given twice");
        }
    }
    let advertise = match (a.advertise, own) {
        (Some(adv), Some(own)) if adv != own => {
            bail!("--peer {id}={own} names this member at another address than --advertise {adv}")
        }
        (Some(adv), _) => adv,
        (None, Some(own)) => own,
        (None, None) if a.listen.ip().is_unspecified() => {
            bail!(
                "--listen {} is a wildcard address: give --advertise HOST:PORT",
                a.listen
            )
        }
        (None, None) => a.listen.to_string(),
    };
    let mut raft = NodeConfig::new(id);
    raft.tick = a.raft_tick;
    let handover = HANDOVER_MAX.min(raft.tick * (raft.election_ticks as u32) * 2);
    raft.snapshot_every = a.snapshot_every.max(1);
    // A tail longer than the interval would mean the log is never truncated at small intervals.
    raft.log_keep = raft.log_keep.min(raft.snapshot_every);
    let cfg = ServerConfig {
        id,
        listen: a.listen,
        advertise,
        data_dir,
        peers,
        join: a.join,
        raft,
        health: HealthConfig {
            node_timeout: a.node_timeout,
            recovery_grace: a.recovery_grace,
            heartbeat_interval: a.heartbeat_interval,
            max_overcommit: a.max_overcommit,
            ..Default::default()
        },
    };
    let server = Server::start(cfg).await?;
    let node = server.node.clone();
    ready.set(move || node.ready());
    tracing::info!(addr = %server.addr, "manager listening");
    stop.cancelled().await;
    server.stop(handover).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_durations() {
        assert_eq!(
            parse_peer("2=10.0.0.2:7400"),
            Ok((2, "10.0.0.2:7400".into()))
        );
        assert!(parse_peer("0=a:1").is_err());
        assert!(parse_peer("x=a:1").is_err());
        assert!(parse_peer("2").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn ids_from_statefulset_hostnames() {
        assert_eq!(id_from_hostname("ironsan-manager-0"), Ok(1));
        assert_eq!(id_from_hostname("ironsan-manager-2"), Ok(3));
        assert_eq!(id_from_hostname("m-41"), Ok(42));
        assert_eq!(
            id_from_hostname("ironsan-manager-1.ironsan-manager.ironsan.svc.cluster.local"),
            Ok(2)
        );
        for bad in [
            "manager",
            "ironsan-manager",
            "ironsan-manager-",
            "-0",
            "ironsan-manager-x1",
            "ironsan-manager-+1",
            "",
            "ironsan-manager-18446744073709551615",
            "ironsan-manager-99999999999999999999",
        ] {
            let e = id_from_hostname(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }
}
