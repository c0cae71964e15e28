//! Operator commands that talk to the manager: `ironsan volume create|list|get|resize|delete|qos`,
//! `ironsan volume snapshot create|list|delete|restore`, `ironsan volume clone`,
//! `ironsan node list|drain`, `ironsan status`, and the member administration
//! ([`MemberCmd`]: add-member, remove-member, transfer-leader) that `ironsan manager` hooks in.
//!
//! Every command takes `--manager HOST:PORT[,...]` (any member; the client fails over) and
//! `--json`. Tables are aligned columns with a header line; sizes print human-readable. JSON
//! mirrors the protobuf messages with their field names (stable across releases), sizes in
//! bytes, times in milliseconds and enums as lowercase words (`available`, `up`, `draining`).
//! A manager error becomes one readable line (`volume "x" not found`) and a non-zero exit.
//!
//! Snapshots are named `VOLUME@SNAPSHOT`. The manager answers a snapshot request (and a delete)
//! once committed, while the gateway holding the volume does the work on the replicas, so
//! `snapshot create` and `snapshot delete` poll the volume's snapshots until the outcome shows
//! (`--no-wait` returns at once).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::{Args, Subcommand};
use ironsan_common::manager_client::{ClientError, Code, ManagerClient};
use ironsan_common::parse_size;
use ironsan_common::proto::manager as pb;
use serde_json::{json, Value};

