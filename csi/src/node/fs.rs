//! The block device and the filesystem on it: what is on the device (blkid), making a
//! filesystem only on a blank device, growing it online, usage (statvfs), size, flush.
//!
//! "Blank" is decided by `blkid -p` (a low-level probe of the device itself, not a cache):
//! no filesystem, RAID or other signature and no partition table. Anything else is left
//! alone: formatting is the one operation that destroys data, so an unknown or different
//! signature is an error for the operator, never a reason to run mkfs.

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::exec::Cmd;
use super::NodeError;

const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// mkfs of a large volume under load can take a while (xfs writes its AG headers).
const MKFS_TIMEOUT: Duration = Duration::from_secs(600);
const GROW_TIMEOUT: Duration = Duration::from_secs(600);
/// blkid's exit status when it found nothing (util-linux blkid(8)).
const BLKID_NOTHING: i32 = 2;

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature and no partition table.
    Blank,
    /// A filesystem (or another superblock: swap, LVM, RAID member) of this TYPE.
    Signature(String),
    /// A partition table of this type (gpt, dos, ...).
    PartitionTable(String),
}

/// Reads `blkid -p -o export` output (KEY=value lines).
pub fn parse_blkid(out: &str) -> Probe {
    let mut ty = None;
    let mut pt = None;
    for line in out.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) if !v.is_empty() => ty = Some(v.to_string()),
            Some(("PTTYPE", v)) if !v.is_empty() => pt = Some(v.to_string()),
            _ => {}
        }
    }
    match (ty, pt) {
        (Some(t), _) => Probe::Signature(t),
        (None, Some(p)) => Probe::PartitionTable(p),
        (None, None) => Probe::Blank,
    }
}

/// Probes `device`. A device that reads as blank must also be readable: a probe that saw no
/// signature because the reads failed must not lead to mkfs.
pub async fn probe(device: &Path) -> Result<Probe, NodeError> {
    let cmd = Cmd::new("blkid", PROBE_TIMEOUT)
        .args(["-p", "-o", "export"])
        .arg(path_str(device)?);
    let out = cmd.output().await?;
    let probe = match out.code {
        0 => parse_blkid(&out.stdout),
        BLKID_NOTHING => Probe::Blank,
        // 8: ambivalent (several signatures), 4: usage or device error.
        _ => return Err(cmd.failed(&out)),
    };
    if probe == Probe::Blank {
        let dev = device.to_path_buf();
        blocking("read the device's first MiB", move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut f = std::fs::File::open(&dev)?;
            let mut got = 0;
            while got < buf.len() {
                match f.read(&mut buf[got..])? {
                    0 => break,
                    n => got += n,
                }
            }
            Ok(())
        })
        .await?;
    }
    Ok(probe)
}

/// Makes a filesystem. Discard is off: the device is blank (probed), and a discard of every
/// block of a thin volume would only cost time.
pub async fn mkfs(device: &Path, fs_type: &str) -> Result<(), NodeError> {
    let dev = path_str(device)?;
    let cmd = match fs_type {
        "ext4" => Cmd::new("mkfs.ext4", MKFS_TIMEOUT).args([
            "-F",
            "-q",
            "-m",
            "0",
            "-E",
            "nodiscard",
            dev,
        ]),
        "xfs" => Cmd::new("mkfs.xfs", MKFS_TIMEOUT).args(["-q", "-K", dev]),
        other => {
            return Err(NodeError::Internal(format!(
                "no mkfs for filesystem type {other:?}"
            )))
        }
    };
    cmd.run().await?;
    Ok(())
}

/// Grows the filesystem to the device's size, online: ext4 through the device, xfs through
/// its mount point. Both are no-ops when there is nothing to grow.
pub async fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<(), NodeError> {
    let cmd = match fs_type {
        "ext4" => Cmd::new("resize2fs", GROW_TIMEOUT).arg(path_str(device)?),
        "xfs" => Cmd::new("xfs_growfs", GROW_TIMEOUT).arg(path_str(mount_point)?),
        other => {
            return Err(NodeError::Internal(format!(
                "cannot grow filesystem type {other:?}"
            )))
        }
    };
    cmd.run().await?;
    Ok(())
}

/// Usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

pub async fn usage(path: &Path) -> Result<Usage, NodeError> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| NodeError::Internal("path has a NUL byte".into()))?;
    let what = format!("statvfs {}", path.display());
    blocking(&what, move || {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type that
        // statvfs fills completely when it returns 0.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: statvfs returned 0, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        let frsize = st.f_frsize;
        let total = st.f_blocks * frsize;
        let avail = st.f_bavail * frsize;
        let free = st.f_bfree * frsize;
        Ok(Usage {
            bytes_total: total,
            bytes_available: avail,
            bytes_used: total.saturating_sub(free),
            inodes_total: st.f_files,
            inodes_free: st.f_ffree,
            inodes_used: st.f_files.saturating_sub(st.f_ffree),
        })
    })
    .await
}

/// `/dev/sdX` → `sdX`, the device's name in /sys/class/block.
fn sys_name(device: &Path) -> Result<String, NodeError> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| NodeError::Internal(format!("{} names no device", device.display())))
}

