//! The CSI Node service: the iSCSI initiator side of a volume on the node kubelet runs on.
//!
//! - **NodeStageVolume** logs in to the volume's target and puts it at the staging path: a
//!   filesystem mounted there (made first only when the device is blank), or, for block
//!   volumes, nothing mounted (the device is recorded). A JSON record per volume in the state
//!   directory ([`state`]) remembers how, for later calls and a restarted plugin.
//! - **NodePublishVolume** bind mounts the staging directory (or the device node, for block
//!   volumes) onto the pod's target path, read-only when asked or when the access mode only
//!   reads. **NodeUnpublishVolume** and **NodeUnstageVolume** undo that: unmount, flush,
//!   logout, forget the node record and the staging record; each is safe to repeat and safe
//!   after a crash half-way (sessions are found by IQN, mounts in the mount table).
//! - **NodeExpandVolume** rescans the disk until it reaches the requested size and grows the
//!   filesystem online (resize2fs, xfs_growfs); **NodeGetVolumeStats** reports statvfs usage
//!   (the device size for block volumes) and an abnormal condition when the path is no longer
//!   a mount of the volume's disk or its iSCSI session is not logged in.
//!
//! **Publish context** (what ControllerPublishVolume hands over): `portal` (HOST:PORT of the
//! gateway serving the volume), `iqn` (required: `iqn.2026-11.io.ironsan:<volume id>`), `lun`
//! (default 0) and `gateway` (that gateway's node id). When `gateway` is this node's id or no
//! portal is given, the node logs in to its own gateway at `--portal` instead: in Kubernetes
//! every node runs a gateway on the host network, and the address the controller knows it by is
//! not necessarily the one this node reaches it at.
//!
//! **NodeStageVolume secrets** (CHAP): `username` and `password` for one-way CHAP, plus
//! `usernameIn` and `passwordIn` (the target's credentials) for mutual CHAP. The iscsiadm
//! spellings `node.session.auth.username`, `node.session.auth.password`,
//! `node.session.auth.username_in` and `node.session.auth.password_in` are accepted too. No
//! secret is ever logged or put in an error message.
//!
//! **Filesystem type**: the capability's `fs_type`, else the volume context's `fsType` (from
//! the StorageClass), else ext4. A device that already has a filesystem is mounted as it is
//! when no type was asked for explicitly; a different filesystem than the one asked for, or a
//! partition table, is FAILED_PRECONDITION: the driver never reformats.
//!
//! **Concurrency**: calls that change a volume take its lock; a second one arriving meanwhile
//! gets ABORTED (kubelet retries), calls on different volumes run in parallel. Stats only
//! read, and take no lock. Every tool runs through [`exec`] with a deadline.

// tonic's Status is the error of every CSI call; the helpers return it as the handlers do.
#![allow(clippy::result_large_err)]

mod exec;
pub mod fs;
pub mod iscsi;
pub mod mount;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ironsan_common::manager_client::ManagerClient;
use tonic011::{Request, Response, Status};

use crate::capability::{self, Access, Capability, DEFAULT_FS_TYPE, FS_TYPES};
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{rpc, Rpc};
use crate::csi::volume_usage::Unit;
use crate::csi::*;
use crate::error::invalid;
use crate::volume::{self, CTX_FS_TYPE};
use crate::{CsiError, TOPOLOGY_NODE, TOPOLOGY_ZONE};
use iscsi::Chap;
use mount::MountTable;
use state::{Publish, StageRecord, Staged, StateDir};

/// Publish context key: HOST:PORT of the gateway serving the volume.
pub const CTX_PORTAL: &str = "portal";
/// Publish context key: the target IQN.
pub const CTX_IQN: &str = "iqn";
/// Publish context key: the LUN (always "0" today).
pub const CTX_LUN: &str = "lun";
/// Publish context key: the node id of the gateway serving the volume.
pub const CTX_GATEWAY: &str = "gateway";

/// The portal port when a portal names none.
const ISCSI_PORT: u16 = 3260;
/// How long NodeExpandVolume waits for the disk to show the grown size.
const EXPAND_WAIT: Duration = Duration::from_secs(30);
/// The largest LUN the SCSI layer addresses with flat addressing.
const MAX_LUN: u32 = 16383;
/// CHAP names and secrets longer than this are refused (iscsid's own limit is 256).
const MAX_CHAP_LEN: usize = 255;

/// The node plugin's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id: the Kubernetes node name, and the id of the gateway running here.
    pub node_id: String,
    /// The node's zone, reported as topology when set.
    pub zone: Option<String>,
    /// The portal of the gateway on this node.
    pub portal: String,
    /// Where per-volume staging records are kept across restarts.
    pub state_dir: PathBuf,
    /// Reported as max_volumes_per_node (0: no limit).
    pub max_volumes: i64,
}

/// Why a node operation failed; turned into a gRPC status by [`NodeError::status`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("`{cmd}` exited with status {code}: {output}")]
    Command {
        cmd: String,
        code: i32,
        output: String,
    },
    #[error("`{cmd}` did not finish within {secs}s")]
    Timeout { cmd: String, secs: u64 },
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The target or the disk is not there (yet): worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The target refused our CHAP credentials.
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// The status for this error, prefixed with what was being done.
    pub fn status(&self, what: &str) -> Status {
        let msg = format!("{what}: {self}");
        match self {
            NodeError::Unavailable(_) => Status::unavailable(msg),
            NodeError::Auth(_) => Status::permission_denied(msg),
            NodeError::Timeout { .. } => Status::deadline_exceeded(msg),
            _ => Status::internal(msg),
        }
    }
}