/// How to reach the manager and how to print; shared by every admin command.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Manager members, comma-separated HOST:PORT (any member answers).
    #[arg(
        long,
        env = "IRONSAN_MANAGER",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    pub manager: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: VolumeCmd,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume (thin: disk space is used only where written).
    Create {
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Replicas per chunk (default: the cluster's, 3).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        replicas: Option<u32>,
        /// Chunk size, e.g. 64MiB (default: the cluster's).
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// Change a volume's I/O limits live (the limits not named are kept), or clear them all.
    /// The serving gateway applies the change within a second; sessions stay logged in.
    Qos {
        name: String,
        #[command(flatten)]
        qos: QosArgs,
        /// Remove every limit (unlimited).
        #[arg(long, conflicts_with_all = ["read_iops", "write_iops", "read_bps", "write_bps", "burst"])]
        clear: bool,
    },
    /// List every volume.
    List,
    /// Show one volume.
    Get { name: String },
    /// Grow a volume to SIZE (volumes never shrink).
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and its chunks.
    Delete { name: String },
    /// Choose the gateway that serves a volume: it takes the lease and exports the target.
    /// Refused while another gateway holds an unexpired lease (detach it first, or wait).
    Attach {
        name: String,
        /// The gateway's node id (`ironsan gateway --node-id`).
        #[arg(long = "node")]
        node: String,
        /// Lease length, e.g. 10s (default: the manager's, 10 s).
        #[arg(long, value_parser = crate::manager::parse_duration)]
        lease: Option<std::time::Duration>,
    },
    /// Release a volume from its gateway, which stops serving it.
    Detach {
        name: String,
        /// Detach only if this gateway holds it (default: whoever holds it).
        #[arg(long = "node")]
        node: Option<String>,
    },
    /// Snapshots of a volume: point-in-time images to clone or roll back to.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Create a volume with another volume's present content, or a snapshot's. It is usable at
    /// once: its chunks are filled from the source before their first I/O.
    Clone {
        name: String,
        /// VOLUME (its present content) or VOLUME@SNAPSHOT.
        #[arg(long, value_parser = parse_source)]
        from: Source,
        /// Size, e.g. 20GiB (default: the source's; never smaller).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Replicas per chunk (default: the source's).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        replicas: Option<u32>,
        #[command(flatten)]
        qos: QosArgs,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot and wait until it is ready on every replica.
    Create {
        volume: String,
        snapshot: String,
        /// Return once the manager has recorded the request.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for it to be ready, e.g. 60s.
        #[arg(long, value_parser = crate::manager::parse_duration, default_value = "60s")]
        timeout: Duration,
    },
    /// List a volume's snapshots.
    List { volume: String },
    /// Delete a snapshot and wait until every replica has dropped it.
    Delete {
        volume: String,
        snapshot: String,
        /// Return once the manager has marked it for deletion.
        #[arg(long)]
        no_wait: bool,
    },
    /// Roll a detached volume back to one of its snapshots (snapshots taken later stay).
    Restore { volume: String, snapshot: String },
}

/// A clone's source: a volume, and optionally one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    volume: String,
    snapshot: Option<String>,
}

/// `VOLUME` or `VOLUME@SNAPSHOT`, both parts non-empty, at most one `@`.
fn parse_source(s: &str) -> Result<Source, String> {
    let mut parts = s.split('@');
    let volume = parts.next().unwrap_or_default();
    let snapshot = parts.next();
    if volume.is_empty() || snapshot == Some("") || parts.next().is_some() {
        return Err(format!("{s:?} is not VOLUME or VOLUME@SNAPSHOT"));
    }
    Ok(Source {
        volume: volume.to_string(),
        snapshot: snapshot.map(str::to_string),
    })
}

/// How often `snapshot create|delete` look at the snapshot's state.
const POLL: Duration = Duration::from_millis(100);
/// How long `snapshot delete` waits for the replicas to drop the snapshot.
const DELETE_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-volume I/O limits, enforced by the gateway serving the volume; 0 = unlimited.
#[derive(Args, Debug, Clone, Default)]
struct QosArgs {
    /// Read commands per second.
    #[arg(long)]
    read_iops: Option<u64>,
    /// Write commands per second.
    #[arg(long)]
    write_iops: Option<u64>,
    /// Read bandwidth per second, e.g. 100MiB.
    #[arg(long, value_parser = parse_size)]
    read_bps: Option<u64>,
    /// Write bandwidth per second, e.g. 50MiB.
    #[arg(long, value_parser = parse_size)]
    write_bps: Option<u64>,
    /// How much an idle volume may run ahead of its rates, as time at the rate, e.g. 2s or
    /// 500ms (default 1s).
    #[arg(long, value_parser = parse_burst)]
    burst: Option<u64>,
}

impl QosArgs {
    fn given(&self) -> bool {
        self.read_iops.is_some()
            || self.write_iops.is_some()
            || self.read_bps.is_some()
            || self.write_bps.is_some()
            || self.burst.is_some()
    }

    /// These limits over `base` (the ones not given are kept).
    fn over(&self, base: Option<pb::VolumeQos>) -> pb::VolumeQos {
        let b = base.unwrap_or_default();
        pb::VolumeQos {
            read_iops: self.read_iops.unwrap_or(b.read_iops),
            write_iops: self.write_iops.unwrap_or(b.write_iops),
            read_bps: self.read_bps.unwrap_or(b.read_bps),
            write_bps: self.write_bps.unwrap_or(b.write_bps),
            burst_ms: self.burst.or(b.burst_ms),
        }
    }
}

/// A burst in milliseconds (`2s`, `500ms`, `1m`). Zero parses: the manager judges it, so that
/// every bad limit is refused the same way.
fn parse_burst(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, "s"), |i| t.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("burst {s:?} is not a number with ms, s or m"))?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        _ => return Err(format!("burst {s:?}: unit must be ms, s or m")),
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("burst {s:?} is too long"))
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: NodeCmd,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List storage nodes with their state and space (with --gateways: the registered iSCSI
    /// gateways and their portals instead).
    List {
        #[arg(long)]
        gateways: bool,
    },
    /// Move every chunk off a node, then leave it empty (for decommissioning).
    Drain { id: String },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

/// Raft group membership, run as `ironsan manager <cmd>`.
#[derive(Subcommand, Debug, Clone)]
pub enum MemberCmd {
    /// Add a manager member (it must be started with the same cluster settings).
    AddMember {
        /// The new member's Raft id (non-zero, unused).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Its member-to-member and API address, HOST:PORT.
        #[arg(long)]
        addr: String,
    },
    /// Remove a manager member from the group.
    RemoveMember {
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Hand leadership to member N (default: any up-to-date follower).
    TransferLeader {
        #[arg(long)]
        to: Option<u64>,
    },
}

fn client(conn: &Conn) -> anyhow::Result<ManagerClient> {
    Ok(ManagerClient::new(&conn.manager)?)
}

/// Turns a manager error into one readable line about `subject` (e.g. `volume "x"`).
fn explain(e: ClientError, subject: &str) -> anyhow::Error {
    let msg = e.message();
    match e.code() {
        Code::NotFound if !subject.is_empty() => anyhow!("{subject} not found"),
        Code::AlreadyExists if !subject.is_empty() => anyhow!("{subject} already exists"),
        Code::InvalidArgument => anyhow!("invalid request: {msg}"),
        Code::ResourceExhausted => anyhow!("not enough storage nodes or space: {msg}"),
        Code::FailedPrecondition if !subject.is_empty() => anyhow!("{subject}: {msg}"),
        Code::Unavailable => anyhow!("manager unavailable: {e}"),
        Code::DeadlineExceeded => anyhow!("manager did not answer in time: {msg}"),
        _ => anyhow!("{e}"),
    }
}

fn volume_ref(name: &str) -> pb::VolumeRef {
    pb::VolumeRef {
        id: 0,
        name: name.to_string(),
    }
}

fn snapshot_ref(volume: &str, name: &str) -> pb::SnapshotRef {
    pb::SnapshotRef {
        id: 0,
        volume: Some(volume_ref(volume)),
        name: name.to_string(),
    }
}

/// `snapshot "vol@snap"`, the subject of a snapshot's error lines.
fn snapshot_subject(volume: &str, name: &str) -> String {
    format!("snapshot {:?}", format!("{volume}@{name}"))
}

/// The volume's snapshot called `name`, if it has one.
async fn find_snapshot(
    c: &ManagerClient,
    volume: &str,
    name: &str,
) -> anyhow::Result<Option<pb::Snapshot>> {
    let list = c
        .list_snapshots(pb::ListSnapshotsRequest {
            volume: Some(volume_ref(volume)),
            id: 0,
        })
        .await
        .map_err(|e| explain(e, &format!("volume {volume:?}")))?;
    Ok(list.snapshots.into_iter().find(|s| s.name == name))
}

/// Polls the snapshot every [`POLL`] until `done` holds for what is found (None: no such
/// snapshot); answers the last sight, or Err(it) when `timeout` passed first.
async fn poll_snapshot(
    c: &ManagerClient,
    volume: &str,
    name: &str,
    timeout: Duration,
    done: impl Fn(Option<&pb::Snapshot>) -> bool,
) -> anyhow::Result<Result<Option<pb::Snapshot>, Option<pb::Snapshot>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = find_snapshot(c, volume, name).await?;
        if done(seen.as_ref()) {
            return Ok(Ok(seen));
        }
        if Instant::now() >= deadline {
            return Ok(Err(seen));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn is_state(s: &pb::Snapshot, state: pb::SnapshotState) -> bool {
    s.state == state as i32
}

async fn run_snapshot(c: &ManagerClient, cmd: SnapshotCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            snapshot,
            no_wait,
            timeout,
        } => {
            let subject = snapshot_subject(&volume, &snapshot);
            let started = Instant::now();
            let s = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    volume: Some(volume_ref(&volume)),
                    name: snapshot.clone(),
                })
                .await
                .map_err(|e| match e.code() {
                    // The only thing a snapshot request can miss is its volume.
                    Code::NotFound => explain(e, &format!("volume {volume:?}")),
                    _ => explain(e, &subject),
                })?;
            let s = if no_wait {
                s
            } else {
                let waited = poll_snapshot(c, &volume, &snapshot, timeout, |s| {
                    s.is_none_or(|s| !is_state(s, pb::SnapshotState::SnapshotCreating))
                })
                .await?;
                match waited {
                    Ok(Some(s)) => s,
                    Ok(None) => return Err(anyhow!("{subject} was deleted while being taken")),
                    Err(_) => {
                        return Err(anyhow!(
                            "{subject} is still being taken after {timeout:?} (it stays requested; \
                             `ironsan volume snapshot list {volume}` shows when it is ready)"
                        ))
                    }
                }
            };
            if is_state(&s, pb::SnapshotState::SnapshotFailed) {
                return Err(anyhow!("{subject} failed: {}", s.error));
            }
            if json {
                println!("{:#}", snapshot_json(&s));
            } else if no_wait {
                println!(
                    "snapshot {volume}@{snapshot} requested ({})",
                    snapshot_state(s.state)
                );
            } else {
                println!(
                    "snapshot {volume}@{snapshot} ready in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        SnapshotCmd::List { volume } => {
            let snaps = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    volume: Some(volume_ref(&volume)),
                    id: 0,
                })
                .await
                .map_err(|e| explain(e, &format!("volume {volume:?}")))?
                .snapshots;
            if json {
                let list: Vec<Value> = snaps.iter().map(snapshot_json).collect();
                println!("{:#}", json!({ "snapshots": list }));
            } else {
                print!("{}", snapshots_table(&snaps));
            }
        }
        SnapshotCmd::Delete {
            volume,
            snapshot,
            no_wait,
        } => {
            let subject = snapshot_subject(&volume, &snapshot);
            c.delete_snapshot(snapshot_ref(&volume, &snapshot))
                .await
                .map_err(|e| explain(e, &subject))?;
            if !no_wait {
                let waited =
                    poll_snapshot(c, &volume, &snapshot, DELETE_TIMEOUT, |s| s.is_none()).await?;
                if waited.is_err() {
                    return Err(anyhow!(
                        "{subject} is still being deleted after {DELETE_TIMEOUT:?} (the replicas drop it in the background)"
                    ));
                }
            }
            let word = if no_wait {
                "marked for deletion"
            } else {
                "deleted"
            };
            if json {
                println!(
                    "{:#}",
                    json!({ "volume": volume, "name": snapshot, "deleted": !no_wait })
                );
            } else {
                println!("snapshot {volume}@{snapshot} {word}");
            }
        }
        SnapshotCmd::Restore { volume, snapshot } => {
            let v = c
                .restore_snapshot(pb::RestoreSnapshotRequest {
                    snapshot: Some(snapshot_ref(&volume, &snapshot)),
                })
                .await
                .map_err(|e| explain(e, &snapshot_subject(&volume, &snapshot)))?;
            if json {
                println!("{:#}", volume_json(&v));
            } else {
                println!(
                    "volume {volume:?} restored to snapshot {snapshot:?} (chunks are refilled before their next I/O)"
                );
            }
        }
    }
    Ok(())
}

