//! The CSI node plugin for real: `ironsan csi --mode node` runs in a qemu guest with the Linux
//! kernel initiator (tests/vm/run.sh --scenario csi-node) and logs in to `ironsan dev` on this
//! host. The test drives the plugin over gRPC (guest port forwarded to 127.0.0.1) and checks
//! the results through the guest's command channel: ext4 and xfs volumes staged, published,
//! written and read back, stats, grown online; a read-only publish and a reader-only stage
//! that refuse writes; mutual CHAP from the NodeStage secrets (a wrong password refused); a
//! block volume published as a device file, written and read raw, grown;
//! every call made twice (idempotence); at the end no iSCSI session, mount or record is left.
//!
//! Fails (never skips) when qemu, the kernel image or the guest's tools cannot be had:
//! run.sh installs them as root and otherwise prints the `apt-get install` line, which this
//! test's failure message shows. One guest boot for all cases (~10-40 s under TCG).
//!
//! Volumes come from the controller plugin (`ironsan csi --mode controller` on this host, see
//! [`Provisioner`]), so each case walks the whole lifecycle: CreateVolume,
//! ControllerPublishVolume, NodeStage, NodePublish, stats, ControllerExpandVolume +
//! NodeExpandVolume, NodeUnpublish, NodeUnstage, ControllerUnpublishVolume, DeleteVolume.

#[path = "support/csi.rs"]
mod csi_support;
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use csi::node_client::NodeClient;
use csi::volume_capability::access_mode::Mode;
use csi::volume_usage::Unit;
use csi_support::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic011::transport::Channel;

/// Boot, image build and (first run) kernel download and package installation.
const VM_READY_TIMEOUT: Duration = Duration::from_secs(420);
/// One CSI call (a stage includes discovery, login and mkfs under TCG).
const CALL_TIMEOUT: Duration = Duration::from_secs(240);
/// One guest command.
const SHELL_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: i64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// `tests/vm/run.sh --scenario csi-node` running the guest.
struct Vm {
    child: Child,
    out: Arc<Mutex<String>>,
    ready: mpsc::Receiver<()>,
    csi_port: u16,
    shell_port: u16,
    finished: bool,
}

