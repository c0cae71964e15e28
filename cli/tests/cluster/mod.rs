//! Test fixture: a whole IronSAN cluster as real processes — M managers (1 or 3), N storage
//! daemons (each on its own data dir, optionally a loop-mounted ext4 "disk" that can be turned
//! read-only), G gateways — optionally each in its own network namespace so any of them can be
//! partitioned. Reusable by the fault suite, benchmarks and the VM test.
//!
//! - **Processes**: every member is restartable, killable (SIGKILL) and stoppable (SIGTERM)
//!   one by one; ports and data dirs stay the same across restarts. Each process's stderr goes
//!   to `ROOT/logs/NAME.log` (appended across restarts, with a marker line per start).
//! - **Waiting**: starts wait for the daemon's ready line (`manager ready`, `storage ready`,
//!   `portal ready`), failing at once with the log if the process exits first; the cluster is
//!   up once the managers agree on a leader and every storage node is registered Up.
//! - **Admin**: through the real `ironsan` admin commands (`volume create|attach|detach|get`,
//!   `status --json`) and, for chunk maps, `ManagerClient`.
//! - **Checks**: [`Cluster::wait_full_redundancy`] (no degraded chunk, no recovery task) and
//!   [`Cluster::compare_replicas`] (every chunk read from every replica over the data path,
//!   compared in 4 KiB blocks).
//! - **Teardown** in `Drop`, panics included: processes killed, partitions healed, disks
//!   unmounted and detached, namespaces removed. On a panic the tail of every log is printed
//!   and the directory is kept; `IRONSAN_TEST_KEEP=1` keeps it always.
//!
//! Short timeouts by default (node timeout 2 s, recovery grace 3 s, Raft tick 50 ms, lease 3 s)
//! so faults resolve within seconds. Needs root for namespaces and loop disks.
#![allow(dead_code)]

pub mod disk;
pub mod netns;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ironsan_common::manager_client::ManagerClient;
use ironsan_common::proto::manager as pb;
use ironsan_storage::{ChunkId, Client, ClientConfig};
use serde_json::Value;

use disk::LoopDisk;
use netns::Netns;

/// How long a daemon may take to log its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// One admin command (it retries managers itself for up to 10 s).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per compared block.
pub const CMP_BLOCK: usize = 4096;
/// Bytes per data-path read when comparing replicas.
const CMP_READ: u64 = 1 << 20;

fn keep_dirs() -> bool {
    std::env::var_os("IRONSAN_TEST_KEEP").is_some_and(|v| v == "1")
}

// ------------------------------------------------------------------------------------------
// One cluster test at a time

/// Holds a lock file so that cluster tests run one at a time, also across the processes
/// nextest runs them in (a whole cluster per test on a small machine is load enough).
pub struct Serial(File);

pub fn serial() -> Serial {
    let path = std::env::temp_dir().join("ironsan-cluster-tests.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock(2) on a descriptor we own; it blocks until the lock is ours.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    Serial(f)
}

/// Fails the test (never skips) unless it runs as root.
pub fn require_root(why: &str) {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root ({why}); run it as root (e.g. sudo -E cargo nextest run ...)"
    );
}

// ------------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Manager members (1 or 3).
    pub managers: u32,
    pub storage: u32,
    pub gateways: u32,
    /// Every process in its own network namespace (needed for partitions).
    pub netns: bool,
    /// Give each storage daemon a loop-mounted ext4 disk of this many bytes (sparse), needed
    /// for read-only disk faults; `None`: a plain directory.
    pub disk_size: Option<u64>,
    pub node_timeout: String,
    pub recovery_grace: String,
    pub heartbeat_interval: String,
    pub raft_tick: String,
    /// The lease `attach` asks for.
    pub lease: String,
    /// `RUST_LOG` of every daemon.
    pub rust_log: String,
    /// Extra flags per role.
    pub manager_flags: Vec<String>,
    pub storage_flags: Vec<String>,
    pub gateway_flags: Vec<String>,
    /// Names the directory (`ironsan-cluster-LABEL-PID-N`).
    pub label: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            managers: 1,
            storage: 3,
            gateways: 1,
            netns: false,
            disk_size: None,
            node_timeout: "2s".into(),
            recovery_grace: "3s".into(),
            heartbeat_interval: "250ms".into(),
            raft_tick: "50ms".into(),
            lease: "3s".into(),
            rust_log: std::env::var("IRONSAN_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            manager_flags: Vec::new(),
            storage_flags: Vec::new(),
            gateway_flags: Vec::new(),
            label: "test".into(),
        }
    }
}