pub async fn run_volume(args: VolumeArgs) -> anyhow::Result<()> {
    let c = client(&args.conn)?;
    let json = args.conn.json;
    match args.cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
            chunk_size,
            qos,
        } => {
            let req = pb::CreateVolumeRequest {
                name: name.clone(),
                size,
                replicas: replicas.unwrap_or(0),
                chunk_size: chunk_size.unwrap_or(0),
                qos: qos.given().then(|| qos.over(None)),
            };
            let v = c
                .create_volume(req)
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            print_volume(&v, json);
        }
        VolumeCmd::List => {
            let mut vols = c
                .list_volumes(pb::ListVolumesRequest::default())
                .await
                .map_err(|e| explain(e, ""))?
                .volumes;
            vols.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                let list: Vec<Value> = vols.iter().map(volume_json).collect();
                println!("{:#}", json!({ "volumes": list }));
            } else {
                print!("{}", volumes_table(&vols));
            }
        }
        VolumeCmd::Get { name } => {
            let v = c
                .get_volume(volume_ref(&name))
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            print_volume(&v, json);
        }
        VolumeCmd::Qos { name, qos, clear } => {
            if !clear && !qos.given() {
                return Err(anyhow!(
                    "nothing to change: name a limit (--read-iops, --write-iops, --read-bps, --write-bps, --burst) or --clear"
                ));
            }
            let subject = format!("volume {name:?}");
            let qos = if clear {
                None
            } else {
                // Read-modify-write: limits not named keep their values. Two operators
                // changing different limits of one volume at once may lose one change.
                let v = c
                    .get_volume(volume_ref(&name))
                    .await
                    .map_err(|e| explain(e, &subject))?;
                Some(qos.over(v.qos))
            };
            let req = pb::SetVolumeQosRequest {
                volume: Some(volume_ref(&name)),
                qos,
            };
            let v = c
                .set_volume_qos(req)
                .await
                .map_err(|e| explain(e, &subject))?;
            print_volume(&v, json);
        }
        VolumeCmd::Resize { name, size } => {
            let req = pb::ResizeVolumeRequest {
                volume: Some(volume_ref(&name)),
                size,
            };
            let v = c
                .resize_volume(req)
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            print_volume(&v, json);
        }
        VolumeCmd::Attach { name, node, lease } => {
            let req = pb::AttachRequest {
                volume: Some(volume_ref(&name)),
                gateway: node.clone(),
                lease_ms: lease.map_or(0, |d| d.as_millis() as u64),
                // The gateway's own attach, when it opens the volume, records its portal.
                portal: String::new(),
            };
            let a = c
                .attach(req)
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            if json {
                println!(
                    "{:#}",
                    json!({ "name": name, "gateway": a.gateway, "writer_epoch": a.writer_epoch, "lease_ms": a.lease_ms, "portal": a.portal })
                );
            } else {
                println!(
                    "volume {name:?} attached to gateway {:?} (writer epoch {})",
                    a.gateway, a.writer_epoch
                );
            }
        }
        VolumeCmd::Detach { name, node } => {
            let req = pb::DetachRequest {
                volume: Some(volume_ref(&name)),
                force: node.is_none(),
                gateway: node.unwrap_or_default(),
            };
            c.detach(req)
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            if json {
                println!("{:#}", json!({ "name": name, "detached": true }));
            } else {
                println!("volume {name:?} detached");
            }
        }
        VolumeCmd::Snapshot { cmd } => run_snapshot(&c, cmd, json).await?,
        VolumeCmd::Clone {
            name,
            from,
            size,
            replicas,
            qos,
        } => {
            let req = pb::CloneVolumeRequest {
                name: name.clone(),
                source: Some(volume_ref(&from.volume)),
                snapshot: from.snapshot.clone().unwrap_or_default(),
                size: size.unwrap_or(0),
                replicas: replicas.unwrap_or(0),
                qos: qos.given().then(|| qos.over(None)),
            };
            let v = c.clone_volume(req).await.map_err(|e| {
                // NOT_FOUND is about the source; anything else about the new volume.
                let subject = match (e.code(), &from.snapshot) {
                    (Code::NotFound, Some(snap)) => snapshot_subject(&from.volume, snap),
                    (Code::NotFound, None) => format!("volume {:?}", from.volume),
                    _ => format!("volume {name:?}"),
                };
                explain(e, &subject)
            })?;
            print_volume(&v, json);
        }
        VolumeCmd::Delete { name } => {
            let req = pb::DeleteVolumeRequest {
                volume: Some(volume_ref(&name)),
            };
            c.delete_volume(req)
                .await
                .map_err(|e| explain(e, &format!("volume {name:?}")))?;
            if json {
                println!("{:#}", json!({ "name": name, "deleted": true }));
            } else {
                println!("volume {name:?} deleted");
            }
        }
    }
    Ok(())
}

