//! The mount table and mount(8)/umount(8).
//!
//! What is mounted where is always read from `/proc/self/mountinfo`, never remembered: after a
//! plugin restart, a kubelet retry or a half-finished call, the kernel's table is the truth.
//! mountinfo (unlike /proc/mounts) gives each mount's device number, which is how a mount is
//! recognised as the volume's: a filesystem on the device has its major:minor, a bind mount of
//! the device node (block volumes) is recognised by the node it leads to (`stat` of the target).
//! The table shows where a mount really is, symlinks resolved (`/var/lib/kubelet` may be a link
//! elsewhere), so paths are resolved the same way before they are looked up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::exec::Cmd;
use super::NodeError;

const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
/// A umount that keeps failing this many times (stacked mounts) is an error, not a loop.
const MAX_STACKED: usize = 8;

/// One line of /proc/self/mountinfo (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (`/` for a whole filesystem; the path
    /// inside the source for a bind mount).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountInfo {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Parses mountinfo text; lines that do not have the documented shape are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
fn parse_line(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let options = fields.next()?.split(',').map(str::to_string).collect();
    // Optional fields (shared:N, master:N, ...) up to the lone "-".
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = unescape(fields.next()?);
    let source = unescape(fields.next()?);
    Some(MountInfo {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(oct) = b.get(i + 1..i + 4) {
                if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                    let v = oct.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                    if let Ok(byte) = u8::try_from(v) {
                        out.push(byte);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount table of this process's mount namespace, read once.
#[derive(Debug, Clone)]
pub struct MountTable(Vec<MountInfo>);

impl MountTable {
    pub async fn read() -> Result<MountTable, NodeError> {
        let text = tokio::task::spawn_blocking(|| std::fs::read_to_string("/proc/self/mountinfo"))
            .await
            .map_err(|e| NodeError::Internal(format!("mountinfo reader: {e}")))?
            .map_err(|e| NodeError::Io("read /proc/self/mountinfo".into(), e))?;
        Ok(MountTable(parse_mountinfo(&text)))
    }

    pub fn entries(&self) -> &[MountInfo] {
        &self.0
    }

    /// The mount on top at `path` (its symlinks resolved first), if any.
    pub async fn top(&self, path: &Path) -> Option<&MountInfo> {
        let resolved = resolve(path).await;
        top(&self.0, &resolved)
    }
}

/// `path` with its symlinks resolved, as the kernel records mount points; a tail that does not
/// exist yet is kept as given.
pub async fn resolve(path: &Path) -> PathBuf {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut existing = p.as_path();
        let mut rest = Vec::new();
        loop {
            if let Ok(mut real) = std::fs::canonicalize(existing) {
                real.extend(rest.iter().rev());
                return real;
            }
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => return p.clone(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| path.to_path_buf())
}

/// The mounts at `path` (the last one is on top).
pub fn at<'a>(table: &'a [MountInfo], path: &Path) -> Vec<&'a MountInfo> {
    table.iter().filter(|m| m.mount_point == path).collect()
}

/// The mount on top at `path`, if any.
pub fn top<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    table.iter().rev().find(|m| m.mount_point == path)
}

/// `mount -t FSTYPE -o OPTIONS DEVICE TARGET`.
pub async fn mount(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &[String],
) -> Result<(), NodeError> {
    let mut cmd = Cmd::new("mount", MOUNT_TIMEOUT).args(["-t", fs_type]);
    if !options.is_empty() {
        cmd = cmd.args(["-o", &options.join(",")]);
    }
    cmd.arg(path_str(device)?)
        .arg(path_str(target)?)
        .run()
        .await?;
    Ok(())
}

/// Bind mounts `source` on `target`, then makes the bind read-only when asked (a bind mount
/// takes `ro` only through a remount).
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), NodeError> {
    Cmd::new("mount", MOUNT_TIMEOUT)
        .args(["-o", "bind"])
        .arg(path_str(source)?)
        .arg(path_str(target)?)
        .run()
        .await?;
    if read_only {
        if let Err(e) = Cmd::new("mount", MOUNT_TIMEOUT)
            .args(["-o", "remount,bind,ro"])
            .arg(path_str(target)?)
            .run()
            .await
        {
            // Never leave a writable bind where a read-only one was asked for.
            let _ = unmount(target).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `path`; nothing mounted there is fine.
pub async fn unmount(path: &Path) -> Result<(), NodeError> {
    let resolved = resolve(path).await;
    for _ in 0..MAX_STACKED {
        if top(MountTable::read().await?.entries(), &resolved).is_none() {
            return Ok(());
        }
        let cmd = Cmd::new("umount", MOUNT_TIMEOUT).arg(path_str(&resolved)?);
        let out = cmd.output().await?;
        if !out.success() {
            // A concurrent unmount may have won; only a mount still there is a failure.
            if top(MountTable::read().await?.entries(), &resolved).is_some() {
                return Err(cmd.failed(&out));
            }
        }
    }
    Err(NodeError::Internal(format!(
        "{} still mounted after {MAX_STACKED} unmounts",
        path.display()
    )))
}

fn path_str(p: &Path) -> Result<&str, NodeError> {
    p.to_str()
        .ok_or_else(|| NodeError::Internal(format!("path {} is not UTF-8", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime - rootfs rootfs rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=250000k,mode=755
40 22 8:16 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.ironsan.io/abc/globalmount rw,relatime shared:20 - ext4 /dev/sdb rw
41 22 8:16 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc\\0401/mount ro,relatime shared:20 master:3 - ext4 /dev/sdb rw
42 22 0:5 /sdc /var/lib/kubelet/pods/p2/volumeDevices/dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=250000k,mode=755
garbage line
43 22 x:y / /bad rw - ext4 /dev/sdd rw
";

    #[test]
    fn parses_mountinfo() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 5, "{t:#?}");
        let stage = &t[2];
        assert_eq!((stage.major, stage.minor), (8, 16));
        assert_eq!(stage.fs_type, "ext4");
        assert_eq!(stage.source, "/dev/sdb");
        assert!(!stage.read_only());
        let publish = &t[3];
        assert_eq!(
            publish.mount_point,
            Path::new("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc 1/mount")
        );
        assert!(publish.read_only());
        let block = &t[4];
        assert_eq!(block.root, "/sdc");
        assert_eq!(block.fs_type, "devtmpfs");
        assert!(top(&t, Path::new("/dev")).is_some());
        assert!(top(&t, Path::new("/bad")).is_none());
    }

    #[test]
    fn stacked_mounts_top_is_last() {
        let t = parse_mountinfo(
            "50 22 8:16 / /x rw - ext4 /dev/sdb rw\n51 50 8:32 / /x rw - xfs /dev/sdc rw\n",
        );
        assert_eq!(at(&t, Path::new("/x")).len(), 2);
        assert_eq!(top(&t, Path::new("/x")).map(|m| m.minor), Some(32));
    }

    #[tokio::test]
    async fn resolves_symlinks_like_the_mount_table() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(real.join("run")).unwrap();
        std::os::unix::fs::symlink("run", real.join("var")).unwrap();
        assert_eq!(resolve(&real.join("var")).await, real.join("run"));
        assert_eq!(
            resolve(&real.join("var/lib/kubelet/x")).await,
            real.join("run/lib/kubelet/x"),
            "the missing tail is kept"
        );
        assert_eq!(resolve(Path::new("/")).await, PathBuf::from("/"));
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("end\\"), "end\\");
        assert_eq!(unescape("\\09x"), "\\09x");
        assert_eq!(unescape("\\777"), "\\777");
    }
}