impl Vm {
    fn boot(gateway_port: u16, log_dir: &Path) -> Vm {
        let run_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vm/run.sh");
        let (csi_port, shell_port) = (free_port(), free_port());
        let mut cmd = Command::new("bash");
        cmd.arg(&run_sh)
            .args([
                "--scenario",
                "csi-node",
                "--csi-bin",
                env!("CARGO_BIN_EXE_ironsan"),
            ])
            .args(["--csi-port", &csi_port.to_string()])
            .args(["--shell-port", &shell_port.to_string()])
            .arg(gateway_port.to_string())
            .env("IRONSAN_VM_LOG_DIR", log_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: the fixture alone stops it (run.sh kills its qemu on SIGTERM).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", run_sh.display()));
        let out = Arc::new(Mutex::new(String::new()));
        let (tx, ready) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[vm] {line}");
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                    if line.contains("INFO csi-node ready") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
        }
        {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[vm] {line}");
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            });
        }
        Vm {
            child,
            out,
            ready,
            csi_port,
            shell_port,
            finished: false,
        }
    }

    fn output(&self) -> String {
        self.out.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        match self.ready.recv_timeout(VM_READY_TIMEOUT) {
            Ok(()) => {}
            // run.sh ended first: its output says why (a missing package names the
            // apt-get install line).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait();
                // The stderr reader may still be copying the last lines.
                std::thread::sleep(Duration::from_millis(300));
                panic!(
                    "the csi-node VM did not come up (tests/vm/run.sh ended first, {status:?}):\n{}",
                    self.output()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "the csi-node VM was not ready within {VM_READY_TIMEOUT:?}:\n{}",
                self.output()
            ),
        }
    }

    fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.csi_port)
    }

    /// Runs a shell script in the guest; its exit status and output (stderr included).
    async fn sh(&self, script: &str) -> (i32, String) {
        let run = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.shell_port)).await?;
            s.write_all(script.as_bytes()).await?;
            s.write_all(b"\n").await?;
            s.shutdown().await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let out = match tokio::time::timeout(SHELL_TIMEOUT, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("guest command channel: {e}\nscript: {script}"),
            Err(_) => panic!("guest command did not finish within {SHELL_TIMEOUT:?}: {script}"),
        };
        // The status line follows the output, which may not end in a newline.
        let status = out.rfind("IVM-RC=").and_then(|i| {
            let rc = out[i + "IVM-RC=".len()..].trim().parse().ok()?;
            Some((rc, out[..i].to_string()))
        });
        match status {
            Some(r) => r,
            None => panic!("guest command channel gave no status for {script:?}: {out:?}"),
        }
    }

    /// Runs a script that must succeed; `what` names it in the failure.
    async fn ok(&self, what: &str, script: &str) -> String {
        let (rc, out) = self.sh(script).await;
        if rc != 0 {
            let (_, log) = self.sh("tail -n 40 /tmp/csi.log; dmesg | tail -n 20").await;
            panic!("guest check failed: {what} (status {rc})\n--- script\n{script}\n--- output\n{out}\n--- plugin log and dmesg\n{log}");
        }
        out
    }

    /// Tells the guest the host is done, waits for run.sh and checks its verdict.
    async fn finish(mut self) {
        self.sh("touch /tmp/ivm-stop").await;
        let start = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() < Duration::from_secs(180) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                _ => panic!("run.sh did not finish after the stop:\n{}", self.output()),
            }
        };
        self.finished = true;
        // The reader threads may still be copying the last lines.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = self.output();
        assert!(
            status.success() && out.trim_end().ends_with(" passed, 0 failed"),
            "the guest's checks failed ({status}):\n{out}"
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Ask the guest to wrap up (it then reports what it saw), then make sure.
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.shell_port)) {
            let _ = s.write_all(b"touch /tmp/ivm-stop\n");
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- tests/vm/run.sh output ---\n{}", self.output());
        }
    }
}

/// The controller plugin's side of each case, on the host against the same cluster.
struct Provisioner {
    c: csi::controller_client::ControllerClient<Channel>,
    /// The dev server's portal: the gateway `dev` registered it.
    portal: String,
    _controller: CsiDriver,
}

impl Provisioner {
    /// CreateVolume { name, capacity_range: size } → the volume id (here the name).
    async fn create(&self, name: &str, mib: i64) -> String {
        let v = self
            .c
            .clone()
            .create_volume(csi::CreateVolumeRequest {
                name: name.to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: mib * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, "")],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
            .into_inner()
            .volume
            .expect("a volume");
        assert_eq!(v.capacity_bytes, mib * MIB);
        v.volume_id
    }

    /// ControllerPublishVolume { volume_id, node_id: "dev" } → its publish context: the gateway
    /// with node id `dev` serves the volume, which the node plugin (also `dev`) maps to its own
    /// --portal.
    async fn publish(&self, volume_id: &str) -> HashMap<String, String> {
        let ctx = self
            .c
            .clone()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume_id.to_string(),
                node_id: "dev".to_string(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "")),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ControllerPublishVolume {volume_id}: {s:?}"))
            .into_inner()
            .publish_context;
        assert_eq!(ctx.get("portal"), Some(&self.portal), "{ctx:?}");
        assert_eq!(ctx.get("gateway").map(String::as_str), Some("dev"));
        ctx
    }

    /// ControllerExpandVolume { volume_id, capacity_range: size } (node expansion required).
    async fn expand(&self, volume_id: &str, mib: i64) {
        let r = self
            .c
            .clone()
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: volume_id.to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: mib * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ControllerExpandVolume {volume_id}: {s:?}"))
            .into_inner();
        assert_eq!(r.capacity_bytes, mib * MIB);
    }

    /// ControllerUnpublishVolume then DeleteVolume, each twice (idempotence).
    async fn unpublish_and_delete(&self, volume_id: &str) {
        for _ in 0..2 {
            self.c
                .clone()
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.to_string(),
                    node_id: "dev".to_string(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("ControllerUnpublishVolume {volume_id}: {s:?}"));
        }
        for _ in 0..2 {
            self.c
                .clone()
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: volume_id.to_string(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("DeleteVolume {volume_id}: {s:?}"));
        }
    }
}