pub async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let c = client(&args.conn)?;
    let json = args.conn.json;
    match args.cmd {
        NodeCmd::List { gateways: true } => {
            let list = c
                .list_gateways(pb::ListGatewaysRequest {})
                .await
                .map_err(|e| explain(e, ""))?
                .gateways;
            if json {
                let list: Vec<Value> = list
                    .iter()
                    .map(|g| json!({ "id": g.id, "portal": g.portal, "registered_ms": g.registered_ms }))
                    .collect();
                println!("{:#}", json!({ "gateways": list }));
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|g| vec![g.id.clone(), or_dash(&g.portal)])
                    .collect();
                print!("{}", table(&["GATEWAY", "PORTAL"], &rows));
            }
        }
        NodeCmd::List { gateways: false } => {
            let mut nodes = c
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|e| explain(e, ""))?
                .nodes;
            nodes.sort_by(|a, b| a.id.cmp(&b.id));
            if json {
                let list: Vec<Value> = nodes.iter().map(node_json).collect();
                println!("{:#}", json!({ "nodes": list }));
            } else {
                print!("{}", nodes_table(&nodes));
            }
        }
        NodeCmd::Drain { id } => {
            let n = c
                .drain_node(pb::DrainNodeRequest { id: id.clone() })
                .await
                .map_err(|e| explain(e, &format!("node {id:?}")))?;
            if json {
                println!("{:#}", node_json(&n));
            } else {
                print!("{}", nodes_table(std::slice::from_ref(&n)));
            }
        }
    }
    Ok(())
}

