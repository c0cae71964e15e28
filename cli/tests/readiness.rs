//! `/readyz` of every daemon, as Kubernetes probes it, with real processes, and DNS names
//! wherever an address is given (as a StatefulSet's headless service names its pods):
//!
//! - manager: a member of a 3-member group is not ready alone, is once a quorum exists, and is
//!   not after `remove-member`; a member started with `--join` is ready once added. Members
//!   take their id from the hostname (`--id-from-hostname`, each in its own UTS namespace as
//!   `ironsan-manager-N`), get the same `--peer` list (their own entry included) and reach
//!   each other as `localhost:PORT`.
//! - manager peers named by DNS names that do not resolve when the members start (each member
//!   sees a hosts file of its own through a mount namespace): no quorum, not ready; once the
//!   names appear, the group forms without a restart.
//! - gateway: not ready while the manager is down, ready once registered; storage advertising
//!   `localhost:PORT` (also ready) is what the gateway reaches for a volume's I/O.
//! - CSI: the controller is ready only while the manager answers; the node plugin once bound.
//!
//! The storage daemon's standing (registration, heartbeats, catching up) is in membership.rs,
//! against a scripted manager. Needs root (unshare) and qemu-io (qemu-utils).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{qemu_verify, qemu_write, TestDir};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn require_root() {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test runs daemons in their own UTS and mount namespaces (unshare): run it as root"
    );
}

// ------------------------------------------------------------------------------------------
// Processes

/// One daemon, its stderr collected; killed on drop.
struct Daemon {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// Its `--metrics` address.
    metrics: String,
}