/// The node plugin's client; every call bounded in time, every failure with the plugin log.
struct Node<'a> {
    c: NodeClient<Channel>,
    vm: &'a Vm,
}

impl Node<'_> {
    async fn call<T, F>(&self, what: &str, f: F) -> T
    where
        F: std::future::Future<Output = Result<tonic011::Response<T>, tonic011::Status>>,
    {
        let t = Instant::now();
        let r = tokio::time::timeout(CALL_TIMEOUT, f).await;
        eprintln!("{what}: {:.1}s", t.elapsed().as_secs_f64());
        match r {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                let (_, log) = self.vm.sh("tail -n 40 /tmp/csi.log").await;
                panic!("{what} failed: {status:?}\n--- plugin log\n{log}")
            }
            Err(_) => panic!("{what} did not answer within {CALL_TIMEOUT:?}"),
        }
    }

    /// A call that must fail with `code`.
    async fn refused<T: std::fmt::Debug, F>(&self, what: &str, code: tonic011::Code, f: F)
    where
        F: std::future::Future<Output = Result<tonic011::Response<T>, tonic011::Status>>,
    {
        let Ok(r) = tokio::time::timeout(CALL_TIMEOUT, f).await else {
            panic!("{what} did not answer within {CALL_TIMEOUT:?}")
        };
        let s = expect_code(what, r, code);
        eprintln!("{what}: {:?} as expected: {}", s.code(), s.message());
    }

    /// Every state-changing call is made twice: the second must find the work done.
    async fn stage(&self, r: csi::NodeStageVolumeRequest) {
        for i in 1..=2 {
            let mut c = self.c.clone();
            let what = format!("NodeStageVolume {} #{i}", r.volume_id);
            self.call(&what, c.node_stage_volume(r.clone())).await;
        }
    }

    async fn unstage(&self, volume_id: &str, staging: &str) {
        for i in 1..=2 {
            let mut c = self.c.clone();
            let r = csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.into(),
            };
            self.call(
                &format!("NodeUnstageVolume {volume_id} #{i}"),
                c.node_unstage_volume(r),
            )
            .await;
        }
    }

    async fn publish(&self, r: csi::NodePublishVolumeRequest) {
        for i in 1..=2 {
            let mut c = self.c.clone();
            let what = format!("NodePublishVolume {} {} #{i}", r.volume_id, r.target_path);
            self.call(&what, c.node_publish_volume(r.clone())).await;
        }
    }

    async fn unpublish(&self, volume_id: &str, target: &str) {
        for i in 1..=2 {
            let mut c = self.c.clone();
            let r = csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.into(),
            };
            self.call(
                &format!("NodeUnpublishVolume {target} #{i}"),
                c.node_unpublish_volume(r),
            )
            .await;
        }
    }

    async fn stats(&self, volume_id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
        let mut c = self.c.clone();
        let r = csi::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        self.call(
            &format!("NodeGetVolumeStats {path}"),
            c.node_get_volume_stats(r),
        )
        .await
    }

    async fn expand(&self, volume_id: &str, path: &str, bytes: i64) -> i64 {
        let mut got = Vec::new();
        for i in 1..=2 {
            let mut c = self.c.clone();
            let r = csi::NodeExpandVolumeRequest {
                volume_id: volume_id.into(),
                volume_path: path.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            let resp = self
                .call(
                    &format!("NodeExpandVolume {volume_id} #{i}"),
                    c.node_expand_volume(r),
                )
                .await;
            got.push(resp.capacity_bytes);
        }
        assert_eq!(got[0], got[1], "both expands report the same size");
        got[0]
    }
}

