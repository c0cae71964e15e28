//! The per-volume staging record: `STATE_DIR/<volume id>.json`.
//!
//! Written when NodeStageVolume succeeds and removed when NodeUnstageVolume has logged out, it
//! tells later calls (and a restarted plugin) how the volume was staged: portal, IQN, LUN,
//! device, block or filesystem, staging path, access mode, and the target paths it is
//! published at. The kernel (mount table, iSCSI sessions) stays the truth about what is
//! mounted and logged in; the record says what this plugin meant to set up, so that unstage
//! and stats know what to look for. Written atomically (temporary file, fsync, rename, fsync
//! of the directory): a crash leaves the old record or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::volume::valid_volume_id;

/// Bumped when a field changes meaning; a record of another version is refused, not guessed.
pub const VERSION: u32 = 1;

/// How the volume is staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Staged {
    /// The raw device; nothing is mounted at the staging path.
    Block,
    /// A filesystem of `fs_type` mounted at the staging path with `flags`.
    Filesystem { fs_type: String, flags: Vec<String> },
}

/// One NodePublishVolume target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub target_path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub version: u32,
    pub volume_id: String,
    /// The portal logged in to (after the own-gateway rule).
    pub portal: String,
    pub iqn: String,
    pub lun: u32,
    /// The disk when staged (`/dev/sdX`); looked up again by IQN when used, since a new session
    /// may bring another name.
    pub device: PathBuf,
    pub staging_path: PathBuf,
    pub staged: Staged,
    /// The access mode's CSI name (`SINGLE_NODE_WRITER`, ...).
    pub access_mode: String,
    /// The device was made read-only (a reader-only access mode).
    pub read_only: bool,
    #[serde(default)]
    pub publishes: Vec<Publish>,
}

/// The directory holding the records.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: PathBuf) -> StateDir {
        StateDir { dir }
    }

    /// Creates the directory (mode 0700: records name devices and paths, nothing secret, but
    /// nobody else has business there).
    pub fn create(&self) -> Result<(), NodeError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| NodeError::Io(format!("create state dir {}", self.dir.display()), e))
    }

    fn path(&self, volume_id: &str) -> Option<PathBuf> {
        // The id becomes a file name: only ids that can name an IronSAN volume can have a
        // record, and those have no '/' and do not start with '.'.
        valid_volume_id(volume_id).then(|| self.dir.join(format!("{volume_id}.json")))
    }

    /// The record of `volume_id`, if there is one.
    pub async fn load(&self, volume_id: &str) -> Result<Option<StageRecord>, NodeError> {
        let Some(path) = self.path(volume_id) else {
            return Ok(None);
        };
        let id = volume_id.to_string();
        blocking(move || load_file(&path, &id)).await
    }

    pub async fn save(&self, rec: &StageRecord) -> Result<(), NodeError> {
        let path = self
            .path(&rec.volume_id)
            .ok_or_else(|| NodeError::Internal(format!("volume id {:?}", rec.volume_id)))?;
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|e| NodeError::Internal(format!("encode record: {e}")))?;
        blocking(move || write_atomic(&path, &bytes)).await
    }

    pub async fn remove(&self, volume_id: &str) -> Result<(), NodeError> {
        let Some(path) = self.path(volume_id) else {
            return Ok(());
        };
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::Io(format!("remove {}", path.display()), e)),
        })
        .await
    }
}

fn load_file(path: &Path, volume_id: &str) -> Result<Option<StageRecord>, NodeError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(NodeError::Io(format!("read {}", path.display()), e)),
    };
    let rec: StageRecord = serde_json::from_slice(&bytes).map_err(|e| {
        NodeError::Internal(format!("staging record {} is corrupt: {e}", path.display()))
    })?;
    if rec.version != VERSION || rec.volume_id != volume_id {
        return Err(NodeError::Internal(format!(
            "staging record {} is version {} of volume {:?}, expected version {VERSION} of {volume_id:?}",
            path.display(),
            rec.version,
            rec.volume_id
        )));
    }
    Ok(Some(rec))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let io = |what: &str, e| NodeError::Io(format!("{what} {}", path.display()), e);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create temporary for", e))?;
    f.write_all(bytes)
        .map_err(|e| io("write temporary for", e))?;
    f.sync_all().map_err(|e| io("fsync temporary for", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("rename temporary to", e))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), NodeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeError::Io(format!("fsync {}", dir.display()), e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Internal(format!("state dir task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> StageRecord {
        StageRecord {
            version: VERSION,
            volume_id: id.into(),
            portal: "10.0.2.2:3260".into(),
            iqn: format!("iqn.2026-11.io.ironsan:{id}"),
            lun: 0,
            device: "/dev/sdb".into(),
            staging_path: "/var/lib/kubelet/plugins/x/globalmount".into(),
            staged: Staged::Filesystem {
                fs_type: "ext4".into(),
                flags: vec!["noatime".into()],
            },
            access_mode: "SINGLE_NODE_WRITER".into(),
            read_only: false,
            publishes: vec![Publish {
                target_path: "/var/lib/kubelet/pods/p/mount".into(),
                read_only: true,
            }],
        }
    }

    #[tokio::test]
    async fn round_trip_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path().join("state"));
        st.create().unwrap();
        assert_eq!(st.load("vol1").await.unwrap(), None);
        let mut rec = record("vol1");
        st.save(&rec).await.unwrap();
        assert_eq!(st.load("vol1").await.unwrap(), Some(rec.clone()));
        rec.staged = Staged::Block;
        rec.publishes.clear();
        st.save(&rec).await.unwrap();
        assert_eq!(st.load("vol1").await.unwrap(), Some(rec));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["vol1.json"], "no temporary left behind");
        st.remove("vol1").await.unwrap();
        st.remove("vol1").await.unwrap();
        assert_eq!(st.load("vol1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn odd_ids_and_bad_records() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path().to_path_buf());
        for id in ["../etc/passwd", ".hidden", "", "UPPER", "a/b"] {
            assert_eq!(st.load(id).await.unwrap(), None, "{id:?}");
            st.remove(id).await.unwrap();
        }
        assert!(st.save(&record("Bad/Id")).await.is_err());
        std::fs::write(dir.path().join("vol2.json"), b"{not json").unwrap();
        assert!(st.load("vol2").await.is_err());
        let mut other = record("vol3");
        other.volume_id = "vol4".into();
        std::fs::write(
            dir.path().join("vol3.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert!(st.load("vol3").await.is_err(), "a record under another id");
    }

    #[test]
    fn record_format_is_stable() {
        let v = serde_json::to_value(record("vol1")).unwrap();
        assert_eq!(v["staged"]["kind"], "filesystem");
        assert_eq!(v["staged"]["fs_type"], "ext4");
        assert_eq!(v["publishes"][0]["read_only"], true);
        let block = serde_json::to_value(Staged::Block).unwrap();
        assert_eq!(block, serde_json::json!({"kind": "block"}));
    }
}