impl Daemon {
    /// Runs `ironsan ARGS` under `wrap` (a command prefix, e.g. unshare), with `--metrics`.
    fn start(name: &str, wrap: &[String], args: &[String]) -> Daemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let bin = env!("CARGO_BIN_EXE_ironsan");
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args)
            .args(["--metrics", &metrics])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
            metrics,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- {} log:\n{}",
            self.name,
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// `/readyz`: status code and body; None while nothing answers.
    fn readyz(&self) -> Option<(u16, String)> {
        readyz(&self.metrics)
    }

    /// Polls `/readyz` until it answers `code`; returns the body.
    fn wait_ready(&mut self, code: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some((c, body)) = self.readyz() {
                if c == code {
                    return body;
                }
                last = Some((c, body));
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited ({st}) while waiting for /readyz {code}\n{}",
                    self.name,
                    self.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: /readyz did not answer {code} within {within:?} (last: {last:?})\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/readyz` answers `code` throughout `period`; returns the last body.
    fn hold(&mut self, code: u16, period: Duration) -> String {
        let body = self.wait_ready(code, Duration::from_secs(30));
        let end = Instant::now() + period;
        let mut last = body;
        while Instant::now() < end {
            match self.readyz() {
                Some((c, body)) if c == code => last = body,
                other => panic!(
                    "{}: /readyz answered {other:?}, expected {code} throughout {period:?}\n{}",
                    self.name,
                    self.tail()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        last
    }

    /// SIGTERM and wait for the exit.
    fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGTERM\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}

fn readyz(addr: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// `ironsan ARGS` (an admin command); panics with its output unless it succeeds.
fn admin(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("ironsan runs");
    assert!(
        out.status.success(),
        "ironsan {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------------------------------------------
// Managers

/// A manager group as a StatefulSet would run it: member N (id N) is pod `ironsan-manager-(N-1)`
/// with that hostname, and every member gets the same arguments but its own addresses.
struct Managers {
    dir: TestDir,
    /// Member id -> (listen port, the name others reach it by).
    members: Vec<(u64, u16, String)>,
    /// Members 1..=initial bootstrap the group; later ones join it.
    initial: u64,
    /// A hosts file each member sees as /etc/hosts (None: the real one).
    hosts: Option<PathBuf>,
}

impl Managers {
    fn new(
        label: &str,
        n: u64,
        initial: u64,
        name: impl Fn(u64) -> String,
        hosts: bool,
    ) -> Managers {
        let dir = TestDir::new(label);
        let members = (1..=n)
            .map(|id| {
                let port = free_port();
                (id, port, format!("{}:{port}", name(id)))
            })
            .collect();
        let hosts = hosts.then(|| {
            let p = dir.path().join("hosts");
            std::fs::write(&p, "127.0.0.1 localhost\n").unwrap();
            p
        });
        Managers {
            dir,
            members,
            initial,
            hosts,
        }
    }

    /// The `--peer` list of member `me`: the initial members (the same list on each of them,
    /// own entry included), and for a later member also its own entry.
    fn peers(&self, me: u64) -> Vec<String> {
        self.members
            .iter()
            .filter(|(id, _, _)| *id <= self.initial || *id == me)
            .flat_map(|(id, _, addr)| ["--peer".to_string(), format!("{id}={addr}")])
            .collect()
    }

    /// The `--manager` value for admin commands: the initial members.
    fn list(&self) -> String {
        self.members
            .iter()
            .filter(|(id, _, _)| *id <= self.initial)
            .map(|(_, _, a)| a.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn addr(&self, id: u64) -> String {
        self.members[id as usize - 1].2.clone()
    }

    /// Starts member `id` as pod `ironsan-manager-(id-1)`: its own UTS namespace (and mount
    /// namespace with the private hosts file), `--id-from-hostname`.
    fn start(&self, id: u64, more: &[&str]) -> Daemon {
        let (_, port, addr) = &self.members[id as usize - 1];
        let host = format!("ironsan-manager-{}", id - 1);
        let mut script = String::from("set -e; ");
        let mut wrap = vec!["unshare".to_string(), "-u".to_string()];
        if let Some(h) = &self.hosts {
            wrap.push("-m".into());
            script.push_str(&format!("mount --bind '{}' /etc/hosts; ", h.display()));
        }
        script.push_str("hostname \"$0\"; exec \"$@\"");
        wrap.extend(["sh".into(), "-c".into(), script, host]);
        let mut args: Vec<String> = [
            "manager",
            "--id-from-hostname",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &self.dir.path().join(format!("m{id}")).to_string_lossy(),
            "--raft-tick",
            "50ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Member 2 takes its advertised address from its own --peer entry.
        if id != 2 {
            args.extend(["--advertise".to_string(), addr.clone()]);
        }
        args.extend(self.peers(id));
        args.extend(more.iter().map(|s| s.to_string()));
        Daemon::start(&format!("manager {id}"), &wrap, &args)
    }

    /// Makes every member's name resolve (in the members' hosts file).
    fn publish_names(&self) {
        let h = self.hosts.as_ref().expect("a private hosts file");
        let mut text = String::from("127.0.0.1 localhost\n");
        for (_, _, addr) in &self.members {
            let name = addr.rsplit_once(':').unwrap().0;
            text.push_str(&format!("127.0.0.1 {name}\n"));
        }
        // In place (same inode): the members see it through their bind mounts.
        std::fs::write(h, text).unwrap();
    }
}

fn leader_of(list: &str) -> u64 {
    let out = admin(&["status", "--json", "--manager", list]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    v["leader"].as_u64().unwrap_or(0)
}

#[test]
fn manager_ready_with_a_quorum_and_not_once_removed() {
    require_root();
    // Members 1-3 bootstrap the group; 4 joins later.
    let g = Managers::new("readyz-managers", 4, 3, |_| "localhost".into(), false);
    let mut m1 = g.start(1, &[]);
    let body = m1.hold(503, Duration::from_secs(3));
    println!("member 1 alone: 503 {body:?}");
    assert!(body.contains("knows no leader"), "{body}");
    assert!(
        m1.log()
            .contains("member id from the hostname hostname=ironsan-manager-0 member=1"),
        "{}",
        m1.tail()
    );

    let t = Instant::now();
    let mut m2 = g.start(2, &[]);
    m1.wait_ready(200, Duration::from_secs(20));
    m2.wait_ready(200, Duration::from_secs(20));
    println!(
        "members 1 and 2 ready {:?} after member 2 started",
        t.elapsed()
    );
    let mut m3 = g.start(3, &[]);
    m3.wait_ready(200, Duration::from_secs(20));
    let list = g.list();

    // Removal: member 3 (made not the leader first, if it is) is no longer ready.
    if leader_of(&list) == 3 {
        admin(&[
            "manager",
            "transfer-leader",
            "--to",
            "1",
            "--manager",
            &list,
        ]);
    }
    admin(&["manager", "remove-member", "--id", "3", "--manager", &list]);
    let body = m3.wait_ready(503, Duration::from_secs(15));
    println!("member 3 removed: 503 {body:?}");
    m1.hold(200, Duration::from_secs(1));
    m2.wait_ready(200, Duration::from_secs(5));

    // A member started with --join is not ready until it is added.
    let mut m4 = g.start(4, &["--join"]);
    let body = m4.hold(503, Duration::from_secs(2));
    println!("member 4 before add-member: 503 {body:?}");
    assert!(body.contains("waiting to be added"), "{body}");
    admin(&[
        "manager",
        "add-member",
        "--id",
        "4",
        "--addr",
        &g.addr(4),
        "--manager",
        &list,
    ]);
    m4.wait_ready(200, Duration::from_secs(20));
    for m in [&mut m1, &mut m2, &mut m4] {
        let st = m.stop();
        assert!(st.success(), "{} exited with {st}\n{}", m.name, m.tail());
    }
}

#[test]
fn manager_peers_named_before_their_names_resolve() {
    require_root();
    // As in a StatefulSet behind a headless service: the records appear only later.
    let g = Managers::new(
        "readyz-dns",
        3,
        3,
        |id| format!("ironsan-manager-{}.ironsan-manager.ironsan.invalid", id - 1),
        true,
    );
    let mut ms: Vec<Daemon> = (1..=3).map(|id| g.start(id, &[])).collect();
    for m in &mut ms {
        let body = m.hold(503, Duration::from_secs(1));
        assert!(body.contains("knows no leader"), "{body}");
    }
    std::thread::sleep(Duration::from_secs(2));
    for m in &mut ms {
        m.hold(503, Duration::from_millis(200));
    }
    let t = Instant::now();
    g.publish_names();
    for m in &mut ms {
        m.wait_ready(200, Duration::from_secs(30));
    }
    println!(
        "names published: every member ready {:?} later, no restart",
        t.elapsed()
    );
    for m in &mut ms {
        let st = m.stop();
        assert!(st.success(), "{} exited with {st}\n{}", m.name, m.tail());
    }
}

// ------------------------------------------------------------------------------------------
// Gateway, storage by name, CSI

#[test]
fn gateway_storage_and_csi_ready_with_the_manager() {
    let dir = TestDir::new("readyz-gw");
    let mport = free_port();
    let manager = format!("localhost:{mport}");

    // The gateway first: no manager to register with.
    let mut gw = Daemon::start(
        "gateway",
        &[],
        &args(&[
            "gateway",
            "--manager",
            &manager,
            "--portal",
            "127.0.0.1:0",
            "--node-id",
            "gw1",
        ]),
    );
    let body = gw.hold(503, Duration::from_secs(2));
    println!("gateway without a manager: 503 {body:?}");

    // The CSI controller without a manager: bound, but not ready.
    let csi_port = free_port();
    let mut csi = Daemon::start(
        "csi controller",
        &[],
        &args(&[
            "csi",
            "--mode",
            "controller",
            "--endpoint",
            &format!("tcp://127.0.0.1:{csi_port}"),
            "--manager",
            &manager,
        ]),
    );
    let body = csi.hold(503, Duration::from_secs(2));
    println!("CSI controller without a manager: 503 {body:?}");
    assert!(body.contains("manager"), "{body}");
    let state = dir.path().join("csi-state");
    let node_port = free_port();
    let mut csi_node = Daemon::start(
        "csi node",
        &[],
        &args(&[
            "csi",
            "--mode",
            "node",
            "--node-id",
            "n1",
            "--endpoint",
            &format!("tcp://127.0.0.1:{node_port}"),
            "--state-dir",
            &state.to_string_lossy(),
        ]),
    );
    csi_node.wait_ready(200, Duration::from_secs(20));

    let mut mgr = Daemon::start(
        "manager",
        &[],
        &args(&[
            "manager",
            "--id",
            "1",
            "--listen",
            &format!("127.0.0.1:{mport}"),
            "--advertise",
            &manager,
            "--data-dir",
            &dir.path().join("m1").to_string_lossy(),
        ]),
    );
    mgr.wait_ready(200, Duration::from_secs(20));
    let t = Instant::now();
    gw.wait_ready(200, Duration::from_secs(30));
    println!("gateway ready {:?} after the manager", t.elapsed());
    csi.wait_ready(200, Duration::from_secs(20));

    // A storage daemon known by name: the gateway's data path resolves it.
    let sport = free_port();
    let saddr = format!("localhost:{sport}");
    let mut storage = Daemon::start(
        "storage",
        &[],
        &args(&[
            "storage",
            "--data-dir",
            &dir.path().join("s1").to_string_lossy(),
            "--listen",
            &format!("127.0.0.1:{sport}"),
            "--advertise",
            &saddr,
            "--manager",
            &manager,
            "--node-id",
            "node1",
        ]),
    );
    storage.wait_ready(200, Duration::from_secs(30));
    let nodes = admin(&["node", "list", "--json", "--manager", &manager]);
    assert!(nodes.contains(&saddr), "{nodes}");
    admin(&[
        "volume",
        "create",
        "named",
        "--size",
        "64MiB",
        "--replicas",
        "1",
        "--manager",
        &manager,
    ]);
    admin(&[
        "volume",
        "attach",
        "named",
        "--node",
        "gw1",
        "--manager",
        &manager,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gw.log().contains("target ready volume=named") {
        assert!(Instant::now() < deadline, "no target\n{}", gw.tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let portal = portal_of(&gw.log()).expect("portal ready line");
    let url = format!("iscsi://{portal}/{}/0", support::iqn("named"));
    qemu_write(&url, 1 << 20, 4 << 20, 0x5c).expect_ok("write through the gateway");
    qemu_verify(&url, 1 << 20, 4 << 20, 0x5c).expect_ok("read back");
    assert!(
        metric_text(&storage.metrics).contains("ironsan_storage"),
        "storage metrics"
    );
    gw.wait_ready(200, Duration::from_secs(1));

    // The manager goes away: the CSI controller is no longer ready; the node plugin is.
    let st = mgr.stop();
    assert!(st.success(), "{st}");
    csi.wait_ready(503, Duration::from_secs(15));
    csi_node.wait_ready(200, Duration::from_secs(1));
    for d in [&mut gw, &mut storage, &mut csi, &mut csi_node] {
        let st = d.stop();
        assert!(st.success(), "{} exited with {st}\n{}", d.name, d.tail());
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn portal_of(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("portal ready"))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    Some(addr.trim_matches('"').to_string())
}

fn metric_text(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