/// The dev cluster's gateway wants mutual CHAP; NodeStageVolume gets these secrets (what a
/// StorageClass's node-stage secret holds).
const CHAP_USER: &str = "csi-initiator";
const CHAP_SECRET: &str = "csi-vm-secret-1";
const CHAP_TARGET_USER: &str = "csi-target";
const CHAP_TARGET_SECRET: &str = "csi-vm-secret-2";

fn chap_secrets() -> HashMap<String, String> {
    HashMap::from([
        ("username".to_string(), CHAP_USER.to_string()),
        ("password".to_string(), CHAP_SECRET.to_string()),
        ("usernameIn".to_string(), CHAP_TARGET_USER.to_string()),
        ("passwordIn".to_string(), CHAP_TARGET_SECRET.to_string()),
    ])
}

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: Unit) -> csi::VolumeUsage {
    r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no {unit:?} usage in {r:?}"))
}

fn assert_normal(r: &csi::NodeGetVolumeStatsResponse) {
    let c = r.volume_condition.as_ref().expect("a volume condition");
    assert!(!c.abnormal, "volume condition abnormal: {c:?}");
}

/// Where `path` really is in the guest: its /var is a link to /run (tests/vm/run.sh), and
/// /proc/mounts shows mounts where they really are. (The plugin resolves links the same way.)
fn real(path: &str) -> String {
    match path.strip_prefix("/var/") {
        Some(rest) => format!("/run/{rest}"),
        None => path.to_string(),
    }
}

fn staging_of(volume: &str) -> String {
    format!("/var/lib/kubelet/plugins/kubernetes.io/csi/csi.ironsan.io/{volume}/globalmount")
}

fn target_of(volume: &str, pod: &str) -> String {
    format!("/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/{volume}/mount")
}