/// The device's size in bytes as the kernel knows it now (sysfs counts 512-byte sectors
/// whatever the logical block size).
pub async fn device_size(device: &Path) -> Result<u64, NodeError> {
    let p = PathBuf::from("/sys/class/block")
        .join(sys_name(device)?)
        .join("size");
    let what = format!("read {}", p.display());
    let text = blocking(&what, move || std::fs::read_to_string(&p)).await?;
    text.trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|_| NodeError::Internal(format!("{what}: not a number: {text:?}")))
}

/// Asks the SCSI layer to read the device's capacity again (after the volume grew).
pub async fn rescan(device: &Path) -> Result<(), NodeError> {
    let p = PathBuf::from("/sys/class/block")
        .join(sys_name(device)?)
        .join("device/rescan");
    let what = format!("write {}", p.display());
    blocking(&what, move || std::fs::write(&p, b"1")).await
}

/// Writes the device's dirty buffers and flushes its cache (fsync of a block device), so a
/// logout loses nothing written without a filesystem on top.
pub async fn flush(device: &Path) -> Result<(), NodeError> {
    let dev = device.to_path_buf();
    let what = format!("flush {}", device.display());
    blocking(&what, move || std::fs::File::open(&dev)?.sync_all()).await
}

/// Marks the device read-only in the kernel (BLKROSET): for reader-only access modes, so no
/// path to the device on this node can write.
pub async fn set_read_only(device: &Path) -> Result<(), NodeError> {
    let dev = device.to_path_buf();
    let what = format!("BLKROSET {}", device.display());
    blocking(&what, move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&dev)?;
        let one: libc::c_int = 1;
        // SAFETY: BLKROSET reads one int through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKROSET, &one) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .await
}

/// `_IO(0x12, 93)` from linux/fs.h.
const BLKROSET: libc::c_ulong = 0x125d;

/// The device number (major, minor) of a block device node.
pub async fn device_number(device: &Path) -> Result<(u32, u32), NodeError> {
    let dev = device.to_path_buf();
    let what = format!("stat {}", device.display());
    let (is_block, rdev) = blocking(&what, move || {
        let m = std::fs::metadata(&dev)?;
        Ok((m.file_type().is_block_device(), m.rdev()))
    })
    .await?;
    if !is_block {
        return Err(NodeError::Internal(format!(
            "{} is not a block device",
            device.display()
        )));
    }
    Ok(split_dev(rdev))
}

/// The block device node `path` leads to (a bind-mounted device file), if it is one.
pub async fn block_node_at(path: &Path) -> Result<Option<(u32, u32)>, NodeError> {
    let p = path.to_path_buf();
    let what = format!("stat {}", path.display());
    let m = blocking(&what, move || match std::fs::metadata(&p) {
        Ok(m) => Ok(Some((m.file_type().is_block_device(), m.rdev()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
    .await?;
    Ok(m.and_then(|(blk, rdev)| blk.then(|| split_dev(rdev))))
}

/// glibc's dev_t encoding (gnu_dev_major / gnu_dev_minor).
pub fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn path_str(p: &Path) -> Result<&str, NodeError> {
    p.to_str()
        .ok_or_else(|| NodeError::Internal(format!("path {} is not UTF-8", p.display())))
}

/// Runs quick blocking file work off the async workers.
async fn blocking<T, F>(what: &str, f: F) -> Result<T, NodeError>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Internal(format!("{what}: {e}")))?
        .map_err(|e| NodeError::Io(what.to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output() {
        assert_eq!(
            parse_blkid(
                "DEVNAME=/dev/sdb\nUUID=1234\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Probe::Signature("ext4".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nPTUUID=abcd\nPTTYPE=gpt\n"),
            Probe::PartitionTable("gpt".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nTYPE=LVM2_member\nUSAGE=raid\n"),
            Probe::Signature("LVM2_member".into())
        );
        // A FAT boot sector also reads as a dos partition table: the filesystem wins.
        assert_eq!(
            parse_blkid("PTTYPE=dos\nTYPE=vfat\n"),
            Probe::Signature("vfat".into())
        );
        assert_eq!(parse_blkid(""), Probe::Blank);
        assert_eq!(parse_blkid("DEVNAME=/dev/sdb\nTYPE=\n"), Probe::Blank);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(split_dev(0x0810), (8, 16));
        assert_eq!(split_dev((259u64 << 8) | 3), (259, 3));
        // minor above 255 (sdq and later on major 65, or nvme partitions)
        let rdev = (8u64 << 8) | (0x12 & 0xff) | ((0x312u64 & !0xff) << 12);
        assert_eq!(split_dev(rdev), (8, 0x312));
    }

    #[tokio::test]
    async fn usage_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let u = usage(dir.path()).await.unwrap();
        assert!(u.bytes_total > 0 && u.bytes_total >= u.bytes_used);
        assert!(u.bytes_available <= u.bytes_total);
        assert!(usage(&dir.path().join("missing")).await.is_err());
    }
}
