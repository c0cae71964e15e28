//! Which volume capabilities IronSAN supports, checked the same way by the controller
//! (CreateVolume, ValidateVolumeCapabilities, ControllerPublishVolume) and the node.
//!
//! A volume is served by one gateway and written by one node at a time, so every single-node
//! mode is supported, and so is many nodes reading (`ReadOnlyMany`: the other nodes log in to
//! the serving gateway). Many nodes writing is refused: there is no cluster filesystem on top.

use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::{AccessMode, AccessType};
use crate::csi::VolumeCapability;

/// Filesystems the node can make, grow and mount.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];
/// The filesystem made when neither the capability nor the StorageClass names one.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// How the volume reaches the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The raw device (`volumeMode: Block`).
    Block,
    /// A filesystem: its type ("" = the volume's or the default) and extra mount flags.
    Mount { fs_type: String, flags: Vec<String> },
}

/// A supported capability, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Whether the mode lets the workload write.
    pub fn writable(&self) -> bool {
        !matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }

    /// Whether more than one node may have it published (read-only, see the module doc).
    pub fn multi_node(&self) -> bool {
        self.mode == Mode::MultiNodeReaderOnly
    }

    /// ReadWriteOncePod: one workload, so one publish target path on the node.
    pub fn single_writer(&self) -> bool {
        self.mode == Mode::SingleNodeSingleWriter
    }
}

/// Decodes and checks one capability; the error says what is unsupported.
pub fn check(cap: &VolumeCapability) -> Result<Capability, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|AccessMode { mode }| Mode::try_from(*mode))
        .ok_or("volume capability has no access mode")?
        .map_err(|_| "volume capability has an unknown access mode".to_string())?;
    match mode {
        Mode::Unknown => return Err("access mode UNKNOWN is not supported".to_string()),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(format!(
            "access mode {} is not supported: an IronSAN volume is written from one node at a time",
            mode.as_str_name()
        ))
        }
        _ => {}
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = m.fs_type.trim().to_ascii_lowercase();
            if !fs_type.is_empty() && !FS_TYPES.contains(&fs_type.as_str()) {
                return Err(format!(
                    "filesystem type {:?} is not supported (supported: {})",
                    m.fs_type,
                    FS_TYPES.join(", ")
                ));
            }
            if let Some(bad) = m.mount_flags.iter().find(|f| !valid_mount_flag(f)) {
                return Err(format!("mount flag {bad:?} is not a plain mount option"));
            }
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => return Err("volume capability has no access type (block or mount)".to_string()),
    };
    Ok(Capability { access, mode })
}

/// Checks a whole list (at least one); the first unsupported one is the error.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Capability>, String> {
    if caps.is_empty() {
        return Err("no volume capabilities given".to_string());
    }
    caps.iter().map(check).collect()
}

/// Mount options go to mount(8) as one `-o` list: commas would smuggle in more options, and
/// whitespace or control characters are never part of a real one.
fn valid_mount_flag(f: &str) -> bool {
    !f.is_empty() && f.len() <= 256 && !f.contains(',') && f.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::{BlockVolume, MountVolume};

    fn cap(mode: Mode, access: AccessType) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.to_string(),
            ..Default::default()
        })
    }

    #[test]
    fn single_node_and_read_only_many_are_supported() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::MultiNodeReaderOnly,
        ] {
            let c = check(&cap(mode, AccessType::Block(BlockVolume {}))).unwrap();
            assert_eq!(c.access, Access::Block);
            assert_eq!(c.multi_node(), mode == Mode::MultiNodeReaderOnly);
        }
        assert!(!check(&cap(Mode::MultiNodeReaderOnly, mount("xfs")))
            .unwrap()
            .writable());
        assert!(check(&cap(Mode::SingleNodeWriter, mount("EXT4")))
            .unwrap()
            .writable());
    }

    #[test]
    fn multi_node_writers_and_odd_capabilities_are_refused() {
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::Unknown,
        ] {
            assert!(check(&cap(mode, mount(""))).is_err(), "{mode:?}");
        }
        assert!(check(&cap(Mode::SingleNodeWriter, mount("btrfs"))).is_err());
        let no_type = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: None,
        };
        assert!(check(&no_type).is_err());
        let no_mode = VolumeCapability {
            access_mode: None,
            access_type: Some(mount("")),
        };
        assert!(check(&no_mode).is_err());
        let bogus_mode = VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            access_type: Some(mount("")),
        };
        assert!(check(&bogus_mode).is_err());
        let smuggled = cap(
            Mode::SingleNodeWriter,
            AccessType::Mount(MountVolume {
                mount_flags: vec!["noatime,exec".to_string()],
                ..Default::default()
            }),
        );
        assert!(check(&smuggled).is_err());
        assert!(check_all(&[]).is_err());
    }
}