/// Stage, publish, write, read back, stats, a read-only second publish, grow, then undo it
/// all; for ext4 also a reader-only stage afterwards.
async fn filesystem_volume(
    vm: &Vm,
    prov: &Provisioner,
    node: &Node<'_>,
    fs: &str,
    mib: i64,
    grow: i64,
) {
    let vol = prov.create(&format!("csi-{fs}"), mib).await;
    let ctx = prov.publish(&vol).await;
    let iqn = iqn(&vol);
    let staging = staging_of(&vol);
    let target = target_of(&vol, "pod-a");
    let target_ro = target_of(&vol, "pod-ro");
    let (staging_real, target_ro_real) = (real(&staging), real(&target_ro));
    let cap = mount_cap(Mode::SingleNodeWriter, fs);
    let stage_req = csi::NodeStageVolumeRequest {
        secrets: chap_secrets(),
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    node.stage(stage_req).await;
    vm.ok(
        &format!("{vol}: {fs} mounted at the staging path, session logged in"),
        &format!(
            "set -e; grep ' {staging_real} ' /proc/mounts; grep -q ' {staging_real} {fs} rw' /proc/mounts\n\
             iscsiadm -m session | grep -F '{iqn}'\n\
             ls /etc/iscsi/nodes/{iqn}\n\
             cat /run/csi-state/{vol}.json"
        ),
    )
    .await;
    let publish_req = |target: &str, readonly: bool| csi::NodePublishVolumeRequest {
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        target_path: target.to_string(),
        volume_capability: Some(cap.clone()),
        readonly,
        ..Default::default()
    };
    node.publish(publish_req(&target, false)).await;
    let mut c = node.c.clone();
    node.refused(
        &format!("{vol}: publish at the same target read-only"),
        tonic011::Code::AlreadyExists,
        c.node_publish_volume(publish_req(&target, true)),
    )
    .await;
    vm.ok(
        &format!("{vol}: data written through the target reads back after dropping caches"),
        &format!(
            "set -e\n\
             dd if=/dev/urandom of=/tmp/{vol}.bin bs=1M count=4 2>/dev/null\n\
             cp /tmp/{vol}.bin {target}/data\n\
             mkdir {target}/dir && echo hello > {target}/dir/f\n\
             sync; echo 3 > /proc/sys/vm/drop_caches\n\
             cmp /tmp/{vol}.bin {target}/data\n\
             cmp /tmp/{vol}.bin {staging}/data\n\
             grep -qx hello {target}/dir/f\n\
             df -k {target}"
        ),
    )
    .await;

    let stats = node.stats(&vol, &target).await;
    assert_normal(&stats);
    let bytes = usage(&stats, Unit::Bytes);
    let inodes = usage(&stats, Unit::Inodes);
    assert!(
        bytes.total > mib * MIB / 2 && bytes.total <= mib * MIB,
        "{fs}: total {} for a {mib} MiB volume",
        bytes.total
    );
    assert!(bytes.used >= 4 * MIB && bytes.available > 0, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used >= 3, "{inodes:?}");
    assert_normal(&node.stats(&vol, &staging).await);

    // A second, read-only publish (another pod on the node): reads work, writes are refused.
    node.publish(publish_req(&target_ro, true)).await;
    vm.ok(
        &format!("{vol}: the read-only publish reads but refuses writes"),
        &format!(
            "set -e; cmp /tmp/{vol}.bin {target_ro}/data\n\
             if touch {target_ro}/nope 2>/tmp/err; then echo 'write allowed'; exit 1; fi\n\
             grep -i 'read-only' /tmp/err\n\
             grep ' {target_ro_real} ' /proc/mounts | grep -q ' ro,'"
        ),
    )
    .await;
    node.unpublish(&vol, &target_ro).await;

    // Grow the volume, then the filesystem, online and in use.
    prov.expand(&vol, grow).await;
    let cap_bytes = node.expand(&vol, &target, grow * MIB).await;
    assert_eq!(cap_bytes, grow * MIB, "{vol}: NodeExpandVolume capacity");
    let after = usage(&node.stats(&vol, &target).await, Unit::Bytes);
    assert!(
        after.total > bytes.total + (grow - mib) * MIB / 2,
        "{vol}: filesystem {} bytes before, {} after growing {mib} -> {grow} MiB",
        bytes.total,
        after.total
    );
    vm.ok(
        &format!("{vol}: data intact after the online resize"),
        &format!("set -e; cmp /tmp/{vol}.bin {target}/data; df -k {target}"),
    )
    .await;

    node.unpublish(&vol, &target).await;
    node.unstage(&vol, &staging).await;
    vm.ok(
        &format!("{vol}: unstaged: no mount, session, node record or staging record"),
        &format!(
            "[ ! -e {target} ] || {{ echo 'target left'; exit 1; }}\n\
             ! grep -F ' {staging_real} ' /proc/mounts || exit 1\n\
             ! iscsiadm -m session 2>/dev/null | grep -F '{iqn}' || exit 1\n\
             [ ! -e /etc/iscsi/nodes/{iqn} ] || {{ echo 'node record left'; exit 1; }}\n\
             [ ! -e /run/csi-state/{vol}.json ] || {{ echo 'staging record left'; exit 1; }}"
        ),
    )
    .await;

    if fs == "ext4" {
        // A reader-only access mode: the device and the mounts are read-only, the data is
        // the one written above (no mkfs on a volume that has a filesystem).
        let ro_cap = mount_cap(Mode::SingleNodeReaderOnly, fs);
        node.stage(csi::NodeStageVolumeRequest {
            secrets: chap_secrets(),
            volume_id: vol.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(ro_cap.clone()),
            ..Default::default()
        })
        .await;
        let mut req = publish_req(&target, false);
        req.volume_capability = Some(ro_cap);
        node.publish(req).await;
        vm.ok(
            &format!("{vol}: reader-only stage: data there, writes refused, device read-only"),
            &format!(
                "set -e; cmp /tmp/{vol}.bin {target}/data\n\
                 if touch {target}/nope 2>/dev/null; then echo 'write allowed'; exit 1; fi\n\
                 grep -q ' {staging_real} ext4 ro' /proc/mounts\n\
                 dev=$(grep ' {staging_real} ' /proc/mounts | cut -d' ' -f1)\n\
                 [ \"$(blockdev --getro $dev)\" = 1 ]"
            ),
        )
        .await;
        node.unpublish(&vol, &target).await;
        // A plugin that lost its record (a crash before it was written, a wiped state dir)
        // still unstages: the staging mount from the mount table, the session by IQN.
        vm.ok(
            "forget the staging record",
            &format!("rm /run/csi-state/{vol}.json"),
        )
        .await;
        node.unstage(&vol, &staging).await;
        vm.ok(
            &format!("{vol}: unstaged without its record"),
            &format!(
                "! grep -F ' {staging_real} ' /proc/mounts || exit 1\n\
                 ! iscsiadm -m session 2>/dev/null | grep -F '{iqn}' || exit 1"
            ),
        )
        .await;
    }
    if fs == "xfs" {
        // The volume holds xfs: a stage asking for ext4 must refuse, never reformat. The
        // session it left behind (no record was written) goes with the unstage.
        let mut c = node.c.clone();
        node.refused(
            &format!("{vol}: stage as ext4"),
            tonic011::Code::FailedPrecondition,
            c.node_stage_volume(csi::NodeStageVolumeRequest {
                secrets: chap_secrets(),
                volume_id: vol.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "ext4")),
                ..Default::default()
            }),
        )
        .await;
        node.unstage(&vol, &staging).await;
        vm.ok(
            &format!("{vol}: still xfs, nothing left"),
            &format!(
                "! iscsiadm -m session 2>/dev/null | grep -F '{iqn}' || exit 1\n\
                 ! grep -F ' {staging_real} ' /proc/mounts || exit 1\n\
                 [ ! -e /run/csi-state/{vol}.json ]"
            ),
        )
        .await;
    }
    prov.unpublish_and_delete(&vol).await;
}

