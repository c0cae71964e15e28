//! Test fixture: a group of real `ironsan manager` processes on loopback (each on its own port
//! and data dir), restartable and killable one by one, and gRPC clients bound to one member.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ironsan_common::proto::manager::manager_client::ManagerClient;
use ironsan_common::proto::manager::{ClusterStatus, StatusRequest};
use tonic::transport::Channel;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One member process; killed on drop.
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub log: Arc<Mutex<String>>,
    /// A command the member runs under, e.g. `ip netns exec NS` (empty: run directly).
    pub prefix: Vec<String>,
}

impl Member {
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("member running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "member {} did not stop on SIGTERM",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A group of members; `extra` flags go to every member.
pub struct Group {
    pub members: BTreeMap<u64, Member>,
    pub root: tempfile::TempDir,
    pub extra: Vec<String>,
}

impl Group {
    fn empty(extra: &[&str]) -> Group {
        Group {
            members: BTreeMap::new(),
            root: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn name(&mut self, id: u64, addr: String, prefix: Vec<String>) {
        let dir = self.root.path().join(format!("m{id}"));
        self.members.insert(
            id,
            Member {
                id,
                addr,
                dir,
                child: None,
                log: Arc::new(Mutex::new(String::new())),
                prefix,
            },
        );
    }

    /// Starts `n` members that bootstrap one group.
    pub fn start(n: u64, extra: &[&str]) -> Group {
        let mut g = Group::prepare(n, extra);
        for id in 1..=n {
            g.spawn(id, &[]);
        }
        g
    }

    /// Names `n` members of one group (addresses, data dirs) without starting any.
    pub fn prepare(n: u64, extra: &[&str]) -> Group {
        let mut g = Group::empty(extra);
        for id in 1..=n {
            g.name(id, format!("127.0.0.1:{}", free_port()), Vec::new());
        }
        g
    }

    /// Starts members at given addresses, each run under its `prefix` command (ids from 1).
    pub fn start_at(members: Vec<(String, Vec<String>)>, extra: &[&str]) -> Group {
        let mut g = Group::empty(extra);
        let n = members.len() as u64;
        for (id, (addr, prefix)) in (1..).zip(members) {
            g.name(id, addr, prefix);
        }
        for id in 1..=n {
            g.spawn(id, &[]);
        }
        g
    }

    pub fn peers_of(&self, id: u64) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.id != id)
            .flat_map(|m| ["--peer".to_string(), format!("{}={}", m.id, m.addr)])
            .collect()
    }

    /// (Re)starts member `id` with its current data dir.
    pub fn spawn(&mut self, id: u64, more: &[&str]) {
        let peers = self.peers_of(id);
        let m = self.members.get_mut(&id).expect("member known");
        m.kill();
        let bin = env!("CARGO_BIN_EXE_ironsan");
        let mut cmd = match m.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("manager")
            .args(["--id", &id.to_string(), "--listen", &m.addr])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(&peers)
            .args(&self.extra)
            .args(more)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("ironsan runs");
        let stderr = child.stderr.take().unwrap();
        let log = m.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        m.child = Some(child);
    }

    /// Adds a member entry (not started) for `add-member` tests.
    pub fn reserve(&mut self, id: u64) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        self.name(id, addr.clone(), Vec::new());
        addr
    }

    pub fn addr(&self, id: u64) -> String {
        self.members[&id].addr.clone()
    }

    /// Every member's address, comma-separated (a `--manager` value).
    pub fn all_addrs(&self) -> String {
        self.members
            .values()
            .map(|m| m.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until the running members agree on one leader; returns it.
    pub async fn leader(&mut self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            let ids: Vec<u64> = self.members.keys().copied().collect();
            for id in ids {
                if !self.members.get_mut(&id).unwrap().running() {
                    continue;
                }
                if let Ok(s) = status(&self.addr(id)).await {
                    seen.push(s.leader);
                }
            }
            if let Some(&l) = seen.first() {
                if l != 0
                    && seen.iter().all(|&x| x == l)
                    && self.members.get_mut(&l).is_some_and(|m| m.running())
                {
                    return l;
                }
            }
            if Instant::now() > deadline {
                let logs: String = self
                    .members
                    .values()
                    .map(|m| format!("--- member {}\n{}", m.id, tail(&m.log(), 30)))
                    .collect();
                panic!("no agreed leader within {within:?} (seen {seen:?})\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A client bound to exactly one member (no failover), to see what that member says.
pub async fn client(addr: &str) -> ManagerClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(8))
        .connect_lazy();
    ManagerClient::new(ch)
}

pub async fn status(addr: &str) -> Result<ClusterStatus, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
        .connect_lazy();
    ManagerClient::new(ch)
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner())
}