impl ClusterConfig {
    pub fn new(label: &str, managers: u32, storage: u32, gateways: u32) -> Self {
        ClusterConfig {
            managers,
            storage,
            gateways,
            label: label.into(),
            ..Default::default()
        }
    }
    pub fn netns(mut self, on: bool) -> Self {
        self.netns = on;
        self
    }
    pub fn disks(mut self, size: u64) -> Self {
        self.disk_size = Some(size);
        self
    }
}

/// A process of the cluster (indices from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Manager(u32),
    Storage(u32),
    Gateway(u32),
}

impl Node {
    /// The id the cluster knows it by: `1` (manager member), `s1`, `g1`.
    pub fn id(&self) -> String {
        match self {
            Node::Manager(i) => i.to_string(),
            Node::Storage(i) => format!("s{i}"),
            Node::Gateway(i) => format!("g{i}"),
        }
    }
    fn ready_line(&self) -> &'static str {
        match self {
            Node::Manager(_) => "manager ready",
            Node::Storage(_) => "storage ready",
            Node::Gateway(_) => "portal ready",
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Manager(i) => write!(f, "manager-{i}"),
            Node::Storage(i) => write!(f, "storage-{i}"),
            Node::Gateway(i) => write!(f, "gateway-{i}"),
        }
    }
}

/// One daemon: its command line, and its process while running.
struct Proc {
    /// Network namespace slot (0: the root namespace).
    slot: u32,
    /// Its main address: manager gRPC, storage data path, gateway portal.
    addr: String,
    args: Vec<String>,
    prefix: Vec<String>,
    child: Option<Child>,
    ready: Option<Receiver<String>>,
    log: PathBuf,
    starts: u32,
}

// ------------------------------------------------------------------------------------------
// The cluster