/// A raw block volume: the device bind mounted on a file, written and read raw, grown.
async fn block_volume(vm: &Vm, prov: &Provisioner, node: &Node<'_>) {
    let (mib, grow) = (32, 48);
    let vol = prov.create("csi-block", mib).await;
    let ctx = prov.publish(&vol).await;
    let iqn = iqn(&vol);
    let staging = format!("/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/{vol}");
    let staging_real = real(&staging);
    let target =
        format!("/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/{vol}/pod-b");
    // ReadWriteOncePod: one target only.
    let cap = block_cap(Mode::SingleNodeSingleWriter);
    // A wrong CHAP secret: the gateway refuses the login. The kernel logs "detected conn
    // error (1020)" when the target closes the refused connection; that line (and only
    // lines of this step) is expected by the guest's final kernel log check.
    vm.ok(
        "kernel log before the refused login",
        "dmesg > /tmp/klog.before",
    )
    .await;
    let mut wrong = chap_secrets();
    wrong.insert("password".into(), "not-the-secret".into());
    let mut c = node.c.clone();
    node.refused(
        &format!("{vol}: stage with a wrong CHAP password"),
        tonic011::Code::PermissionDenied,
        c.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            secrets: wrong,
            ..Default::default()
        }),
    )
    .await;
    vm.ok(
        "the refused login's conn error is expected",
        "sleep 1; dmesg | grep -vxF -f /tmp/klog.before | grep -F 'conn error (1020)' >> /tmp/klog.expected; true",
    )
    .await;
    node.stage(csi::NodeStageVolumeRequest {
        secrets: chap_secrets(),
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await;
    let publish_req = |target: &str| csi::NodePublishVolumeRequest {
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        target_path: target.to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    node.publish(publish_req(&target)).await;
    let mut c = node.c.clone();
    node.refused(
        &format!("{vol}: SINGLE_NODE_SINGLE_WRITER published at a second target"),
        tonic011::Code::FailedPrecondition,
        c.node_publish_volume(publish_req(&target.replace("pod-b", "pod-c"))),
    )
    .await;
    vm.ok(
        &format!("{vol}: a block device at the target, raw data reads back"),
        &format!(
            "set -e\n\
             ! grep -F ' {staging_real} ' /proc/mounts\n\
             [ -b {target} ]\n\
             [ \"$(blockdev --getsize64 {target})\" = {} ]\n\
             dd if=/dev/urandom of=/tmp/{vol}.bin bs=1M count=1 2>/dev/null\n\
             dd if=/tmp/{vol}.bin of={target} bs=1M seek=4 conv=notrunc,fsync 2>/dev/null\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             dd if={target} bs=1M skip=4 count=1 2>/dev/null | cmp - /tmp/{vol}.bin\n\
             iscsiadm -m session | grep -F '{iqn}'",
            mib * MIB
        ),
    )
    .await;
    let stats = node.stats(&vol, &target).await;
    assert_normal(&stats);
    assert_eq!(usage(&stats, Unit::Bytes).total, mib * MIB, "{stats:?}");

    prov.expand(&vol, grow).await;
    assert_eq!(node.expand(&vol, &target, grow * MIB).await, grow * MIB);
    vm.ok(
        &format!("{vol}: the device grew, data intact"),
        &format!(
            "set -e; [ \"$(blockdev --getsize64 {target})\" = {} ]\n\
             dd if={target} bs=1M skip=4 count=1 2>/dev/null | cmp - /tmp/{vol}.bin",
            grow * MIB
        ),
    )
    .await;

    node.unpublish(&vol, &target).await;
    node.unstage(&vol, &staging).await;
    vm.ok(
        &format!("{vol}: unpublished and unstaged"),
        &format!(
            "[ ! -e {target} ] || exit 1\n\
             ! iscsiadm -m session 2>/dev/null | grep -F '{iqn}' || exit 1\n\
             [ ! -e /run/csi-state/{vol}.json ]"
        ),
    )
    .await;
    prov.unpublish_and_delete(&vol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_plugin_in_a_vm() {
    let t0 = Instant::now();
    let dir = TestDir::new("csi-vm");
    let server = Server::start(
        &dir.path().join("data"),
        ServerConfig::default()
            .chap(CHAP_USER, CHAP_SECRET)
            .mutual_chap(CHAP_TARGET_USER, CHAP_TARGET_SECRET),
    );
    let managers = dev_managers(&server.data_dir);
    let controller_sock = dir.path().join("controller.sock");
    let controller = CsiDriver::start(
        &format!("unix://{}", controller_sock.display()),
        &[
            "--mode",
            "controller",
            "--node-id",
            "controller",
            "--manager",
            &managers,
            "--state-dir",
            &dir.path().join("controller-state").display().to_string(),
        ],
    );
    let prov = Provisioner {
        c: csi::controller_client::ControllerClient::new(connect(&controller.endpoint).await),
        portal: server.addr.clone(),
        _controller: controller,
    };
    let gateway_port: u16 = server
        .addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("the dev server's portal port");
    let log_dir: PathBuf = dir.path().join("vm");
    let mut vm = Vm::boot(gateway_port, &log_dir);
    vm.wait_ready();
    let booted = t0.elapsed();

    let node = Node {
        c: NodeClient::new(connect(&vm.endpoint()).await),
        vm: &vm,
    };
    let mut c = node.c.clone();
    let info = node
        .call("NodeGetInfo", c.node_get_info(csi::NodeGetInfoRequest {}))
        .await;
    assert_eq!(info.node_id, "dev");

    // Different volumes are served in parallel by the plugin.
    let t1 = Instant::now();
    tokio::join!(
        filesystem_volume(&vm, &prov, &node, "ext4", 64, 128),
        block_volume(&vm, &prov, &node),
    );
    let first = t1.elapsed();
    // mkfs.xfs wants at least 300 MiB.
    let t2 = Instant::now();
    filesystem_volume(&vm, &prov, &node, "xfs", 320, 400).await;
    let second = t2.elapsed();
    vm.ok(
        "nothing left in the guest",
        "set -e; ! iscsiadm -m session 2>/dev/null; [ -z \"$(ls /run/csi-state)\" ]; \
         ! grep -F /run/lib/kubelet /proc/mounts",
    )
    .await;
    drop(node);
    vm.finish().await;
    server.stop_clean();
    eprintln!(
        "csi_vm timings: VM ready after {:.0}s, ext4 + block {:.0}s, xfs {:.0}s, total {:.0}s",
        booted.as_secs_f64(),
        first.as_secs_f64(),
        second.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
