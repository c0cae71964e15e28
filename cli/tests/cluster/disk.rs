//! A storage daemon's "disk": a sparse image file holding an ext4 filesystem, mounted on a loop
//! device with `errors=remount-ro`, so a test can turn it read-only under a running daemon.
//!
//! Why not a read-only bind mount (`mount -o remount,bind,ro`)? The kernel refuses it with
//! EBUSY while any file under it is open for writing, which a running daemon always has (chunk
//! files, RocksDB). ext4's error path does not ask: writing to
//! `/sys/fs/ext4/<dev>/trigger_fs_error` makes the filesystem fail as if the disk had reported
//! an error, and with `errors=remount-ro` it goes read-only at once (`emergency_ro`): reads go
//! on, every write fails with EROFS — a disk turned read-only under its owner. Restoring it
//! needs the daemon stopped: unmount, `e2fsck -fy`, mount again.
//!
//! Needs root, loop devices and e2fsprogs (`apt-get install -y e2fsprogs mount`).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct LoopDisk {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// `/dev/loopN`
    pub device: String,
    mounted: bool,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| {
        format!("cannot run `{cmd}` ({e}): apt-get install -y mount e2fsprogs util-linux")
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopDisk {
    /// Creates a `size`-byte image, a loop device, an ext4 filesystem, and mounts it.
    pub fn create(image: &Path, mountpoint: &Path, size: u64) -> Result<LoopDisk, String> {
        let f = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        drop(f);
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        let img = image.to_string_lossy().into_owned();
        let device = run("losetup", &["--find", "--show", &img])?;
        let mut disk = LoopDisk {
            image: image.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            device,
            mounted: false,
        };
        run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &disk.device])?;
        disk.mount()?;
        Ok(disk)
    }

    fn mount(&mut self) -> Result<(), String> {
        let mp = self.mountpoint.to_string_lossy().into_owned();
        run("mount", &["-o", "errors=remount-ro", &self.device, &mp])?;
        self.mounted = true;
        Ok(())
    }

    fn sysfs_name(&self) -> String {
        self.device.trim_start_matches("/dev/").to_string()
    }

    /// Makes the filesystem fail read-only now, under whoever has files open on it.
    pub fn make_read_only(&self) -> Result<(), String> {
        let path = format!("/sys/fs/ext4/{}/trigger_fs_error", self.sysfs_name());
        std::fs::write(&path, "1").map_err(|e| {
            format!("{path}: {e} (the kernel needs ext4's trigger_fs_error attribute)")
        })?;
        // Confirm: a write must now fail.
        let probe = self.mountpoint.join(".ro-probe");
        match std::fs::write(&probe, b"x") {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
            Err(e) => Err(format!(
                "{}: after trigger_fs_error a write failed with {e}, not EROFS",
                self.mountpoint.display()
            )),
            Ok(()) => Err(format!(
                "{} is still writable after trigger_fs_error",
                self.mountpoint.display()
            )),
        }
    }

    /// True while the filesystem is read-only.
    pub fn is_read_only(&self) -> bool {
        let probe = self.mountpoint.join(".ro-probe");
        let ro = std::fs::write(&probe, b"x").is_err();
        let _ = std::fs::remove_file(&probe);
        ro
    }

    /// Unmounts, repairs and remounts read-write. Every process using it must have exited.
    pub fn restore(&mut self) -> Result<(), String> {
        self.unmount()?;
        // The superblock may outlive the unmount for a moment (a process that just exited
        // releasing its files); until then e2fsck finds the device in use (exit 8) and
        // touches nothing.
        let mut tries = 0;
        loop {
            tries += 1;
            let out = Command::new("e2fsck")
                .args(["-fy", &self.device])
                .output()
                .map_err(|e| format!("cannot run e2fsck ({e}): apt-get install -y e2fsprogs"))?;
            match out.status.code() {
                // 1: errors corrected, the expected case after a forced read-only.
                Some(0) | Some(1) => break,
                Some(8) if tries < 50 => std::thread::sleep(std::time::Duration::from_millis(100)),
                _ => {
                    return Err(format!(
                        "e2fsck -fy {}: {}\n{}{}",
                        self.device,
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            }
        }
        self.mount()
    }

    fn unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        let mp = self.mountpoint.to_string_lossy().into_owned();
        // A daemon that just exited may still be releasing its files for a moment.
        let mut last = String::new();
        for _ in 0..50 {
            match run("umount", &[&mp]) {
                Ok(_) => {
                    self.mounted = false;
                    return Ok(());
                }
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(last)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("cleanup: {e}; lazily detaching");
            let _ = run("umount", &["-l", &self.mountpoint.to_string_lossy()]);
        }
        let _ = run("losetup", &["-d", &self.device]);
    }
}