pub async fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let c = client(&args.conn)?;
    let st = c
        .status(pb::StatusRequest {})
        .await
        .map_err(|e| explain(e, ""))?;
    if args.conn.json {
        println!("{:#}", status_json(&st));
    } else {
        print!("{}", status_text(&st));
    }
    Ok(())
}

/// Runs one member-administration command against the manager group at `manager`.
pub async fn run_member(cmd: MemberCmd, manager: &str, json: bool) -> anyhow::Result<()> {
    let c = ManagerClient::new(manager)?;
    match cmd {
        MemberCmd::AddMember { id, addr } => {
            let r = c
                .add_member(pb::AddMemberRequest {
                    id,
                    addr: addr.clone(),
                })
                .await
                .map_err(|e| explain(e, &format!("member {id}")))?;
            print_members(&r.members, json);
        }
        MemberCmd::RemoveMember { id } => {
            let r = c
                .remove_member(pb::RemoveMemberRequest { id })
                .await
                .map_err(|e| explain(e, &format!("member {id}")))?;
            print_members(&r.members, json);
        }
        MemberCmd::TransferLeader { to } => {
            let subject = to.map(|t| format!("member {t}")).unwrap_or_default();
            let st = c
                .transfer_leader(pb::TransferLeaderRequest {
                    to: to.unwrap_or(0),
                })
                .await
                .map_err(|e| explain(e, &subject))?;
            if json {
                println!("{:#}", status_json(&st));
            } else {
                print!("{}", status_text(&st));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn print_volume(v: &pb::Volume, json: bool) {
    if json {
        println!("{:#}", volume_json(v));
    } else {
        print!("{}", volume_text(v));
    }
}

fn print_members(members: &[pb::Member], json: bool) {
    if json {
        let list: Vec<Value> = members.iter().map(member_json).collect();
        println!("{:#}", json!({ "members": list }));
    } else {
        print!("{}", members_table(members));
    }
}

/// Aligned columns, two spaces apart, with a header line; no trailing spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = width[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `Label:  value` lines with the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{:<w$}  {v}\n", format!("{k}:")));
    }
    out
}

/// A byte count for people: exact (`10GiB`, as `ByteSize` prints and parses it) when it is a
/// whole number of its largest unit, else one decimal (`93.1GiB`).
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 2)) {
        unit += 1;
    }
    let div = 1u64 << (10 * (unit + 1));
    if n.is_multiple_of(div) {
        format!("{}{}", n / div, UNITS[unit])
    } else {
        format!("{:.1}{}", n as f64 / div as f64, UNITS[unit])
    }
}

/// `850ms`, `4.2s`, `3m12s`, `2h5m`; `-` for 0 (unknown).
fn ago(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        1..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn volume_state(s: i32) -> String {
    match pb::VolumeState::try_from(s) {
        Ok(pb::VolumeState::VolumeAvailable) => "available".into(),
        Ok(pb::VolumeState::VolumeDeleting) => "deleting".into(),
        Ok(pb::VolumeState::Unspecified) => "unknown".into(),
        Err(_) => format!("unknown({s})"),
    }
}

fn snapshot_state(s: i32) -> String {
    match pb::SnapshotState::try_from(s) {
        Ok(pb::SnapshotState::SnapshotCreating) => "creating".into(),
        Ok(pb::SnapshotState::SnapshotReady) => "ready".into(),
        Ok(pb::SnapshotState::SnapshotDeleting) => "deleting".into(),
        Ok(pb::SnapshotState::SnapshotFailed) => "failed".into(),
        Ok(pb::SnapshotState::Unspecified) => "unknown".into(),
        Err(_) => format!("unknown({s})"),
    }
}

/// Milliseconds since the epoch as `2026-11-25 03:30:07 UTC`; `-` for 0 (unknown).
fn utc(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, for dates after 1970).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "id": s.id,
        "volume_id": s.volume_id,
        "volume_name": s.volume_name,
        "name": s.name,
        "state": snapshot_state(s.state),
        "created_ms": s.created_ms,
        "ready_ms": s.ready_ms,
        "size": s.size,
        "error": s.error,
        "internal": s.internal,
        "dependents": s.dependents,
    })
}