pub struct Cluster {
    pub cfg: ClusterConfig,
    root: PathBuf,
    procs: BTreeMap<Node, Proc>,
    disks: BTreeMap<u32, LoopDisk>,
    net: Option<Netns>,
    rt: tokio::runtime::Runtime,
    /// Every manager's address, comma-separated (a `--manager` value).
    managers: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Cluster {
    /// Starts everything and waits until the managers have a leader, every storage node is
    /// registered Up and every gateway's portal listens.
    pub fn start(cfg: ClusterConfig) -> Cluster {
        assert!(cfg.managers >= 1 && cfg.storage >= 1, "{cfg:?}");
        if cfg.netns || cfg.disk_size.is_some() {
            require_root("network namespaces and loop devices");
        }
        let mut c = Cluster::prepare(cfg);
        let all: Vec<Node> = c.procs.keys().copied().collect();
        let managers: Vec<Node> = all
            .iter()
            .copied()
            .filter(|n| matches!(n, Node::Manager(_)))
            .collect();
        for &n in &managers {
            c.spawn(n);
        }
        for &n in &managers {
            c.wait_ready(n);
        }
        c.leader(Duration::from_secs(30));
        for i in 1..=c.cfg.storage {
            c.spawn(Node::Storage(i));
        }
        for i in 1..=c.cfg.storage {
            c.wait_ready(Node::Storage(i));
        }
        c.wait_nodes_up(Duration::from_secs(30));
        for i in 1..=c.cfg.gateways {
            c.spawn(Node::Gateway(i));
        }
        for i in 1..=c.cfg.gateways {
            c.wait_ready(Node::Gateway(i));
        }
        c
    }

    /// Names every process, its addresses and directories, without starting anything.
    fn prepare(cfg: ClusterConfig) -> Cluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("IRONSAN_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let root = base.join(format!(
            "ironsan-cluster-{}-{}-{}",
            cfg.label,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("logs"))
            .unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let total = cfg.managers + cfg.storage + cfg.gateways;
        let net = cfg.netns.then(|| Netns::setup(total));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut c = Cluster {
            root,
            procs: BTreeMap::new(),
            disks: BTreeMap::new(),
            net,
            rt,
            managers: String::new(),
            cfg,
        };
        let (m, s) = (c.cfg.managers, c.cfg.storage);
        let mut slot_of = BTreeMap::new();
        for i in 1..=m {
            slot_of.insert(Node::Manager(i), i);
        }
        for i in 1..=s {
            slot_of.insert(Node::Storage(i), m + i);
        }
        for i in 1..=c.cfg.gateways {
            slot_of.insert(Node::Gateway(i), m + s + i);
        }
        let addr_of = |c: &Cluster, node: Node, slot: u32| -> String {
            match &c.net {
                Some(net) => {
                    let port = match node {
                        Node::Manager(_) => 7400,
                        Node::Storage(_) => 7500,
                        Node::Gateway(_) => 3260,
                    };
                    format!("{}:{port}", net.ip(slot))
                }
                None => format!("127.0.0.1:{}", free_port()),
            }
        };
        let addrs: BTreeMap<Node, String> = slot_of
            .iter()
            .map(|(&n, &slot)| (n, addr_of(&c, n, slot)))
            .collect();
        c.managers = (1..=m)
            .map(|i| addrs[&Node::Manager(i)].clone())
            .collect::<Vec<_>>()
            .join(",");
        for (&node, &slot) in &slot_of {
            let addr = addrs[&node].clone();
            let dir = c.root.join(node.to_string());
            std::fs::create_dir_all(&dir).expect("create a process dir");
            let mut args: Vec<String> = Vec::new();
            let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
            match node {
                Node::Manager(i) => {
                    push(&["manager", "--id", &i.to_string(), "--listen", &addr]);
                    push(&["--data-dir", &dir.join("data").to_string_lossy()]);
                    for j in (1..=m).filter(|&j| j != i) {
                        push(&["--peer", &format!("{j}={}", addrs[&Node::Manager(j)])]);
                    }
                    push(&[
                        "--node-timeout",
                        &c.cfg.node_timeout,
                        "--recovery-grace",
                        &c.cfg.recovery_grace,
                        "--heartbeat-interval",
                        &c.cfg.heartbeat_interval,
                        "--raft-tick",
                        &c.cfg.raft_tick,
                    ]);
                    args.extend(c.cfg.manager_flags.iter().cloned());
                }
                Node::Storage(i) => {
                    let mut data = dir.join("data");
                    if let Some(size) = c.cfg.disk_size {
                        let disk = LoopDisk::create(&dir.join("disk.img"), &data, size)
                            .unwrap_or_else(|e| panic!("{node}: loop disk: {e}"));
                        c.disks.insert(i, disk);
                        // Beside the filesystem's lost+found, not among it.
                        data = data.join("store");
                    }
                    push(&["storage", "--data-dir", &data.to_string_lossy()]);
                    push(&["--listen", &addr, "--manager", &c.managers]);
                    push(&["--node-id", &node.id(), "--zone", &format!("z{i}")]);
                    args.extend(c.cfg.storage_flags.iter().cloned());
                }
                Node::Gateway(_) => {
                    push(&["gateway", "--manager", &c.managers, "--portal", &addr]);
                    push(&["--node-id", &node.id(), "--lease", &c.cfg.lease]);
                    args.extend(c.cfg.gateway_flags.iter().cloned());
                }
            }
            let prefix = c
                .net
                .as_ref()
                .map(|net| net.prefix(slot))
                .unwrap_or_default();
            c.procs.insert(
                node,
                Proc {
                    slot,
                    addr,
                    args,
                    prefix,
                    child: None,
                    ready: None,
                    log: c.root.join("logs").join(format!("{node}.log")),
                    starts: 0,
                },
            );
        }
        c
    }

    fn proc(&self, node: Node) -> &Proc {
        self.procs
            .get(&node)
            .unwrap_or_else(|| panic!("{node} is not part of this cluster"))
    }