/// `map_err` helper: a [`NodeError`] as a status saying what was being done.
fn st(what: &str) -> impl FnOnce(NodeError) -> Status + '_ {
    move |e| e.status(what)
}

pub struct NodeService {
    cfg: NodeConfig,
    state: StateDir,
    /// Volumes with a call in progress.
    busy: Mutex<HashSet<String>>,
}

/// Held while a call works on a volume; frees it on drop.
struct VolumeGuard<'a> {
    busy: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for VolumeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&self.id);
        }
    }
}

impl NodeService {
    pub async fn new(cfg: NodeConfig, _manager: Option<ManagerClient>) -> Result<Self, CsiError> {
        let state = StateDir::new(cfg.state_dir.clone());
        state
            .create()
            .map_err(|e| CsiError::Config(format!("--state-dir: {e}")))?;
        // The portal must be usable before the first stage, not fail it.
        normalize_portal(&cfg.portal).map_err(|e| CsiError::Config(format!("--portal: {e}")))?;
        Ok(NodeService {
            cfg,
            state,
            busy: Mutex::new(HashSet::new()),
        })
    }

    fn lock(&self, volume_id: &str) -> Result<VolumeGuard<'_>, Status> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| Status::internal("volume lock table poisoned"))?;
        if !busy.insert(volume_id.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume {volume_id} is already in progress"
            )));
        }
        Ok(VolumeGuard {
            busy: &self.busy,
            id: volume_id.to_string(),
        })
    }

    async fn load(&self, volume_id: &str) -> Result<Option<StageRecord>, Status> {
        self.state
            .load(volume_id)
            .await
            .map_err(st("read the staging record"))
    }

    /// The portal to log in to for this publish context (see the module doc).
    fn portal_for(&self, ctx: &HashMap<String, String>) -> Result<String, Status> {
        let given = ctx.get(CTX_PORTAL).map(|p| p.trim()).unwrap_or("");
        let own = ctx.get(CTX_GATEWAY).map(|g| g.trim()) == Some(self.cfg.node_id.as_str());
        let portal = if given.is_empty() || own {
            self.cfg.portal.as_str()
        } else {
            given
        };
        normalize_portal(portal).map_err(|e| invalid(format!("publish_context portal: {e}")))
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = abs_path(&req.staging_target_path, "staging_target_path")?;
        let cap = checked_cap(req.volume_capability.as_ref())?;
        let iqn = req
            .publish_context
            .get(CTX_IQN)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                invalid("publish_context has no iqn (is the volume published to this node by ControllerPublishVolume?)")
            })?;
        if !volume::valid_volume_id(volume_id) {
            return Err(Status::not_found(format!(
                "{volume_id:?} cannot be an IronSAN volume id"
            )));
        }
        if iqn != volume::iqn(volume_id) {
            return Err(invalid(format!(
                "publish_context iqn {iqn:?} is not volume {volume_id}'s ({})",
                volume::iqn(volume_id)
            )));
        }
        let lun = lun_of(&req.publish_context)?;
        let portal = self.portal_for(&req.publish_context)?;
        let chap = chap_from(&req.secrets)?;
        let (want, explicit) = match &cap.access {
            Access::Block => (Staged::Block, false),
            Access::Mount { fs_type, flags } => {
                let (fs_type, explicit) = fs_type_for(fs_type, &req.volume_context)?;
                (
                    Staged::Filesystem {
                        fs_type,
                        flags: flags.clone(),
                    },
                    explicit,
                )
            }
        };
        let read_only = !cap.writable();

        let _guard = self.lock(volume_id)?;
        let old = self.load(volume_id).await?;
        if let Some(rec) = &old {
            if rec.staging_path != staging {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is already staged on this node at {}; unstage it there first",
                    rec.staging_path.display()
                )));
            }
            if let Some(why) = incompatible(rec, &want, explicit, read_only) {
                return Err(Status::already_exists(format!(
                    "volume {volume_id} is already staged at {} {why}",
                    staging.display()
                )));
            }
        }

        // Log in unless a session exists (the earlier call, or a restarted plugin's).
        let portal = match iscsi::sessions_for(iqn)
            .await
            .map_err(st("list iSCSI sessions"))?
            .into_iter()
            .next()
        {
            Some(s) => s.portal,
            None => {
                iscsi::wait_listed(&portal, iqn, iscsi::DISCOVERY_WAIT)
                    .await
                    .map_err(st("discovery"))?;
                iscsi::setup_node(&portal, iqn, chap.as_ref())
                    .await
                    .map_err(st("iSCSI node record"))?;
                iscsi::login(&portal, iqn)
                    .await
                    .map_err(st("iSCSI login"))?;
                tracing::info!(volume = volume_id, %portal, %iqn, "logged in");
                portal
            }
        };
        let device = iscsi::wait_device(iqn, lun, &portal, iscsi::DEVICE_WAIT)
            .await
            .map_err(st("wait for the disk"))?;
        if read_only {
            fs::set_read_only(&device)
                .await
                .map_err(st("make the device read-only"))?;
        }

        // The filesystem actually staged (an existing one may differ from the default).
        let staged = match want {
            Staged::Block => Staged::Block,
            Staged::Filesystem { fs_type, flags } => {
                let fs_type = self
                    .mount_staging(
                        volume_id, &device, &staging, &fs_type, explicit, &flags, read_only,
                    )
                    .await?;
                Staged::Filesystem { fs_type, flags }
            }
        };
        let rec = StageRecord {
            version: state::VERSION,
            volume_id: volume_id.to_string(),
            portal,
            iqn: iqn.to_string(),
            lun,
            device: device.clone(),
            staging_path: staging.clone(),
            staged,
            access_mode: cap.mode.as_str_name().to_string(),
            read_only,
            publishes: old.map(|o| o.publishes).unwrap_or_default(),
        };
        self.state
            .save(&rec)
            .await
            .map_err(st("write the staging record"))?;
        tracing::info!(volume = volume_id, device = %device.display(), staging = %staging.display(), staged = ?rec.staged, "staged");
        Ok(())
    }

    /// Mounts the device's filesystem at `staging` (making one on a blank device); returns the
    /// filesystem type mounted.
    #[allow(clippy::too_many_arguments)]
    async fn mount_staging(
        &self,
        volume_id: &str,
        device: &Path,
        staging: &Path,
        fs_type: &str,
        explicit: bool,
        flags: &[String],
        read_only: bool,
    ) -> Result<String, Status> {
        create_dir(staging).await?;
        let dev = fs::device_number(device)
            .await
            .map_err(st("inspect the disk"))?;
        let table = MountTable::read()
            .await
            .map_err(st("read the mount table"))?;
        if let Some(m) = table.top(staging).await {
            if (m.major, m.minor) != dev {
                return Err(Status::failed_precondition(format!(
                    "{} is already a mount of {} ({}), not of volume {volume_id}'s disk {}",
                    staging.display(),
                    m.source,
                    m.fs_type,
                    device.display()
                )));
            }
            return Ok(m.fs_type.clone());
        }
        let fs_type = match fs::probe(device).await.map_err(st("probe the disk"))? {
            fs::Probe::Blank if read_only => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} has no filesystem and its access mode is read-only: nothing to mount"
                )))
            }
            fs::Probe::Blank => {
                fs::mkfs(device, fs_type)
                    .await
                    .map_err(st("make the filesystem"))?;
                tracing::info!(volume = volume_id, device = %device.display(), fs_type, "made a filesystem on the blank volume");
                fs_type.to_string()
            }
            fs::Probe::Signature(found) if found == fs_type => found,
            fs::Probe::Signature(found) if !explicit && FS_TYPES.contains(&found.as_str()) => found,
            fs::Probe::Signature(found) => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} already holds a {found} filesystem (or signature), not {fs_type}; it is never reformatted"
                )))
            }
            fs::Probe::PartitionTable(pt) => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} holds a {pt} partition table; it is never reformatted"
                )))
            }
        };
        let mut options = flags.to_vec();
        if read_only {
            options.push("ro".to_string());
        }
        mount::mount(device, staging, &fs_type, &options)
            .await
            .map_err(st("mount the filesystem"))?;
        Ok(fs_type)
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<(), Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = abs_path(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.lock(volume_id)?;
        let rec = match self.state.load(volume_id).await {
            Ok(r) => r,
            // A record that cannot be read must not keep the volume logged in forever.
            Err(e) => {
                tracing::warn!(volume = volume_id, error = %e, "unreadable staging record; unstaging by IQN");
                None
            }
        };
        if let Some(rec) = &rec {
            if rec.staging_path != staging {
                tracing::info!(volume = volume_id, staging = %staging.display(), staged_at = %rec.staging_path.display(), "not staged at this path; nothing to do");
                return Ok(());
            }
        }
        let (iqn, lun, portal) = match &rec {
            Some(r) => (r.iqn.clone(), r.lun, r.portal.clone()),
            None if volume::valid_volume_id(volume_id) => {
                (volume::iqn(volume_id), 0, self.cfg.portal.clone())
            }
            None => return Ok(()),
        };
        let device = iscsi::find_device(&iqn, lun, &portal).await;
        let table = MountTable::read()
            .await
            .map_err(st("read the mount table"))?;
        if let Some(dev) = &device {
            let num = fs::device_number(dev)
                .await
                .map_err(st("inspect the disk"))?;
            let staging_real = mount::resolve(&staging).await;
            let mut users: Vec<PathBuf> = table
                .entries()
                .iter()
                .filter(|m| (m.major, m.minor) == num && m.mount_point != staging_real)
                .map(|m| m.mount_point.clone())
                .collect();
            for p in rec.iter().flat_map(|r| &r.publishes) {
                if table.top(&p.target_path).await.is_some()
                    && fs::block_node_at(&p.target_path).await.ok().flatten() == Some(num)
                {
                    users.push(p.target_path.clone());
                }
            }
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is still in use at {}; unpublish it first",
                    users
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        mount::unmount(&staging)
            .await
            .map_err(st("unmount the staging path"))?;
        if let Some(dev) = &device {
            fs::flush(dev).await.map_err(st("flush the disk"))?;
        }
        for s in iscsi::sessions_for(&iqn)
            .await
            .map_err(st("list iSCSI sessions"))?
        {
            iscsi::logout(s.sid).await.map_err(st("iSCSI logout"))?;
            tracing::info!(volume = volume_id, portal = %s.portal, sid = s.sid, "logged out");
        }
        iscsi::delete_records(&iqn)
            .await
            .map_err(st("delete the iSCSI node record"))?;
        self.state
            .remove(volume_id)
            .await
            .map_err(st("remove the staging record"))?;
        tracing::info!(volume = volume_id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = abs_path(&req.target_path, "target_path")?;
        let cap = checked_cap(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: volumes are staged (NodeStageVolume) before they are published",
            ));
        }
        let staging = abs_path(&req.staging_target_path, "staging_target_path")?;
        let read_only = req.readonly || !cap.writable();

        let _guard = self.lock(volume_id)?;
        let Some(mut rec) = self.load(volume_id).await? else {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        if rec.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} is staged at {}, not {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let Some(device) = iscsi::find_device(&rec.iqn, rec.lun, &rec.portal).await else {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} is staged but its iSCSI session has no disk (session lost?); stage it again"
            )));
        };
        let num = fs::device_number(&device)
            .await
            .map_err(st("inspect the disk"))?;
        let block = rec.staged == Staged::Block;
        let table = MountTable::read()
            .await
            .map_err(st("read the mount table"))?;

        if let Some(m) = table.top(&target).await {
            let ours = if block {
                fs::block_node_at(&target).await.ok().flatten() == Some(num)
            } else {
                (m.major, m.minor) == num
            };
            if !ours {
                return Err(Status::failed_precondition(format!(
                    "{} is already a mount of something else ({} {})",
                    target.display(),
                    m.fs_type,
                    m.source
                )));
            }
            if block != matches!(cap.access, Access::Block) || m.read_only() != read_only {
                return Err(Status::already_exists(format!(
                    "volume {volume_id} is already published at {} as {}{}",
                    target.display(),
                    if block {
                        "a block device"
                    } else {
                        "a filesystem"
                    },
                    if m.read_only() {
                        ", read-only"
                    } else {
                        ", read-write"
                    }
                )));
            }
            if !rec.publishes.iter().any(|p| p.target_path == target) {
                rec.publishes.push(Publish {
                    target_path: target.clone(),
                    read_only,
                });
                self.state
                    .save(&rec)
                    .await
                    .map_err(st("write the staging record"))?;
            }
            return Ok(());
        }

        if cap.single_writer() || rec.access_mode == "SINGLE_NODE_SINGLE_WRITER" {
            for other in rec.publishes.iter().filter(|p| p.target_path != target) {
                if table.top(&other.target_path).await.is_some() {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                        other.target_path.display()
                    )));
                }
            }
        }
        match (&cap.access, &rec.staged) {
            (Access::Block, Staged::Block) => {
                create_file(&target).await?;
                mount::bind(&device, &target, read_only)
                    .await
                    .map_err(st("bind mount the device"))?;
            }
            (Access::Mount { .. }, Staged::Filesystem { .. }) => {
                if table.top(&staging).await.is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume_id}'s staging path {} is not mounted; stage it again",
                        staging.display()
                    )));
                }
                create_dir(&target).await?;
                mount::bind(&staging, &target, read_only)
                    .await
                    .map_err(st("bind mount the staging path"))?;
            }
            (Access::Block, _) => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is staged with a filesystem; it cannot be published as a block device"
                )))
            }
            (Access::Mount { .. }, _) => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is staged as a block device; it cannot be published as a filesystem"
                )))
            }
        }
        rec.publishes.retain(|p| p.target_path != target);
        rec.publishes.push(Publish {
            target_path: target.clone(),
            read_only,
        });
        self.state
            .save(&rec)
            .await
            .map_err(st("write the staging record"))?;
        tracing::info!(volume = volume_id, target = %target.display(), read_only, block, "published");
        Ok(())
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = abs_path(&req.target_path, "target_path")?;
        let _guard = self.lock(volume_id)?;
        mount::unmount(&target)
            .await
            .map_err(st("unmount the target path"))?;
        remove_target(&target).await?;
        if let Ok(Some(mut rec)) = self.state.load(volume_id).await {
            let before = rec.publishes.len();
            rec.publishes.retain(|p| p.target_path != target);
            if rec.publishes.len() != before {
                self.state
                    .save(&rec)
                    .await
                    .map_err(st("write the staging record"))?;
            }
        }
        tracing::info!(volume = volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    async fn stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let Some(rec) = self.load(volume_id).await? else {
            return Err(Status::not_found(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        let path = existing_path(&req.volume_path, volume_id).await?;
        let device = iscsi::find_device(&rec.iqn, rec.lun, &rec.portal).await;
        let num = match &device {
            Some(d) => fs::device_number(d).await.ok(),
            None => None,
        };
        let table = MountTable::read()
            .await
            .map_err(st("read the mount table"))?;
        let block = rec.staged == Staged::Block;
        let mounted_here = match (table.top(&path).await, num) {
            (Some(m), Some(n)) if !block => (m.major, m.minor) == n,
            (Some(_), Some(n)) => fs::block_node_at(&path).await.ok().flatten() == Some(n),
            _ => false,
        };
        let known = path == rec.staging_path || rec.publishes.iter().any(|p| p.target_path == path);
        if !known && !mounted_here {
            return Err(Status::not_found(format!(
                "volume {volume_id} is not staged or published at {}",
                path.display()
            )));
        }

        let mut problems = Vec::new();
        let states = iscsi::session_states(&rec.iqn).await;
        if states.is_empty() {
            problems.push(format!("no iSCSI session to {}", rec.iqn));
        } else if let Some(bad) = states.iter().find(|s| *s != "LOGGED_IN") {
            problems.push(format!(
                "the iSCSI session to {} is {bad}, not LOGGED_IN",
                rec.iqn
            ));
        }
        if device.is_none() {
            problems.push("the volume's disk is gone".to_string());
        }
        // For a block volume the staging path holds no mount: the device itself is the volume.
        let block_staging = block && path == rec.staging_path;
        if !mounted_here && !block_staging && device.is_some() {
            problems.push(format!(
                "{} is no longer a mount of the volume's disk {}",
                path.display(),
                device.as_deref().unwrap_or(Path::new("?")).display()
            ));
        }

        let mut usage = Vec::new();
        if block {
            if let Some(d) = &device {
                let total = fs::device_size(d).await.map_err(st("device size"))?;
                usage.push(VolumeUsage {
                    total: to_i64(total),
                    unit: Unit::Bytes as i32,
                    ..Default::default()
                });
            }
        } else {
            // The path itself when it is the volume's mount, else the staging mount, so that a
            // broken bind does not report the usage of whatever lies beneath it.
            let source = if mounted_here {
                Some(path.clone())
            } else {
                match (table.top(&rec.staging_path).await, num) {
                    (Some(m), Some(n)) if (m.major, m.minor) == n => Some(rec.staging_path.clone()),
                    _ => None,
                }
            };
            if let Some(src) = source {
                let u = fs::usage(&src).await.map_err(st("statvfs"))?;
                usage.push(VolumeUsage {
                    available: to_i64(u.bytes_available),
                    total: to_i64(u.bytes_total),
                    used: to_i64(u.bytes_used),
                    unit: Unit::Bytes as i32,
                });
                usage.push(VolumeUsage {
                    available: to_i64(u.inodes_free),
                    total: to_i64(u.inodes_total),
                    used: to_i64(u.inodes_used),
                    unit: Unit::Inodes as i32,
                });
            }
        }
        let condition = VolumeCondition {
            abnormal: !problems.is_empty(),
            message: if problems.is_empty() {
                "volume is logged in and mounted".to_string()
            } else {
                problems.join("; ")
            },
        };
        if condition.abnormal {
            tracing::warn!(volume = volume_id, path = %path.display(), problem = %condition.message, "volume condition abnormal");
        }
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    async fn expand(&self, req: NodeExpandVolumeRequest) -> Result<i64, Status> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        if let Some(c) = req.volume_capability.as_ref() {
            capability::check(c).map_err(invalid)?;
        }
        let required_bytes = match &req.capacity_range {
            Some(r) if r.required_bytes < 0 || r.limit_bytes < 0 => {
                return Err(invalid("capacity range bytes must not be negative"))
            }
            Some(r) => r.required_bytes as u64,
            None => 0,
        };
        let _guard = self.lock(volume_id)?;
        let Some(rec) = self.load(volume_id).await? else {
            return Err(Status::not_found(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        existing_path(&req.volume_path, volume_id).await?;
        let Some(device) = iscsi::find_device(&rec.iqn, rec.lun, &rec.portal).await else {
            return Err(Status::unavailable(format!(
                "volume {volume_id} has no disk on this node (iSCSI session lost?)"
            )));
        };
        let start = Instant::now();
        let size = loop {
            if let Err(e) = fs::rescan(&device).await {
                tracing::warn!(volume = volume_id, error = %e, "rescan of the disk failed");
            }
            let size = fs::device_size(&device).await.map_err(st("device size"))?;
            if size >= required_bytes {
                break size;
            }
            if start.elapsed() >= EXPAND_WAIT {
                return Err(Status::unavailable(format!(
                    "volume {volume_id}'s disk is {size} bytes after {}s of rescans, below the {required_bytes} asked for (was the volume expanded?)",
                    EXPAND_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        if let Staged::Filesystem { fs_type, .. } = &rec.staged {
            fs::grow(fs_type, &device, &rec.staging_path)
                .await
                .map_err(st("grow the filesystem"))?;
        }
        tracing::info!(volume = volume_id, device = %device.display(), size, "expanded");
        Ok(to_i64(size))
    }
}

/// Logs one call's outcome.
fn logged<T>(op: &str, volume: &str, start: Instant, r: Result<T, Status>) -> Result<T, Status> {
    let ms = start.elapsed().as_millis() as u64;
    match &r {
        Ok(_) => tracing::info!(volume, ms, "{op} succeeded"),
        Err(s) => {
            tracing::warn!(volume, ms, code = ?s.code(), error = s.message(), "{op} failed")
        }
    }
    r
}

#[tonic011::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::info!(volume = %vol, staging = %req.staging_target_path, "NodeStageVolume");
        logged("NodeStageVolume", &vol, t, self.stage(req).await)?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::info!(volume = %vol, staging = %req.staging_target_path, "NodeUnstageVolume");
        logged("NodeUnstageVolume", &vol, t, self.unstage(req).await)?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::info!(volume = %vol, target = %req.target_path, readonly = req.readonly, "NodePublishVolume");
        logged("NodePublishVolume", &vol, t, self.publish(req).await)?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::info!(volume = %vol, target = %req.target_path, "NodeUnpublishVolume");
        logged("NodeUnpublishVolume", &vol, t, self.unpublish(req).await)?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::debug!(volume = %vol, path = %req.volume_path, "NodeGetVolumeStats");
        let r = self.stats(req).await;
        if let Err(s) = &r {
            tracing::info!(volume = %vol, ms = t.elapsed().as_millis() as u64, code = ?s.code(), error = s.message(), "NodeGetVolumeStats failed");
        }
        Ok(Response::new(r?))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let (t, vol) = (Instant::now(), req.volume_id.clone());
        tracing::info!(volume = %vol, path = %req.volume_path, "NodeExpandVolume");
        let capacity_bytes = logged("NodeExpandVolume", &vol, t, self.expand(req).await)?;
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let mut segments = HashMap::from([(TOPOLOGY_NODE.to_string(), self.cfg.node_id.clone())]);
        if let Some(zone) = &self.cfg.zone {
            segments.insert(TOPOLOGY_ZONE.to_string(), zone.clone());
        }
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: self.cfg.max_volumes,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}

// ---- request checks ------------------------------------------------------------------------

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        return Err(invalid(format!("{what} is required")));
    }
    Ok(v)
}

fn checked_cap(cap: Option<&VolumeCapability>) -> Result<Capability, Status> {
    let cap = cap.ok_or_else(|| invalid("volume_capability is required"))?;
    capability::check(cap).map_err(invalid)
}

/// A path from a request: present, absolute, no NUL, no `..` (kubelet's paths have none, and
/// a path that climbs out of where it claims to be is never one to mount on).
fn check_path(p: &str) -> Result<PathBuf, String> {
    if p.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if p.len() > 4096 {
        return Err("is longer than PATH_MAX".into());
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(format!("{p:?} is not absolute"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{p:?} contains '..'"));
    }
    // Components, not text: "/a//b/" is "/a/b", as in the mount table.
    Ok(path.components().collect())
}

fn abs_path(p: &str, what: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(invalid(format!("{what} is required")));
    }
    check_path(p).map_err(|e| invalid(format!("{what} {e}")))
}

/// The volume path of a stats or expand call: NOT_FOUND unless it is an absolute path that
/// exists (the CSI sanity suite asks with a relative path that does not).
async fn existing_path(p: &str, volume_id: &str) -> Result<PathBuf, Status> {
    let not_found = || Status::not_found(format!("volume {volume_id} is not at {p:?}"));
    let path = check_path(p).map_err(|_| not_found())?;
    let probe = path.clone();
    let exists = tokio::task::spawn_blocking(move || std::fs::symlink_metadata(probe).is_ok())
        .await
        .unwrap_or(false);
    if !exists {
        return Err(not_found());
    }
    Ok(path)
}

fn lun_of(ctx: &HashMap<String, String>) -> Result<u32, Status> {
    match ctx.get(CTX_LUN).map(|l| l.trim()) {
        None | Some("") => Ok(0),
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|&n| n <= MAX_LUN)
            .ok_or_else(|| invalid(format!("publish_context lun {l:?} is not a LUN"))),
    }
}

/// HOST:PORT (IPv6 in brackets), the port defaulting to 3260; nothing iscsiadm could read as
/// another option or another record field.
fn normalize_portal(p: &str) -> Result<String, String> {
    let p = p.trim();
    if p.is_empty() || p.len() > 255 {
        return Err(format!("{p:?} is not HOST:PORT"));
    }
    if !p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
        || p.starts_with('-')
    {
        return Err(format!("{p:?} is not HOST:PORT"));
    }
    let (host, port) = if let Some(rest) = p.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{p:?}: unclosed '['"))?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match p.split_once(':') {
            Some((h, port)) => (h.to_string(), Some(port)),
            None => (p.to_string(), None),
        }
    };
    let port = match port {
        None => ISCSI_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("{p:?}: bad port"))?,
    };
    if host.is_empty() || host == "[]" || host.contains(':') && !host.starts_with('[') {
        return Err(format!("{p:?} is not HOST:PORT"));
    }
    Ok(format!("{host}:{port}"))
}

/// The filesystem to stage with, and whether it was asked for explicitly.
fn fs_type_for(cap_fs: &str, ctx: &HashMap<String, String>) -> Result<(String, bool), Status> {
    if !cap_fs.is_empty() {
        return Ok((cap_fs.to_string(), true));
    }
    match ctx.get(CTX_FS_TYPE).map(|t| t.trim().to_ascii_lowercase()) {
        Some(t) if !t.is_empty() => {
            if FS_TYPES.contains(&t.as_str()) {
                Ok((t, true))
            } else {
                Err(invalid(format!(
                    "volume context {CTX_FS_TYPE} {t:?} is not supported (supported: {})",
                    FS_TYPES.join(", ")
                )))
            }
        }
        _ => Ok((DEFAULT_FS_TYPE.to_string(), false)),
    }
}

/// Why an existing staging record cannot serve a new stage request at the same path.
fn incompatible(
    rec: &StageRecord,
    want: &Staged,
    explicit: bool,
    read_only: bool,
) -> Option<String> {
    match (&rec.staged, want) {
        (Staged::Block, Staged::Block) => {}
        (
            Staged::Filesystem { fs_type, flags },
            Staged::Filesystem {
                fs_type: want_fs,
                flags: want_flags,
            },
        ) => {
            if explicit && fs_type != want_fs {
                return Some(format!("with {fs_type}, not {want_fs}"));
            }
            if flags != want_flags {
                return Some(format!("with mount flags {flags:?}, not {want_flags:?}"));
            }
        }
        (Staged::Block, _) => return Some("as a block device".into()),
        (Staged::Filesystem { .. }, _) => return Some("with a filesystem".into()),
    }
    (rec.read_only != read_only).then(|| {
        format!(
            "{} (access mode {})",
            if rec.read_only {
                "read-only"
            } else {
                "read-write"
            },
            rec.access_mode
        )
    })
}

/// CHAP settings from the NodeStageVolume secrets (keys in the module doc).
fn chap_from(secrets: &HashMap<String, String>) -> Result<Option<Chap>, Status> {
    let get = |keys: &[&str]| -> Result<Option<String>, Status> {
        let Some(v) = keys.iter().find_map(|k| secrets.get(*k)) else {
            return Ok(None);
        };
        // iscsiadm stores `name = value` lines: a newline would smuggle in another setting.
        if v.is_empty()
            || v.len() > MAX_CHAP_LEN
            || v.chars().any(|c| c.is_control())
            || v.trim() != v
        {
            return Err(invalid(format!(
                "secret {} must be 1-{MAX_CHAP_LEN} characters without control characters or surrounding spaces",
                keys[0]
            )));
        }
        Ok(Some(v.clone()))
    };
    let user = get(&["username", "node.session.auth.username"])?;
    let pass = get(&["password", "node.session.auth.password"])?;
    let user_in = get(&["usernameIn", "node.session.auth.username_in"])?;
    let pass_in = get(&["passwordIn", "node.session.auth.password_in"])?;
    let pair = |u: Option<String>, p: Option<String>, which: &str| match (u, p) {
        (Some(u), Some(p)) => Ok(Some((u, p))),
        (None, None) => Ok(None),
        _ => Err(invalid(format!(
            "CHAP secrets: {which} needs both a user name and a password"
        ))),
    };
    let out = pair(user, pass, "username/password")?;
    let inn = pair(user_in, pass_in, "usernameIn/passwordIn")?;
    match (out, inn) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(
            "CHAP secrets: mutual CHAP (usernameIn/passwordIn) needs username/password too",
        )),
        (Some((username, password)), inn) => Ok(Some(Chap {
            username,
            password,
            username_in: inn.as_ref().map(|(u, _)| u.clone()),
            password_in: inn.map(|(_, p)| p),
        })),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

// ---- target paths ----------------------------------------------------------------------------

async fn create_dir(p: &Path) -> Result<(), Status> {
    let path = p.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::create_dir_all(&path))
        .await
        .map_err(|e| Status::internal(format!("create {}: {e}", p.display())))?
        .map_err(|e| Status::internal(format!("create directory {}: {e}", p.display())))
}

/// The target of a block publish is a file the device node is bind mounted on.
async fn create_file(p: &Path) -> Result<(), Status> {
    let path = p.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Err(std::io::Error::other(
                "is a directory, a block volume needs a file to bind the device on",
            )),
            Ok(_) => Ok(()),
            Err(_) => std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map(drop),
        }
    })
    .await
    .map_err(|e| Status::internal(format!("create {}: {e}", p.display())))?
    .map_err(|e| Status::internal(format!("create file {}: {e}", p.display())))
}