/// What the table's NOTE column says: why it failed, what still copies from it.
fn snapshot_note(s: &pb::Snapshot) -> String {
    let mut notes = Vec::new();
    if !s.error.is_empty() {
        notes.push(s.error.clone());
    }
    if s.internal {
        notes.push("internal (for a clone)".to_string());
    }
    if !s.dependents.is_empty() {
        notes.push(format!(
            "{} volume(s) still copying from it",
            s.dependents.len()
        ));
    }
    notes.join("; ")
}

fn snapshots_table(snaps: &[pb::Snapshot]) -> String {
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.id.to_string(),
                snapshot_state(s.state),
                human(s.size),
                utc(s.created_ms),
                snapshot_note(s),
            ]
        })
        .collect();
    table(&["NAME", "ID", "STATE", "SIZE", "CREATED", "NOTE"], &rows)
}

/// A volume's source in one word: `vol@snap` (a restore names its own volume).
fn source_cell(src: &pb::VolumeSource) -> String {
    format!("{}@{}", src.volume_name, src.snapshot_name)
}

fn node_state(s: i32) -> String {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::NodeUp) => "up".into(),
        Ok(pb::NodeState::NodeDown) => "down".into(),
        Ok(pb::NodeState::NodeDraining) => "draining".into(),
        Ok(pb::NodeState::Unspecified) => "unknown".into(),
        Err(_) => format!("unknown({s})"),
    }
}

fn disk_state(s: i32) -> String {
    match pb::DiskState::try_from(s) {
        Ok(pb::DiskState::DiskHealthy) => "healthy".into(),
        Ok(pb::DiskState::DiskFull) => "full".into(),
        Ok(pb::DiskState::DiskFailed) => "failed".into(),
        Ok(pb::DiskState::Unspecified) => "unknown".into(),
        Err(_) => format!("unknown({s})"),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "size": v.size,
        "used_bytes": v.used_bytes,
        "replicas": v.replicas,
        "chunk_size": v.chunk_size,
        "state": volume_state(v.state),
        "created_ms": v.created_ms,
        "degraded_chunks": v.degraded_chunks,
        "attachment": v.attachment.as_ref().map(|a| json!({
            "volume_id": a.volume_id,
            "gateway": a.gateway,
            "writer_epoch": a.writer_epoch,
            "lease_expires_ms": a.lease_expires_ms,
            "lease_ms": a.lease_ms,
            "portal": a.portal,
            "readonly": a.readonly,
            "published": a.published,
        })),
        "qos": v.qos.as_ref().map(|q| json!({
            "read_iops": q.read_iops,
            "write_iops": q.write_iops,
            "read_bps": q.read_bps,
            "write_bps": q.write_bps,
            "burst_ms": q.burst_ms,
        })),
        "snapshots": v.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "source": v.source.as_ref().map(|s| json!({
            "volume_id": s.volume_id,
            "snapshot_id": s.snapshot_id,
            "chunks_left": s.chunks_left,
            "volume_name": s.volume_name,
            "snapshot_name": s.snapshot_name,
        })),
    })
}

fn volumes_table(vols: &[pb::Volume]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                human(v.size),
                human(v.used_bytes),
                v.replicas.to_string(),
                human(v.chunk_size),
                volume_state(v.state),
                v.degraded_chunks.to_string(),
                v.attachment
                    .as_ref()
                    .map_or_else(|| "-".into(), |a| or_dash(&a.gateway)),
                v.attachment
                    .as_ref()
                    .map_or_else(|| "-".into(), |a| or_dash(&a.portal)),
                v.attachment
                    .as_ref()
                    .map_or_else(|| "-".into(), published_cell),
                v.source.as_ref().map_or_else(|| "-".into(), source_cell),
                qos_column(v.qos.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ID",
            "SIZE",
            "USED",
            "REPLICAS",
            "CHUNK",
            "STATE",
            "DEGRADED",
            "ATTACHED",
            "PORTAL",
            "PUBLISHED",
            "SOURCE",
            "QOS",
        ],
        &rows,
    )
}

/// Limits in one cell: `write 200 IOPS, read 100MiB/s, burst 2s`, or `unlimited`.
fn qos_cell(q: Option<&pb::VolumeQos>) -> String {
    let Some(q) = q else {
        return "unlimited".into();
    };
    let mut parts = Vec::new();
    for (dir, iops, bps) in [
        ("read", q.read_iops, q.read_bps),
        ("write", q.write_iops, q.write_bps),
    ] {
        if iops != 0 {
            parts.push(format!("{dir} {iops} IOPS"));
        }
        if bps != 0 {
            parts.push(format!("{dir} {}/s", human(bps)));
        }
    }
    if parts.is_empty() {
        return "unlimited".into();
    }
    if let Some(ms) = q.burst_ms {
        parts.push(if ms % 1000 == 0 {
            format!("burst {}s", ms / 1000)
        } else {
            format!("burst {ms}ms")
        });
    }
    parts.join(", ")
}

