//! Disk faults on real filesystems: a full disk (tmpfs) and one that turns read-only under the
//! daemon (ext4 on a loop device, failed through `trigger_fs_error`). Needs root, as CI has.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use ironsan_storage::{ChunkId, DiskState, Error, IoEngine, Store, StoreConfig, WriteOpts};

const MIB: u64 = 1 << 20;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount filesystems: run them as root (CI does)"
    );
}

/// A mounted filesystem, unmounted (and its loop device detached) on drop.
struct Mount {
    dir: tempfile::TempDir,
    image: Option<PathBuf>,
}

impl Mount {
    fn tmpfs(size: &str) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size} ironsan-test {}",
            dir.path().display()
        ));
        Self { dir, image: None }
    }

    fn ext4(size_mib: u64) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let image = std::env::temp_dir().join(format!("ironsan-fault-{}.img", std::process::id()));
        sh(&format!(
            "truncate -s {size_mib}M {0} && mkfs.ext4 -q -F {0}",
            image.display()
        ));
        sh(&format!(
            "mount -o loop,errors=remount-ro {} {}",
            image.display(),
            dir.path().display()
        ));
        Self {
            dir,
            image: Some(image),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes the kernel declare an ext4 error: the filesystem turns read-only under us.
    fn fail(&self) {
        let dev = sh(&format!("findmnt -n -o SOURCE {}", self.path().display()));
        let name = dev.rsplit('/').next().unwrap_or_default().to_string();
        sh(&format!(
            "echo ironsan-test > /sys/fs/ext4/{name}/trigger_fs_error"
        ));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
        if let Some(img) = &self.image {
            let _ = std::fs::remove_file(img);
        }
    }
}

fn open(dirs: &[&Path]) -> Store {
    let cfg = StoreConfig {
        dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        io_engine: IoEngine::Auto,
        ..Default::default()
    };
    Store::open(cfg).expect("store opens")
}

fn piece(i: u64) -> Bytes {
    Bytes::from(vec![
        (i as u8).wrapping_mul(37).wrapping_add(1);
        MIB as usize
    ])
}

#[tokio::test]
async fn a_full_disk_answers_no_space_and_keeps_what_it_acknowledged() {
    let m = Mount::tmpfs("24m");
    let s = open(&[m.path()]);
    let id = ChunkId::new(10, 0);
    s.create(id, 64 * MIB, 0).await.unwrap();
    let mut acked = 0;
    let err = loop {
        match s
            .write(id, acked * MIB, piece(acked), WriteOpts::default())
            .await
        {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 64, "a 24 MiB filesystem took 64 MiB");
    };
    assert!(matches!(err, Error::NoSpace { .. }), "{err:?}");
    assert!(acked >= 4, "only {acked} MiB fit");
    assert_eq!(s.disks()[0].state, DiskState::Full);
    // Every acknowledged write reads back with a valid checksum; the failed one changed nothing.
    for i in 0..acked {
        assert_eq!(
            s.read(id, i * MIB, MIB, 0).await.unwrap().data,
            piece(i),
            "piece {i}"
        );
    }
    let r = s.read(id, acked * MIB, MIB, 0).await.unwrap();
    assert!(
        r.data.iter().all(|&b| b == 0) || r.data == piece(acked),
        "failed write left a mix"
    );
    assert!(matches!(
        s.create(ChunkId::new(10, 1), 64 * MIB, 0).await,
        Err(Error::NoSpace { .. })
    ));
    // Freeing space makes the directory take new chunks again.
    s.delete(id, 0).await.unwrap();
    s.create(ChunkId::new(10, 2), 4 * MIB, 0).await.unwrap();
    assert_eq!(s.disks()[0].state, DiskState::Healthy);
    s.shutdown().await;
}

#[tokio::test]
async fn a_failed_directory_is_reported_and_the_others_keep_serving() {
    let bad = Mount::ext4(64);
    let good = tempfile::tempdir().unwrap();
    let on_bad = ChunkId::new(11, 0);
    let data = piece(3);
    {
        let s = open(&[bad.path()]);
        s.create(on_bad, 4 * MIB, 0).await.unwrap();
        s.write(on_bad, 0, data.clone(), WriteOpts::default())
            .await
            .unwrap();
        s.shutdown().await;
    }
    let s = open(&[bad.path(), good.path()]);
    let on_good = ChunkId::new(11, 1);
    assert_eq!(s.create(on_good, 4 * MIB, 0).await.unwrap().disk, 1);
    bad.fail();
    let r = s
        .write(
            on_bad,
            MIB,
            data.clone(),
            WriteOpts {
                fua: true,
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(r, Err(Error::DiskFailed { .. } | Error::Meta { .. })),
        "{r:?}"
    );
    assert!(
        matches!(s.disks()[0].state, DiskState::Failed(_)),
        "{:?}",
        s.disks()[0].state
    );
    assert!(matches!(
        s.read(on_bad, 0, 4096, 0).await,
        Err(Error::DiskFailed { .. })
    ));
    // The healthy directory serves on, and takes the new chunks.
    s.write(on_good, 0, data.clone(), WriteOpts::default())
        .await
        .unwrap();
    assert_eq!(s.read(on_good, 0, MIB, 0).await.unwrap().data, data);
    assert_eq!(
        s.create(ChunkId::new(11, 2), 4 * MIB, 0)
            .await
            .unwrap()
            .disk,
        1
    );
    assert_eq!(s.disks()[1].state, DiskState::Healthy);
    s.shutdown().await;
}