    fn proc_mut(&mut self, node: Node) -> &mut Proc {
        self.procs
            .get_mut(&node)
            .unwrap_or_else(|| panic!("{node} is not part of this cluster"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `--manager` value naming every member.
    pub fn manager_list(&self) -> &str {
        &self.managers
    }

    /// The main address of `node` (gRPC, data path or portal).
    pub fn addr(&self, node: Node) -> String {
        self.proc(node).addr.clone()
    }

    pub fn portal(&self, gateway: u32) -> String {
        self.addr(Node::Gateway(gateway))
    }

    pub fn log_path(&self, node: Node) -> PathBuf {
        self.proc(node).log.clone()
    }

    pub fn log_text(&self, node: Node) -> String {
        std::fs::read_to_string(&self.proc(node).log).unwrap_or_default()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.procs.keys().copied().collect()
    }

    // ---------------------------------------------------------------- processes

    fn spawn(&mut self, node: Node) {
        let rust_log = self.cfg.rust_log.clone();
        let p = self.proc_mut(node);
        assert!(p.child.is_none(), "{node} is already running");
        let bin = env!("CARGO_BIN_EXE_ironsan");
        let mut cmd = match p.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(&p.args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", &rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Own process group: a terminal's Ctrl-C must not reach the daemons; the fixture
        // alone decides when they stop.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        p.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.log.display()));
        let _ = writeln!(
            log,
            "==== start #{} of {node}: {} {}",
            p.starts,
            bin,
            p.args.join(" ")
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {node} ({bin}): {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        let ready = node.ready_line();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains(ready) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        p.child = Some(child);
        p.ready = Some(rx);
    }

    /// Waits for the ready line of the current start of `node`; returns it.
    fn wait_ready(&mut self, node: Node) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let p = self.proc_mut(node);
            let rx = p.ready.as_ref().expect("started");
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    p.ready = None;
                    return line;
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    let exited = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        // Let the reader thread drain the last lines.
                        std::thread::sleep(Duration::from_millis(200));
                        p.child = None;
                        panic!(
                            "{node} exited ({status}) before logging `{}`:\n{}",
                            node.ready_line(),
                            tail(&self.log_text(node), 40)
                        );
                    }
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    panic!(
                        "{node} did not log `{}` within {READY_TIMEOUT:?}:\n{}",
                        node.ready_line(),
                        tail(&self.log_text(node), 40)
                    );
                }
            }
        }
    }

    pub fn is_running(&mut self, node: Node) -> bool {
        let p = self.proc_mut(node);
        match p.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                p.child = None;
                false
            }
            None => false,
        }
    }

    /// Panics (with the log tail) unless every process that should run does.
    pub fn assert_running(&mut self, nodes: &[Node]) {
        for &n in nodes {
            if !self.is_running(n) {
                panic!("{n} died:\n{}", tail(&self.log_text(n), 40));
            }
        }
    }

    /// (Re)starts `node` with its usual command line and waits until it is ready.
    pub fn start_node(&mut self, node: Node) {
        self.spawn(node);
        self.wait_ready(node);
    }

    /// SIGKILL: a crash. Waits for the process to be gone.
    pub fn kill(&mut self, node: Node) {
        let p = self.proc_mut(node);
        if let Some(mut c) = p.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL and panic after [`STOP_TIMEOUT`]).
    pub fn terminate(&mut self, node: Node) -> ExitStatus {
        let p = self.proc_mut(node);
        let mut c = p
            .child
            .take()
            .unwrap_or_else(|| panic!("{node} is not running"));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{node} did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    tail(&self.log_text(node), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A clean restart: SIGTERM, a clean exit asserted, start again.
    pub fn restart(&mut self, node: Node) {
        let status = self.terminate(node);
        assert!(
            status.success(),
            "{node} exited with {status} after SIGTERM, expected 0:\n{}",
            tail(&self.log_text(node), 40)
        );
        self.start_node(node);
    }

    /// SIGSTOP / SIGCONT (a hung process).
    pub fn pause(&mut self, node: Node, stop: bool) {
        let p = self.proc_mut(node);
        let c = p.child.as_ref().expect("running");
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    // ---------------------------------------------------------------- network

    /// Cuts `node` off from every other process of the cluster (the test still reaches it),
    /// or heals that. Needs `netns`.
    pub fn partition(&mut self, node: Node, cut: bool) {
        let slot = self.proc(node).slot;
        let net = self
            .net
            .as_mut()
            .expect("partitions need ClusterConfig::netns(true)");
        net.partition(slot, cut)
            .unwrap_or_else(|e| panic!("partition {node}: {e}"));
    }

    pub fn is_partitioned(&self, node: Node) -> bool {
        let slot = self.proc(node).slot;
        self.net.as_ref().is_some_and(|n| n.is_cut(slot))
    }

    // ---------------------------------------------------------------- disks

    /// Turns storage daemon `i`'s disk read-only under it. Needs `disks`.
    pub fn make_disk_read_only(&mut self, i: u32) {
        let d = self
            .disks
            .get(&i)
            .expect("read-only disks need ClusterConfig::disks(SIZE)");
        d.make_read_only()
            .unwrap_or_else(|e| panic!("storage-{i}: {e}"));
    }

    /// Repairs and remounts storage daemon `i`'s disk read-write; the daemon must be stopped.
    pub fn restore_disk(&mut self, i: u32) {
        assert!(
            !self.is_running(Node::Storage(i)),
            "stop storage-{i} before restoring its disk"
        );
        let d = self.disks.get_mut(&i).expect("a loop disk");
        d.restore()
            .unwrap_or_else(|e| panic!("storage-{i}: restore disk: {e}"));
    }

    // ---------------------------------------------------------------- manager

    /// Runs on the fixture's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A failover client of every manager.
    pub fn client(&self) -> ManagerClient {
        let _guard = self.rt.enter();
        ManagerClient::new(&self.managers).expect("manager list")
    }

    /// Status as member `i` sees it (answered locally, no quorum needed).
    pub fn member_status(&self, i: u32) -> Result<pb::ClusterStatus, String> {
        let addr = self.addr(Node::Manager(i));
        self.rt.block_on(async {
            ManagerClient::new(&addr)
                .map_err(|e| e.to_string())?
                .with_deadline(Duration::from_secs(1))
                .with_call_timeout(Duration::from_secs(1))
                .status(pb::StatusRequest {})
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Waits until the running managers agree on a running leader; returns its id.
    pub fn leader(&mut self, within: Duration) -> u32 {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            for i in 1..=self.cfg.managers {
                if self.is_running(Node::Manager(i)) {
                    if let Ok(s) = self.member_status(i) {
                        seen.push(s.leader as u32);
                    }
                }
            }
            if let Some(&l) = seen.first() {
                if l != 0 && seen.iter().all(|&x| x == l) && self.is_running(Node::Manager(l)) {
                    return l;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "managers agree on no leader within {within:?} (seen {seen:?})\n{}",
                    self.log_tails(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every storage node is registered and Up.
    pub fn wait_nodes_up(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let want = self.cfg.storage as usize;
        let client = self.client();
        loop {
            let r = self.rt.block_on(client.list_nodes(pb::ListNodesRequest {}));
            let up = match &r {
                Ok(l) => l
                    .nodes
                    .iter()
                    .filter(|n| n.state == pb::NodeState::NodeUp as i32)
                    .count(),
                Err(_) => 0,
            };
            if up >= want {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{up} of {want} storage nodes Up after {within:?} ({r:?})\n{}",
                    self.log_tails(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `ironsan ARGS --manager LIST` (an admin command) under a time limit.
    pub fn admin(&self, args: &[&str]) -> AdminRun {
        self.admin_at(&self.managers, args)
    }

    /// Same, against the given `--manager` value.
    pub fn admin_at(&self, managers: &str, args: &[&str]) -> AdminRun {
        let bin = env!("CARGO_BIN_EXE_ironsan");
        let out = Command::new("timeout")
            .arg("-k")
            .arg("5")
            .arg(ADMIN_TIMEOUT.as_secs().to_string())
            .arg(bin)
            .args(args)
            .args(["--manager", managers])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ironsan {}: {e}", args.join(" ")));
        AdminRun {
            cmdline: format!("ironsan {} --manager {managers}", args.join(" ")),
            ok: out.status.success(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Creates a volume with 3 replicas; returns its JSON (`id`, `size`, `chunk_size`, ...).
    pub fn create_volume(&self, name: &str, size: &str, chunk_size: &str) -> Value {
        self.admin(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--replicas",
            "3",
            "--chunk-size",
            chunk_size,
            "--json",
        ])
        .expect_ok("volume create")
        .json()
    }

    pub fn volume(&self, name: &str) -> Value {
        self.admin(&["volume", "get", name, "--json"])
            .expect_ok("volume get")
            .json()
    }

    /// The gateway index the volume is attached to, if any.
    pub fn attached_gateway(&self, name: &str) -> Option<u32> {
        let v = self.volume(name);
        let gw = v["attachment"]["gateway"].as_str()?;
        gw.strip_prefix('g')?.parse().ok()
    }

    /// Every gateway portal, the one the volume is attached to first.
    pub fn portals_for(&self, name: &str) -> Vec<String> {
        let holder = self.attached_gateway(name);
        let mut v: Vec<(bool, String)> = (1..=self.cfg.gateways)
            .map(|g| (Some(g) != holder, self.portal(g)))
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Attaches `name` to gateway `g`, retrying while another gateway's lease has not lapsed
    /// (FAILED_PRECONDITION) or the managers have no leader, then waits until the gateway logs
    /// that it exports the volume's target (`target ready`, after reconciling nothing yet: the
    /// chunks reconcile on first I/O). Returns how long that took.
    pub fn attach(&mut self, name: &str, g: u32, within: Duration) -> Duration {
        let started = Instant::now();
        let deadline = started + within;
        let node = Node::Gateway(g);
        let since = self.log_len(node);
        let lease = self.cfg.lease.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let r = self.admin(&[
                "volume",
                "attach",
                name,
                "--node",
                &node.id(),
                "--lease",
                &lease,
            ]);
            if r.ok {
                break;
            }
            let text = r.stderr.to_lowercase();
            let retryable = [
                "precondition",
                "lease",
                "attached",
                "unavailable",
                "did not answer",
                "held",
            ]
            .iter()
            .any(|k| text.contains(k));
            if !retryable || Instant::now() > deadline {
                panic!(
                    "attach {name} to {node} failed after {attempts} attempts in {:?}:\n{}",
                    started.elapsed(),
                    r.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self.wait_log(node, since, &["target ready", name], left) {
            panic!("attach {name} to {node}: {e}");
        }
        started.elapsed()
    }

    /// Detaches `name` from gateway `g`, or from whoever holds it (`None`).
    pub fn detach(&self, name: &str, g: Option<u32>) -> AdminRun {
        let id = g.map(|g| Node::Gateway(g).id());
        let mut args = vec!["volume", "detach", name];
        if let Some(id) = &id {
            args.extend(["--node", id.as_str()]);
        }
        self.admin(&args)
    }

    pub fn log_len(&self, node: Node) -> u64 {
        std::fs::metadata(self.log_path(node))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Waits until a line written to `node`'s log after byte `since` contains every needle;
    /// returns the line.
    pub fn wait_log(
        &self,
        node: Node,
        since: u64,
        needles: &[&str],
        within: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let mut text = String::new();
            if let Ok(mut f) = File::open(self.log_path(node)) {
                let _ = f.seek(SeekFrom::Start(since));
                let _ = f.read_to_string(&mut text);
            }
            if let Some(line) = text
                .lines()
                .find(|l| needles.iter().all(|n| has_word(l, n)))
            {
                return Ok(line.to_string());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no line with {needles:?} in {node}'s log within {within:?}; its tail:\n{}",
                    tail(&text, 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ironsan status --json` as the leader sees it.
    pub fn status(&mut self) -> Value {
        let leader = self.leader(Duration::from_secs(30));
        let addr = self.addr(Node::Manager(leader));
        self.admin_at(&addr, &["status", "--json"])
            .expect_ok("status")
            .json()
    }

    /// Waits until the leader reports no degraded chunk and no recovery task; returns how long
    /// that took (or the last status on timeout).
    pub fn wait_full_redundancy(&mut self, within: Duration) -> Result<Duration, String> {
        self.wait_redundancy(within).map(|r| r.total)
    }

    /// Waits until the leader reports degraded chunks (a node declared Down, a replica
    /// removed); returns how long that took.
    pub fn wait_degraded(&mut self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let s = self.status();
            if s["degraded_chunks"].as_u64().unwrap_or(0) > 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                return Err(format!(
                    "no chunk degraded within {within:?}; status: {s:#}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Cluster::wait_full_redundancy`] with when chunks were first seen degraded and when
    /// recovery tasks first existed, to tell detection time from copy time.
    pub fn wait_redundancy(&mut self, within: Duration) -> Result<Redundancy, String> {
        let started = Instant::now();
        let mut r = Redundancy::default();
        loop {
            let s = self.status();
            let degraded = s["degraded_chunks"].as_u64();
            let tasks = s["recovery_tasks"].as_u64();
            if degraded.unwrap_or(0) > 0 && r.degraded_seen.is_none() {
                r.degraded_seen = Some(started.elapsed());
            }
            if tasks.unwrap_or(0) > 0 && r.tasks_seen.is_none() {
                r.tasks_seen = Some(started.elapsed());
            }
            if degraded == Some(0) && tasks == Some(0) {
                r.total = started.elapsed();
                return Ok(r);
            }
            if started.elapsed() > within {
                let t = self
                    .rt
                    .block_on(self.client().list_tasks(pb::ListTasksRequest {}));
                return Err(format!(
                    "redundancy not restored within {within:?}: degraded_chunks {degraded:?}, \
                     recovery_tasks {tasks:?}\nstatus: {s:#}\ntasks: {t:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// How many chunks of `volume` each storage node holds (node id → count).
    pub fn replica_counts(&self, volume: &str) -> BTreeMap<String, usize> {
        let client = self.client();
        let map = self
            .rt
            .block_on(client.get_chunks(pb::GetChunksRequest {
                volume: Some(pb::VolumeRef {
                    id: 0,
                    name: volume.to_string(),
                }),
                first: 0,
                count: 0,
            }))
            .unwrap_or_else(|e| panic!("chunk map of {volume}: {e}"));
        let mut counts: BTreeMap<String, usize> = (1..=self.cfg.storage)
            .map(|i| (Node::Storage(i).id(), 0))
            .collect();
        for c in &map.chunks {
            for r in &c.replicas {
                *counts.entry(r.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Reads every chunk of `volume` from every replica over the data path and compares
    /// them in 4 KiB blocks.
    pub fn compare_replicas(&self, volume: &str) -> Result<ReplicaReport, String> {
        let client = self.client();
        self.rt.block_on(compare_replicas(&client, volume))
    }

    /// The last `n` lines of every process's log.
    pub fn log_tails(&self, n: usize) -> String {
        self.procs
            .keys()
            .map(|&node| format!("--- {node} ---\n{}\n", tail(&self.log_text(node), n)))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let nodes: Vec<Node> = self.procs.keys().copied().collect();
        for n in nodes {
            self.kill(n);
        }
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "=== cluster logs (tails; full logs in {}) ===\n{}",
                self.root.join("logs").display(),
                self.log_tails(40)
            );
        }
        // Disks before namespaces and the directory: nothing uses them any more.
        self.disks.clear();
        self.net = None;
        if panicking || keep_dirs() {
            eprintln!("keeping {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// How full redundancy came back (times from the start of the wait).
#[derive(Clone, Copy, Debug, Default)]
pub struct Redundancy {
    pub total: Duration,
    /// First poll that showed degraded chunks.
    pub degraded_seen: Option<Duration>,
    /// First poll that showed recovery tasks (copying starts about then).
    pub tasks_seen: Option<Duration>,
}

/// One admin command's result.
pub struct AdminRun {
    pub cmdline: String,
    pub ok: bool,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl AdminRun {
    pub fn describe(&self) -> String {
        format!(
            "  command: {}\n  status: {}\n  stdout: {}\n  stderr: {}",
            self.cmdline,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
    pub fn expect_ok(self, what: &str) -> AdminRun {
        assert!(self.ok, "{what} failed:\n{}", self.describe());
        self
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.describe()))
    }
}

/// True if `line` contains `word` not as part of a longer name (`volume=v` vs `volume=v2`).
fn has_word(line: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + word.len()..].chars().next();
        !before.is_some_and(|c| is_name(c) && word.starts_with(is_name))
            && !after.is_some_and(|c| is_name(c) && word.ends_with(is_name))
    })
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ------------------------------------------------------------------------------------------
// Replica comparison

/// What [`Cluster::compare_replicas`] found.
#[derive(Debug, Default)]
pub struct ReplicaReport {
    pub chunks: u64,
    /// Chunks absent on every replica (never written).
    pub chunks_unwritten: u64,
    pub replicas_read: u64,
    pub bytes_compared: u64,
    /// Chunks absent on some replicas but present on others.
    pub missing_replicas: u64,
    /// Chunks still receiving a rebuild copy (`joining`).
    pub joining: u64,
    pub differing_chunks: u64,
    pub differing_blocks: u64,
    /// The first differences, for people.
    pub details: Vec<String>,
}

async fn compare_replicas(client: &ManagerClient, volume: &str) -> Result<ReplicaReport, String> {
    let vref = pb::VolumeRef {
        id: 0,
        name: volume.to_string(),
    };
    let v = client
        .get_volume(vref.clone())
        .await
        .map_err(|e| format!("get volume {volume}: {e}"))?;
    let chunks = client
        .get_chunks(pb::GetChunksRequest {
            volume: Some(vref),
            first: 0,
            count: 0,
        })
        .await
        .map_err(|e| format!("get chunks of {volume}: {e}"))?;
    let addr_of: BTreeMap<String, String> = chunks
        .nodes
        .iter()
        .map(|n| (n.id.clone(), n.addr.clone()))
        .collect();
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut conns: BTreeMap<String, Client> = BTreeMap::new();
    let mut report = ReplicaReport::default();
    for ch in &chunks.chunks {
        report.chunks += 1;
        if !ch.joining.is_empty() {
            report.joining += 1;
        }
        let index = u32::try_from(ch.index).map_err(|_| format!("chunk index {}", ch.index))?;
        let id = ChunkId::new(v.id, index);
        // Per replica: the chunk's bytes, or None where the replica has no such chunk.
        let mut copies: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for node in &ch.replicas {
            let addr = addr_of
                .get(node)
                .ok_or_else(|| format!("chunk {index}: replica node {node} has no address"))?;
            if !conns.get(addr).is_some_and(|c| c.is_alive()) {
                let c = Client::connect(addr, &cfg)
                    .await
                    .map_err(|e| format!("connect to {node} at {addr}: {e}"))?;
                conns.insert(addr.clone(), c);
            }
            let c = &conns[addr];
            let mut data = Vec::with_capacity(v.chunk_size as usize);
            let mut off = 0;
            let mut absent = false;
            while off < v.chunk_size {
                let len = CMP_READ.min(v.chunk_size - off);
                match c.read(id, off, len, 0).await {
                    Ok(r) => data.extend_from_slice(&r.data),
                    Err(ironsan_storage::Error::NotFound(_)) => {
                        absent = true;
                        break;
                    }
                    Err(e) => return Err(format!("read chunk {id} from {node} ({addr}): {e}")),
                }
                off += len;
            }
            report.replicas_read += 1;
            report.bytes_compared += data.len() as u64;
            copies.push((node.clone(), (!absent).then_some(data)));
        }
        let present = copies.iter().filter(|(_, d)| d.is_some()).count();
        if present == 0 {
            report.chunks_unwritten += 1;
            continue;
        }
        if present < copies.len() {
            report.missing_replicas += 1;
        }
        // An absent replica counts as zeroes: a chunk created but never written equals it.
        let zero = vec![0u8; CMP_BLOCK];
        let block = |d: &Option<Vec<u8>>, b: usize| -> Vec<u8> {
            match d {
                Some(d) => d[b * CMP_BLOCK..(b + 1) * CMP_BLOCK].to_vec(),
                None => zero.clone(),
            }
        };
        let blocks = v.chunk_size as usize / CMP_BLOCK;
        let mut differ = 0;
        for b in 0..blocks {
            let first = block(&copies[0].1, b);
            if copies[1..].iter().all(|(_, d)| block(d, b) == first) {
                continue;
            }
            differ += 1;
            if report.details.len() < 20 {
                let each: Vec<String> = copies
                    .iter()
                    .map(|(n, d)| match d {
                        None => format!("{n}: absent"),
                        Some(_) => {
                            let x = block(d, b);
                            format!(
                                "{n}: crc32c {:#010x} head {:02x?}",
                                ironsan_common::crc::crc32c(&x),
                                &x[..24]
                            )
                        }
                    })
                    .collect();
                report.details.push(format!(
                    "chunk {index} block {b} (volume byte {}): {}",
                    ch.index * v.chunk_size + (b * CMP_BLOCK) as u64,
                    each.join("; ")
                ));
            }
        }
        if differ > 0 {
            report.differing_chunks += 1;
            report.differing_blocks += differ;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_in_log_lines() {
        assert!(has_word("serving volume volume=v epoch=3", "v"));
        assert!(has_word("serving volume volume=\"v\"", "v"));
        assert!(!has_word("serving volume volume=v2 epoch=3", "v"));
        assert!(!has_word("serving volume volume=vv", "v"));
        assert!(has_word("INFO serving volume x", "serving volume"));
    }
}