/// Limits in one word for the table: `read:100iops,write:50MiB/s,burst:2s`, or `-`.
fn qos_column(q: Option<&pb::VolumeQos>) -> String {
    let cell = qos_cell(q);
    if cell == "unlimited" {
        return "-".into();
    }
    cell.replace(" IOPS", "iops")
        .replace(", ", ",")
        .replace(' ', ":")
}

/// CSI publications in one word: `ro:n1,n2`, `rw:n1`, or `-`.
fn published_cell(a: &pb::Attachment) -> String {
    if a.published.is_empty() {
        return "-".into();
    }
    let mode = if a.readonly { "ro" } else { "rw" };
    format!("{mode}:{}", a.published.join(","))
}

fn volume_text(v: &pb::Volume) -> String {
    let mut f = vec![
        ("Name", v.name.clone()),
        ("Id", v.id.to_string()),
        ("Size", format!("{} ({} bytes)", human(v.size), v.size)),
        (
            "Used",
            format!("{} on disk, all replicas together", human(v.used_bytes)),
        ),
        ("Replicas", v.replicas.to_string()),
        ("Chunk size", human(v.chunk_size)),
        ("State", volume_state(v.state)),
        ("Degraded chunks", v.degraded_chunks.to_string()),
        ("QoS", qos_cell(v.qos.as_ref())),
    ];
    match &v.attachment {
        Some(a) if !a.gateway.is_empty() => {
            f.push(("Attached to", a.gateway.clone()));
            f.push(("Writer epoch", a.writer_epoch.to_string()));
            f.push(("Portal", or_dash(&a.portal)));
            if !a.published.is_empty() {
                let mode = if a.readonly {
                    "read-only"
                } else {
                    "read-write"
                };
                f.push((
                    "Published to",
                    format!("{} ({mode})", a.published.join(", ")),
                ));
            }
        }
        _ => f.push(("Attached to", "-".into())),
    }
    if let Some(src) = &v.source {
        let what = if src.volume_id == v.id {
            format!("restore of snapshot {}", src.snapshot_name)
        } else {
            format!("clone of {}", source_cell(src))
        };
        f.push(("Source", format!("{what}, {} chunks left", src.chunks_left)));
    }
    let ready = v
        .snapshots
        .iter()
        .filter(|s| is_state(s, pb::SnapshotState::SnapshotReady))
        .count();
    f.push((
        "Snapshots",
        format!("{} ({ready} ready)", v.snapshots.len()),
    ));
    fields(&f)
}

fn node_json(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "zone": n.zone,
        "state": node_state(n.state),
        "capacity": n.capacity,
        "free": n.free,
        "allocated": n.allocated,
        "chunks": n.chunks,
        "last_seen_ms_ago": n.last_seen_ms_ago,
        "disks": n.disks.iter().map(|d| json!({
            "path": d.path,
            "state": disk_state(d.state),
            "capacity": d.capacity,
            "free": d.free,
        })).collect::<Vec<_>>(),
    })
}

fn nodes_table(nodes: &[pb::Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                or_dash(&n.addr),
                or_dash(&n.zone),
                node_state(n.state),
                human(n.capacity),
                human(n.free),
                human(n.allocated),
                n.chunks.to_string(),
                ago(n.last_seen_ms_ago),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ADDR",
            "ZONE",
            "STATE",
            "CAPACITY",
            "FREE",
            "ALLOCATED",
            "CHUNKS",
            "LAST SEEN",
        ],
        &rows,
    )
}

fn member_json(m: &pb::Member) -> Value {
    json!({
        "id": m.id,
        "addr": m.addr,
        "leader": m.leader,
        "voter": m.voter,
        "matched": m.matched,
    })
}

fn members_table(members: &[pb::Member]) -> String {
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.id);
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let role = if m.leader {
                "leader"
            } else if m.voter {
                "follower"
            } else {
                "learner"
            };
            vec![
                m.id.to_string(),
                or_dash(&m.addr),
                role.to_string(),
                m.matched.to_string(),
            ]
        })
        .collect();
    table(&["MEMBER", "ADDR", "ROLE", "MATCHED"], &rows)
}

fn status_json(s: &pb::ClusterStatus) -> Value {
    json!({
        "answered_by": s.answered_by,
        "leader": s.leader,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
        "nodes_up": s.nodes_up,
        "nodes_down": s.nodes_down,
        "nodes_draining": s.nodes_draining,
        "volumes": s.volumes,
        "chunks": s.chunks,
        "degraded_chunks": s.degraded_chunks,
        "recovery_tasks": s.recovery_tasks,
        "recovery_bytes_copied": s.recovery_bytes_copied,
        "recovery_bytes_total": s.recovery_bytes_total,
        "provisioned_bytes": s.provisioned_bytes,
        "capacity_bytes": s.capacity_bytes,
    })
}