/// Removes an unmounted target path (directory or file); gone already is fine. A directory
/// with something in it is not ours to delete.
async fn remove_target(p: &Path) -> Result<(), Status> {
    let path = p.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir(&path),
        Ok(_) => std::fs::remove_file(&path),
    })
    .await
    .map_err(|e| Status::internal(format!("remove {}: {e}", p.display())))?
    .map_err(|e| Status::internal(format!("remove target path {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(check_path("/a//b/").unwrap(), PathBuf::from("/a/b"));
        assert!(check_path("a/b").is_err());
        assert!(check_path("/a/../b").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(abs_path("", "target_path").is_err());
    }

    #[test]
    fn portals() {
        assert_eq!(normalize_portal("10.0.2.2:3261").unwrap(), "10.0.2.2:3261");
        assert_eq!(normalize_portal(" gw.local ").unwrap(), "gw.local:3260");
        assert_eq!(
            normalize_portal("[fd00::1]:3260").unwrap(),
            "[fd00::1]:3260"
        );
        assert_eq!(normalize_portal("[fd00::1]").unwrap(), "[fd00::1]:3260");
        for bad in [
            "", ":3260", "a:b", "a:0", "fd00::1", "-p:1", "a b:1", "a,1:2", "[::1", "a:1\nb",
        ] {
            assert!(normalize_portal(bad).is_err(), "{bad:?}");
        }
    }

    fn svc(node: &str) -> NodeService {
        NodeService {
            cfg: NodeConfig {
                node_id: node.into(),
                zone: None,
                portal: "127.0.0.1:3260".into(),
                state_dir: "/nonexistent".into(),
                max_volumes: 0,
            },
            state: StateDir::new("/nonexistent".into()),
            busy: Mutex::new(HashSet::new()),
        }
    }

    #[test]
    fn own_gateway_rule() {
        let s = svc("node-a");
        let ctx = |p: &str, g: &str| {
            HashMap::from([
                (CTX_PORTAL.to_string(), p.to_string()),
                (CTX_GATEWAY.to_string(), g.to_string()),
            ])
        };
        assert_eq!(
            s.portal_for(&ctx("10.1.1.1:3260", "node-a")).unwrap(),
            "127.0.0.1:3260"
        );
        assert_eq!(
            s.portal_for(&ctx("10.1.1.1:3260", "node-b")).unwrap(),
            "10.1.1.1:3260"
        );
        assert_eq!(s.portal_for(&ctx("", "node-b")).unwrap(), "127.0.0.1:3260");
        assert_eq!(s.portal_for(&HashMap::new()).unwrap(), "127.0.0.1:3260");
        assert!(s.portal_for(&ctx("bad portal", "node-b")).is_err());
    }

    #[test]
    fn volume_lock_is_exclusive_per_volume() {
        let s = svc("n");
        let a = s.lock("a").unwrap();
        assert_eq!(
            s.lock("a").err().map(|e| e.code()),
            Some(tonic011::Code::Aborted)
        );
        let _b = s.lock("b").unwrap();
        drop(a);
        assert!(s.lock("a").is_ok());
    }

    #[test]
    fn chap_secrets() {
        let m = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(chap_from(&m(&[])).unwrap(), None);
        let one = chap_from(&m(&[("username", "u"), ("password", "p")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (one.username.as_str(), one.username_in.as_deref()),
            ("u", None)
        );
        let mutual = chap_from(&m(&[
            ("node.session.auth.username", "u"),
            ("node.session.auth.password", "p"),
            ("usernameIn", "t"),
            ("passwordIn", "q"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(mutual.password_in.as_deref(), Some("q"));
        for bad in [
            m(&[("username", "u")]),
            m(&[("usernameIn", "t"), ("passwordIn", "q")]),
            m(&[
                ("username", "u"),
                ("password", "p\nnode.startup = automatic"),
            ]),
            m(&[("username", "u"), ("password", " p")]),
            m(&[("username", "u"), ("password", "p"), ("usernameIn", "t")]),
        ] {
            assert!(chap_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fs_type_choice() {
        let ctx = HashMap::from([(CTX_FS_TYPE.to_string(), "XFS".to_string())]);
        assert_eq!(fs_type_for("ext4", &ctx).unwrap(), ("ext4".into(), true));
        assert_eq!(fs_type_for("", &ctx).unwrap(), ("xfs".into(), true));
        assert_eq!(
            fs_type_for("", &HashMap::new()).unwrap(),
            ("ext4".into(), false)
        );
        let bad = HashMap::from([(CTX_FS_TYPE.to_string(), "btrfs".to_string())]);
        assert!(fs_type_for("", &bad).is_err());
    }

    #[test]
    fn stage_compatibility() {
        let rec = StageRecord {
            version: state::VERSION,
            volume_id: "v".into(),
            portal: "p:1".into(),
            iqn: volume::iqn("v"),
            lun: 0,
            device: "/dev/sdb".into(),
            staging_path: "/s".into(),
            staged: Staged::Filesystem {
                fs_type: "xfs".into(),
                flags: vec![],
            },
            access_mode: "SINGLE_NODE_WRITER".into(),
            read_only: false,
            publishes: vec![],
        };
        let fs = |t: &str| Staged::Filesystem {
            fs_type: t.into(),
            flags: vec![],
        };
        assert_eq!(incompatible(&rec, &fs("xfs"), true, false), None);
        // An implicit default does not conflict with what is on the disk.
        assert_eq!(incompatible(&rec, &fs("ext4"), false, false), None);
        assert!(incompatible(&rec, &fs("ext4"), true, false).is_some());
        assert!(incompatible(&rec, &Staged::Block, false, false).is_some());
        assert!(incompatible(&rec, &fs("xfs"), true, true).is_some());
    }

    #[test]
    fn luns() {
        let ctx = |l: &str| HashMap::from([(CTX_LUN.to_string(), l.to_string())]);
        assert_eq!(lun_of(&HashMap::new()).unwrap(), 0);
        assert_eq!(lun_of(&ctx("3")).unwrap(), 3);
        assert!(lun_of(&ctx("-1")).is_err());
        assert!(lun_of(&ctx("99999")).is_err());
    }
}