fn recovery_text(s: &pb::ClusterStatus) -> String {
    if s.recovery_tasks == 0 {
        return "0".into();
    }
    let pct = 100.0 * s.recovery_bytes_copied as f64 / s.recovery_bytes_total.max(1) as f64;
    format!(
        "{} ({} of {} copied, {pct:.0}%)",
        s.recovery_tasks,
        human(s.recovery_bytes_copied),
        human(s.recovery_bytes_total)
    )
}

/// Thin provisioning: size x replicas of every volume against the Up nodes' raw capacity.
fn provisioned_text(s: &pb::ClusterStatus) -> String {
    if s.capacity_bytes == 0 {
        return format!("{} (no capacity up)", human(s.provisioned_bytes));
    }
    format!(
        "{} of {} raw ({:.2}x)",
        human(s.provisioned_bytes),
        human(s.capacity_bytes),
        s.provisioned_bytes as f64 / s.capacity_bytes as f64
    )
}

fn status_text(s: &pb::ClusterStatus) -> String {
    let leader = if s.leader == 0 {
        "none".to_string()
    } else {
        s.leader.to_string()
    };
    let mut out = fields(&[
        ("Leader", format!("{leader} (term {})", s.term)),
        ("Answered by", s.answered_by.to_string()),
        (
            "Raft log",
            format!(
                "commit {}, applied {}, snapshot {}",
                s.commit_index, s.applied_index, s.snapshot_index
            ),
        ),
        (
            "Nodes",
            format!(
                "{} up, {} down, {} draining",
                s.nodes_up, s.nodes_down, s.nodes_draining
            ),
        ),
        ("Volumes", s.volumes.to_string()),
        (
            "Chunks",
            format!("{} ({} degraded)", s.chunks, s.degraded_chunks),
        ),
        ("Recovery tasks", recovery_text(s)),
        ("Provisioned", provisioned_text(s)),
    ]);
    out.push('\n');
    out.push_str(&members_table(&s.members));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_without_trailing_spaces() {
        let t = table(
            &["A", "LONGER", "C"],
            &[
                vec!["xxxx".into(), "1".into(), "".into()],
                vec!["y".into(), "22".into(), "z".into()],
            ],
        );
        assert_eq!(t, "A     LONGER  C\nxxxx  1\ny     22      z\n");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(1023), "1023B");
        assert_eq!(human(10 << 30), "10GiB");
        assert_eq!(human(1536 << 20), "1.5GiB");
        assert_eq!(human(64 << 20), "64MiB");
        assert_eq!(human((100 << 30) - 1), "100.0GiB");
        assert_eq!(human(3 << 50), "3PiB");
        assert_eq!(ago(0), "-");
        assert_eq!(ago(1500), "1.5s");
        assert_eq!(ago(192_000), "3m12s");
    }

    #[test]
    fn sources_parse_strictly() {
        let src = |v: &str, s: Option<&str>| Source {
            volume: v.into(),
            snapshot: s.map(Into::into),
        };
        assert_eq!(parse_source("vol"), Ok(src("vol", None)));
        assert_eq!(parse_source("vol@s1"), Ok(src("vol", Some("s1"))));
        for bad in ["", "@", "@s", "vol@", "a@b@c"] {
            assert!(parse_source(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn members_render_roles() {
        let ms = vec![
            pb::Member {
                id: 2,
                addr: "m2:7400".into(),
                leader: false,
                matched: 40,
                voter: true,
            },
            pb::Member {
                id: 1,
                addr: "m1:7400".into(),
                leader: true,
                matched: 41,
                voter: true,
            },
            pb::Member {
                id: 4,
                addr: "m4:7400".into(),
                leader: false,
                matched: 3,
                voter: false,
            },
        ];
        assert_eq!(
            members_table(&ms),
            "MEMBER  ADDR     ROLE      MATCHED\n\
             1       m1:7400  leader    41\n\
             2       m2:7400  follower  40\n\
             4       m4:7400  learner   3\n"
        );
        let j = json!({ "members": ms.iter().map(member_json).collect::<Vec<_>>() });
        assert_eq!(j["members"][1]["leader"], true);
        assert_eq!(j["members"][2]["voter"], false);
    }

    #[test]
    fn manager_errors_read_well() {
        let e = ClientError::Status {
            member: "m1:7400".into(),
            status: tonic_status(Code::NotFound, "no volume named x"),
        };
        assert_eq!(
            explain(e, "volume \"x\"").to_string(),
            "volume \"x\" not found"
        );
        let e = ClientError::Status {
            member: "m1:7400".into(),
            status: tonic_status(Code::FailedPrecondition, "volumes cannot shrink"),
        };
        assert_eq!(
            explain(e, "volume \"x\"").to_string(),
            "volume \"x\": volumes cannot shrink"
        );
    }

    fn tonic_status(code: Code, msg: &str) -> ironsan_common::manager_client::Status {
        ironsan_common::manager_client::Status::new(code, msg)
    }
}
