//! The manager's Raft guarantees, proven with real `ironsan manager` processes: a leader killed
//! under load (3 and 5 members), a partitioned leader (network namespaces), a full restart from
//! snapshots, membership changes under load (and right after an election), snapshot install on
//! a lagging member, a wiped data dir, and requests to a minority.
//!
//! Under `cargo test` the tests of this file run one at a time (a process-wide lock), so the
//! election times they print are not inflated by each other; nextest runs each in its own
//! process, which is safe too: every group has its own ports and data dirs, and the partition
//! test names its namespaces, links and subnet after its pid. That test needs root and
//! iproute2. Fake storage nodes are registered for placement and never heartbeat, so every
//! member runs with long node timeouts. A failure prints the tail of every member's log.

mod managers;
// Shared with the fault suite, which uses more of it.
#[allow(dead_code)]
#[path = "cluster/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ironsan_common::proto::manager::{
    self as pb, manager_client::ManagerClient, AddMemberRequest, ClusterStatus,
    CreateVolumeRequest, Disk, DiskState, ListVolumesRequest, RegisterNodeRequest,
    RemoveMemberRequest, TransferLeaderRequest, Volume, VolumeRef,
};
use managers::{status, tail, Group};
use netns::Netns;
use tonic::transport::Channel;
use tonic::Code;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Every member: 50 ms Raft ticks (elections after 0.5-1 s of silence); fake storage nodes are
/// never declared Down.
const FLAGS: &[&str] = &[
    "--raft-tick",
    "50ms",
    "--node-timeout",
    "60m",
    "--recovery-grace",
    "60m",
];

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test body alone, on its own runtime.
fn run<F: std::future::Future<Output = ()>>(body: F) {
    let _serial: MutexGuard<'_, ()> = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

fn flags(more: &[&'static str]) -> Vec<&'static str> {
    FLAGS.iter().chain(more).copied().collect()
}

// ---------- diagnostics ----------

/// The tail of every member's log, for failure messages.
fn logs(g: &Group) -> String {
    g.members
        .values()
        .map(|m| format!("\n--- member {} ({})\n{}", m.id, m.addr, tail(&m.log(), 40)))
        .collect()
}

macro_rules! check {
    ($g:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            panic!("{}\nmember logs:{}", format!($($fmt)+), logs(&$g));
        }
    };
}

// ---------- clients ----------

fn channel(addr: &str, timeout: Duration) -> ManagerClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .connect_lazy();
    ManagerClient::new(ch)
}

/// A client bound to one member, answering within 8 s.
fn one(addr: &str) -> ManagerClient<Channel> {
    channel(addr, Duration::from_secs(8))
}

fn create_req(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        size: 64 * MIB,
        replicas: 3,
        chunk_size: 0,
        qos: None,
    }
}

fn by_name(name: &str) -> VolumeRef {
    VolumeRef {
        id: 0,
        name: name.into(),
    }
}

/// What a client may retry on another member: no leader here, a timeout, a dead connection.
fn retryable(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// The failover loop a real client needs: try members in turn on UNAVAILABLE and transport
/// errors. A create whose answer was lost may have committed anyway: when its retry finds the
/// name taken, it counts as done (names are unique per test, so nobody else made it).
#[derive(Clone)]
struct Failover {
    addrs: Arc<Mutex<Vec<String>>>,
    clients: HashMap<String, ManagerClient<Channel>>,
    next: usize,
    retries: Arc<AtomicU64>,
}

impl Failover {
    fn new(addrs: Vec<String>) -> Failover {
        Failover {
            addrs: Arc::new(Mutex::new(addrs)),
            clients: HashMap::new(),
            next: 0,
            retries: Arc::new(AtomicU64::new(0)),
        }
    }

    fn set_addrs(&self, addrs: Vec<String>) {
        *self.addrs.lock().unwrap() = addrs;
    }

    fn pick(&mut self) -> ManagerClient<Channel> {
        let addrs = self.addrs.lock().unwrap().clone();
        let addr = addrs[self.next % addrs.len()].clone();
        self.clients
            .entry(addr.clone())
            .or_insert_with(|| channel(&addr, Duration::from_secs(6)))
            .clone()
    }

    async fn create(&mut self, name: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut ambiguous = false;
        let mut errors = Vec::new();
        loop {
            let mut c = self.pick();
            match c.create_volume(create_req(name)).await {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Code::AlreadyExists && ambiguous => return Ok(()),
                Err(e) if retryable(e.code()) => {
                    ambiguous = true;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    if errors.len() < 20 {
                        errors.push(format!("{:?}: {}", e.code(), e.message()));
                    }
                    self.next += 1;
                    if Instant::now() > deadline {
                        return Err(format!("create {name}: no member took it: {errors:#?}"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("create {name}: {:?}: {}", e.code(), e.message())),
            }
        }
    }
}

/// A task creating volumes `PREFIX-0`, `PREFIX-1`, ... through a failover client until stopped.
struct Stream {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    client: Failover,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Stream {
    fn start(addrs: Vec<String>, prefix: &str) -> Stream {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client = Failover::new(addrs);
        let (a, s, mut c, prefix) = (
            acked.clone(),
            stop.clone(),
            client.clone(),
            prefix.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let name = format!("{prefix}-{i}");
                c.create(&name, Duration::from_secs(20)).await?;
                a.lock().unwrap().push((name, Instant::now()));
                i += 1;
            }
            Ok(())
        });
        Stream {
            acked,
            stop,
            client,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` creates are acknowledged in all.
    async fn reach(&mut self, g: &Group, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count() < n {
            if self.task.is_finished() {
                let r = (&mut self.task).await.unwrap();
                check!(g, false, "the create stream ended early: {r:?}");
            }
            check!(
                g,
                Instant::now() < deadline,
                "only {} of {n} creates acknowledged within {within:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the stream; returns the acknowledged names with their times.
    async fn finish(self, g: &Group) -> Vec<(String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.task.await.unwrap();
        check!(g, r.is_ok(), "create stream failed: {r:?}");
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

async fn register_nodes(g: &Group, addr: &str) {
    let mut c = one(addr);
    for id in ["n1", "n2", "n3"] {
        let r = c
            .register_node(RegisterNodeRequest {
                id: id.into(),
                addr: format!("127.0.0.1:{}", 9000 + id.len()),
                zone: String::new(),
                disks: vec![Disk {
                    path: "/data".into(),
                    state: DiskState::DiskHealthy as i32,
                    capacity: 100 * GIB,
                    free: 100 * GIB,
                }],
            })
            .await;
        check!(g, r.is_ok(), "register {id}: {r:?}");
    }
}

/// ListVolumes on exactly this member, retried while it has no leader to read through.
async fn list_on(g: &Group, addr: &str, within: Duration) -> Vec<Volume> {
    let deadline = Instant::now() + within;
    let mut c = one(addr);
    loop {
        match c.list_volumes(ListVolumesRequest::default()).await {
            Ok(r) => return r.into_inner().volumes,
            Err(e) if retryable(e.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => check!(g, false, "ListVolumes on {addr}: {e}"),
        }
    }
}

fn member_ids(r: &pb::MembershipResponse) -> Vec<u64> {
    r.members.iter().map(|m| m.id).collect()
}

fn names(vs: &[Volume]) -> Vec<String> {
    vs.iter().map(|v| v.name.clone()).collect()
}

/// Every member in `ids` lists the same volumes, without duplicate names, holding every name in
/// `acked`; returns that list.
async fn check_everywhere(g: &Group, ids: &[u64], acked: &[String]) -> Vec<Volume> {
    let mut first: Option<(u64, Vec<Volume>)> = None;
    for &id in ids {
        let list = list_on(g, &g.addr(id), Duration::from_secs(15)).await;
        let set: BTreeSet<&String> = list.iter().map(|v| &v.name).collect();
        check!(
            g,
            set.len() == list.len(),
            "member {id} lists duplicate names: {:?}",
            names(&list)
        );
        let missing: Vec<&String> = acked.iter().filter(|n| !set.contains(n)).collect();
        check!(
            g,
            missing.is_empty(),
            "member {id} lacks {} acknowledged creates: {missing:?}",
            missing.len()
        );
        match &first {
            None => first = Some((id, list)),
            Some((fid, fl)) => check!(
                g,
                fl == &list,
                "member {id} and member {fid} list different volumes:\n{:?}\n{:?}",
                names(&list),
                names(fl)
            ),
        }
    }
    first.map(|(_, l)| l).unwrap_or_default()
}

/// Status of every member in `ids` (errors as text).
async fn statuses(g: &Group, ids: &[u64]) -> BTreeMap<u64, Result<ClusterStatus, String>> {
    statuses_at(&addrs_of(g, ids)).await
}

fn addrs_of(g: &Group, ids: &[u64]) -> Vec<(u64, String)> {
    ids.iter().map(|&id| (id, g.addr(id))).collect()
}

async fn statuses_at(addrs: &[(u64, String)]) -> BTreeMap<u64, Result<ClusterStatus, String>> {
    let mut tasks = Vec::new();
    for (id, addr) in addrs.iter().cloned() {
        tasks.push((id, tokio::spawn(async move { status(&addr).await })));
    }
    let mut out = BTreeMap::new();
    for (id, t) in tasks {
        out.insert(id, t.await.unwrap().map_err(|e| e.to_string()));
    }
    out
}

/// Polls until every member of `ids` names the same leader, one of `ids` and not `not`;
/// returns it and how long that took.
async fn agreed_leader(g: &Group, ids: &[u64], not: u64, within: Duration) -> (u64, Duration) {
    let r = agreed_leader_at(addrs_of(g, ids), not, within).await;
    check!(g, r.is_ok(), "{}", r.unwrap_err());
    r.unwrap()
}

async fn agreed_leader_at(
    addrs: Vec<(u64, String)>,
    not: u64,
    within: Duration,
) -> Result<(u64, Duration), String> {
    let start = Instant::now();
    let ids: Vec<u64> = addrs.iter().map(|(id, _)| *id).collect();
    loop {
        let st = statuses_at(&addrs).await;
        let leaders: BTreeSet<u64> = st
            .values()
            .map(|s| s.as_ref().map_or(0, |s| s.leader))
            .collect();
        if leaders.len() == 1 {
            let l = *leaders.iter().next().unwrap();
            if l != 0 && l != not && ids.contains(&l) {
                return Ok((l, start.elapsed()));
            }
        }
        if start.elapsed() > within {
            return Err(format!(
                "members {ids:?} agreed on no leader (other than {not}) within {within:?}: {:?}",
                st.iter()
                    .map(|(id, s)| (id, s.as_ref().map(|s| (s.leader, s.term))))
                    .collect::<Vec<_>>()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn leader_of(g: &mut Group) -> u64 {
    g.leader(Duration::from_secs(15)).await
}

/// SIGTERM every running member in `ids` at once, then waits for each; returns exit statuses.
fn stop_all(g: &mut Group, ids: &[u64]) -> Vec<(u64, std::process::ExitStatus)> {
    for id in ids {
        if let Some(c) = &g.members[id].child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }
    ids.iter()
        .map(|&id| (id, g.members.get_mut(&id).unwrap().stop()))
        .collect()
}

// ---------- 1. leader kill under load ----------

async fn leader_kill_under_load(n: u64) {
    let mut g = Group::start(n, FLAGS);
    let old = leader_of(&mut g).await;
    register_nodes(&g, &g.addr(old)).await;
    let all: Vec<u64> = (1..=n).collect();
    let addrs = all.iter().map(|&id| g.addr(id)).collect();
    let mut stream = Stream::start(addrs, "v");
    stream.reach(&g, 50, Duration::from_secs(30)).await;

    let old = leader_of(&mut g).await;
    let before = stream.count();
    let killed_at = Instant::now();
    g.members.get_mut(&old).unwrap().kill();
    let survivors: Vec<u64> = all.iter().copied().filter(|&id| id != old).collect();
    let (new, took) = agreed_leader(&g, &survivors, old, Duration::from_secs(5)).await;
    println!("{n} members: leader {old} killed (SIGKILL), survivors agreed on leader {new} after {took:?}");
    check!(g, took <= Duration::from_secs(5), "election took {took:?}");

    // The stream goes on: 50 more acknowledged creates.
    stream.reach(&g, before + 50, Duration::from_secs(20)).await;
    let retries = stream.client.retries.load(Ordering::Relaxed);
    let acked = stream.finish(&g).await;
    let first_after = acked
        .iter()
        .map(|(_, t)| *t)
        .find(|t| *t > killed_at)
        .unwrap();
    let longest_gap = acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    println!(
        "{n} members: {} creates acknowledged, {retries} retried attempts, first acknowledgement \
         {:?} after the kill, longest gap between acknowledgements {longest_gap:?}",
        acked.len(),
        first_after - killed_at
    );
    let acked: Vec<String> = acked.into_iter().map(|(n, _)| n).collect();
    let list = check_everywhere(&g, &survivors, &acked).await;
    check!(
        g,
        list.len() == acked.len(),
        "volumes beyond the acknowledged: {}",
        list.len()
    );

    // The killed member comes back and converges to the same list.
    g.spawn(old, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let again = list_on(&g, &g.addr(old), Duration::from_secs(15)).await;
        if again == list {
            break;
        }
        check!(
            g,
            Instant::now() < deadline,
            "restarted member {old} lists {} volumes, the group {}",
            again.len(),
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_everywhere(&g, &all, &acked).await;
}

#[test]
fn leader_kill_under_load_3() {
    run(leader_kill_under_load(3));
}

#[test]
fn leader_kill_under_load_5() {
    run(leader_kill_under_load(5));
}

// ---------- 2. partition (network namespaces) ----------

#[test]
fn partitioned_leader_steps_down_and_converges() {
    run(async {
        let mut net = Netns::setup(3);
        let members = (1..=3)
            .map(|i| (format!("{}:7400", net.ip(i)), net.prefix(i)))
            .collect();
        // Declared after `net`, so dropped (members killed) before the namespaces go.
        let mut g = Group::start_at(members, FLAGS);
        let old = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(old)).await;
        let mut c = one(&g.addr(old));
        for i in 0..20 {
            let r = c.create_volume(create_req(&format!("before-{i}"))).await;
            check!(g, r.is_ok(), "create before the partition: {r:?}");
        }

        net.partition(old as u32, true)
            .expect("partition the leader");
        let cut_at = Instant::now();
        // Watched from the cut, while the old leader is probed below.
        let majority: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
        let election = tokio::spawn(agreed_leader_at(
            addrs_of(&g, &majority),
            old,
            Duration::from_secs(10),
        ));
        // A write to the cut-off leader can never succeed: it cannot reach a quorum.
        let old_addr = g.addr(old);
        let step_down = tokio::spawn(async move {
            loop {
                if let Ok(s) = status(&old_addr).await {
                    if s.leader != old {
                        return Ok(cut_at.elapsed());
                    }
                }
                if cut_at.elapsed() > Duration::from_secs(5) {
                    return Err(format!("partitioned leader {old} still leads after 5 s"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // While it still believes it leads: a write cannot commit without a quorum, and a
        // linearizable read cannot be confirmed by one.
        let oldc = one(&g.addr(old));
        let (mut c1, mut c2) = (oldc.clone(), oldc.clone());
        let (w, l) = tokio::join!(
            async {
                let r = c1.create_volume(create_req("during-partition")).await;
                (r, cut_at.elapsed())
            },
            async {
                let r = c2.list_volumes(ListVolumesRequest::default()).await;
                (r, cut_at.elapsed())
            },
        );
        let refused = |code: Code| matches!(code, Code::Unavailable | Code::DeadlineExceeded);
        check!(
            g,
            matches!(&w.0, Err(e) if refused(e.code())),
            "create on the partitioned leader: {:?}",
            w.0
        );
        check!(
            g,
            matches!(&l.0, Err(e) if refused(e.code())),
            "ListVolumes on the partitioned leader: {:?}",
            l.0.map(|r| r.into_inner().volumes.len())
        );
        // It steps down (check-quorum), though it keeps answering Status.
        let stepped_down = step_down.await.unwrap();
        check!(g, stepped_down.is_ok(), "{}", stepped_down.unwrap_err());
        println!(
            "partitioned leader {old}: stepped down after {:?}; the create it took was refused \
             after {:?} ({:?}), the read after {:?} ({:?})",
            stepped_down.unwrap(),
            w.1,
            w.0.err().map(|e| e.code()),
            l.1,
            l.0.err().map(|e| e.code())
        );
        // Refused writes and reads, asked at once (a read waits out its 3 s ReadIndex timeout).
        let (mut c1, mut c2, mut c3) = (oldc.clone(), oldc.clone(), oldc.clone());
        let (w, l, r) = tokio::join!(
            c1.create_volume(create_req("during-partition-2")),
            c2.list_volumes(ListVolumesRequest::default()),
            c3.get_volume(by_name("before-0")),
        );
        check!(
            g,
            matches!(&w, Err(e) if refused(e.code())),
            "create on the stepped-down leader: {w:?}"
        );
        check!(
            g,
            matches!(&l, Err(e) if refused(e.code())),
            "linearizable ListVolumes on the cut-off member: {:?}",
            l.map(|r| r.into_inner().volumes.len())
        );
        check!(
            g,
            matches!(&r, Err(e) if refused(e.code())),
            "linearizable GetVolume on the cut-off member: {r:?}"
        );
        println!(
            "cut-off member {old} refused: create {:?}, ListVolumes {:?}, GetVolume {:?}",
            w.err().map(|e| e.code()),
            l.err().map(|e| e.code()),
            r.err().map(|e| e.code())
        );

        // The majority elects a leader and takes writes.
        let r = election.await.unwrap();
        check!(g, r.is_ok(), "{}", r.unwrap_err());
        let (new, took) = r.unwrap();
        println!("majority {majority:?} agreed on leader {new} {took:?} after the cut");
        let mut fo = Failover::new(majority.iter().map(|&id| g.addr(id)).collect());
        for i in 0..20 {
            let r = fo
                .create(&format!("majority-{i}"), Duration::from_secs(10))
                .await;
            check!(g, r.is_ok(), "create on the majority: {r:?}");
        }

        // Heal: the old leader follows the new one and holds exactly the majority's state.
        net.partition(old as u32, false)
            .expect("heal the partition");
        let healed_at = Instant::now();
        loop {
            let s = status(&g.addr(old)).await;
            if matches!(&s, Ok(s) if s.leader == new) {
                break;
            }
            check!(
                g,
                healed_at.elapsed() < Duration::from_secs(20),
                "healed member {old} does not follow leader {new}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "healed member {old} follows leader {new} after {:?}",
            healed_at.elapsed()
        );
        let acked: Vec<String> = (0..20)
            .map(|i| format!("before-{i}"))
            .chain((0..20).map(|i| format!("majority-{i}")))
            .collect();
        let list = check_everywhere(&g, &[1, 2, 3], &acked).await;
        for name in ["during-partition", "during-partition-2"] {
            // check_everywhere proved the lists equal: present on one means present on all.
            let present = list.iter().any(|v| v.name == name);
            println!(
                "{name}: {}",
                if present {
                    "committed everywhere"
                } else {
                    "nowhere"
                }
            );
        }
        check!(
            g,
            list.len() == acked.len(),
            "unexpected volumes: {:?}",
            names(&list)
        );
    });
}

// ---------- 3. restart all members ----------

/// Publishes `name` read-only to n1 and n2 and attaches n1's gateway with its portal, each
/// through a follower.
async fn publish_through_followers(g: &Group, leader: u64, name: &str) {
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let vol = || Some(by_name(name));
    for (node, &member) in ["n1", "n2"].iter().zip(&followers) {
        let r = one(&g.addr(member))
            .publish(pb::PublishRequest {
                volume: vol(),
                node: node.to_string(),
                readonly: true,
                lease_ms: 0,
            })
            .await;
        check!(
            g,
            r.is_ok(),
            "publish {name} to {node} via member {member}: {r:?}"
        );
    }
    let r = one(&g.addr(followers[0]))
        .attach(pb::AttachRequest {
            volume: vol(),
            gateway: "n1".into(),
            lease_ms: 0,
            portal: "10.1.1.1:3260".into(),
        })
        .await
        .map(|r| r.into_inner());
    check!(
        g,
        r.as_ref().is_ok_and(|a| a.published == ["n1", "n2"]),
        "n1's gateway attaching {name}: {r:?}"
    );
}

#[test]
fn restart_all_members_from_snapshots() {
    run(async {
        let mut g = Group::start(3, &flags(&["--snapshot-every", "50"]));
        let leader = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(leader)).await;
        let mut c = one(&g.addr(leader));
        let names: Vec<String> = (0..200).map(|i| format!("r-{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            let r = c.create_volume(create_req(n)).await;
            check!(g, r.is_ok(), "create {n}: {r:?}");
            if i == 20 {
                // Published through the followers (forwarded to the leader), early enough to
                // be restored from a snapshot rather than the log tail.
                publish_through_followers(&g, leader, n).await;
            }
        }
        let before = check_everywhere(&g, &[1, 2, 3], &names).await;
        let st = statuses(&g, &[1, 2, 3]).await;
        for (id, s) in &st {
            let s = s.as_ref().unwrap();
            check!(
                g,
                s.snapshot_index >= 150,
                "member {id} snapshot index {}",
                s.snapshot_index
            );
        }

        let applied_before: BTreeMap<u64, u64> = st
            .iter()
            .map(|(id, s)| (*id, s.as_ref().unwrap().applied_index))
            .collect();
        let t = Instant::now();
        for (id, s) in stop_all(&mut g, &[1, 2, 3]) {
            check!(g, s.success(), "member {id} exit on SIGTERM: {s:?}");
        }
        println!("3 members stopped cleanly in {:?}", t.elapsed());
        for id in 1..=3 {
            g.spawn(id, &[]);
        }
        leader_of(&mut g).await;
        let after = check_everywhere(&g, &[1, 2, 3], &names).await;
        check!(g, after == before, "state after the restart differs");
        let a = after
            .iter()
            .find(|v| v.name == "r-20")
            .and_then(|v| v.attachment.clone())
            .unwrap_or_default();
        check!(
            g,
            a.gateway == "n1"
                && a.readonly
                && a.published == ["n1", "n2"]
                && a.portal == "10.1.1.1:3260",
            "publication after the restart: {a:?}"
        );
        for id in 1..=3u64 {
            // Restored from the snapshot, then the log tail replayed.
            let log = g.members[&id].log();
            let started: Vec<u64> = log
                .lines()
                .filter(|l| l.contains("raft member started"))
                .filter_map(|l| l.split("applied=").nth(1))
                .filter_map(|v| v.split_whitespace().next()?.parse().ok())
                .collect();
            check!(
                g,
                started.len() == 2 && started[1] > 0 && started[1] < applied_before[&id],
                "member {id} did not restart from a snapshot plus a log tail: started at \
                 {started:?}, had applied {}",
                applied_before[&id]
            );
        }
        let r = one(&g.addr(2))
            .create_volume(create_req("after-restart"))
            .await;
        check!(g, r.is_ok(), "create after the restart: {r:?}");
        let mut all = names.clone();
        all.push("after-restart".into());
        check_everywhere(&g, &[1, 2, 3], &all).await;
    });
}

// ---------- 4. membership under load ----------

#[test]
fn membership_changes_under_load() {
    run(async {
        let mut g = Group::start(3, FLAGS);
        let leader = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(leader)).await;
        let mut stream = Stream::start((1..=3).map(|id| g.addr(id)).collect(), "m");
        stream.reach(&g, 20, Duration::from_secs(20)).await;

        // Add member 4 under load, then start it.
        let addr4 = g.reserve(4);
        let r = one(&g.addr(1))
            .add_member(AddMemberRequest {
                id: 4,
                addr: addr4.clone(),
            })
            .await;
        check!(g, r.is_ok(), "AddMember 4: {r:?}");
        let m = member_ids(r.unwrap().get_ref());
        check!(g, m == [1, 2, 3, 4], "AddMember 4 answered members {m:?}");
        g.spawn(4, &["--join"]);
        let t = Instant::now();
        loop {
            let st = statuses(&g, &[1, 2, 3, 4]).await;
            let leader_applied = st
                .values()
                .filter_map(|s| s.as_ref().ok())
                .find(|s| s.leader == s.answered_by)
                .map(|s| s.applied_index);
            let s4 = st[&4].as_ref().ok();
            if let (Some(la), Some(s4)) = (leader_applied, s4) {
                if s4.applied_index + 10 >= la && s4.members.iter().filter(|m| m.voter).count() == 4
                {
                    println!(
                        "member 4 caught up (applied {} of {la}) in {:?}",
                        s4.applied_index,
                        t.elapsed()
                    );
                    break;
                }
            }
            check!(
                g,
                t.elapsed() < Duration::from_secs(15),
                "member 4 never caught up: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Under load the lists grow: the leader's before ⊆ member 4's ⊆ the leader's after.
        let leader = leader_of(&mut g).await;
        let l1 = list_on(&g, &g.addr(leader), Duration::from_secs(10)).await;
        let m4 = list_on(&g, &g.addr(4), Duration::from_secs(10)).await;
        let l2 = list_on(&g, &g.addr(leader), Duration::from_secs(10)).await;
        check!(
            g,
            m4.starts_with(&l1) && l2.starts_with(&m4),
            "member 4's list is not between two of the leader's: {} / {} / {}",
            l1.len(),
            m4.len(),
            l2.len()
        );
        stream
            .client
            .set_addrs((1..=4).map(|id| g.addr(id)).collect());

        // Remove a follower of the first three, and stop it.
        let victim = (1..=3).find(|&id| id != leader).unwrap();
        let r = one(&g.addr(4))
            .remove_member(RemoveMemberRequest { id: victim })
            .await;
        check!(g, r.is_ok(), "RemoveMember {victim}: {r:?}");
        let m = member_ids(r.unwrap().get_ref());
        check!(
            g,
            !m.contains(&victim),
            "RemoveMember {victim} answered members {m:?}"
        );
        let s = g.members.get_mut(&victim).unwrap().stop();
        check!(g, s.success(), "removed member {victim} exit: {s:?}");
        let left: Vec<u64> = (1..=4).filter(|&id| id != victim).collect();
        stream
            .client
            .set_addrs(left.iter().map(|&id| g.addr(id)).collect());
        let n = stream.count();
        stream.reach(&g, n + 20, Duration::from_secs(20)).await;

        // The leader cannot be removed; after a transfer it can.
        let r = one(&g.addr(4))
            .remove_member(RemoveMemberRequest { id: leader })
            .await;
        check!(
            g,
            matches!(&r, Err(e) if e.code() == Code::FailedPrecondition),
            "RemoveMember of the leader {leader}: {r:?}"
        );
        let to = 4;
        let r = one(&g.addr(leader))
            .transfer_leader(TransferLeaderRequest { to })
            .await;
        check!(g, r.is_ok(), "TransferLeader to {to}: {r:?}");
        // At once, as an operator's script would: the new leader takes the removal.
        let t = Instant::now();
        let r = one(&g.addr(to))
            .remove_member(RemoveMemberRequest { id: leader })
            .await;
        check!(
            g,
            r.is_ok(),
            "RemoveMember of the old leader {leader} right after the transfer: {r:?} after {:?}",
            t.elapsed()
        );
        let left: Vec<u64> = left.into_iter().filter(|&id| id != leader).collect();
        let m = member_ids(r.unwrap().get_ref());
        check!(g, m == left, "RemoveMember {leader} answered members {m:?}");
        let (now, took) = agreed_leader(&g, &left, 0, Duration::from_secs(5)).await;
        check!(g, now == to, "leadership went to {now}, not {to}");
        println!(
            "leadership moved {leader} -> {to}, {leader} removed; {left:?} agree after {took:?}"
        );
        let s = g.members.get_mut(&leader).unwrap().stop();
        check!(g, s.success(), "removed member {leader} exit: {s:?}");
        stream
            .client
            .set_addrs(left.iter().map(|&id| g.addr(id)).collect());
        let n = stream.count();
        stream.reach(&g, n + 20, Duration::from_secs(20)).await;
        let retries = stream.client.retries.load(Ordering::Relaxed);
        let acked: Vec<String> = stream
            .finish(&g)
            .await
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        println!(
            "{} creates acknowledged across the changes ({retries} retried attempts)",
            acked.len()
        );
        check_everywhere(&g, &left, &acked).await;
        for (id, s) in statuses(&g, &left).await {
            let s = s.unwrap();
            let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            check!(
                g,
                voters == left,
                "member {id} sees voters {voters:?}, expected {left:?}"
            );
        }
    });
}

// ---------- 5. snapshot install ----------

#[test]
fn lagging_member_gets_a_snapshot() {
    run(async {
        let mut g = Group::start(3, &flags(&["--snapshot-every", "20"]));
        let leader = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(leader)).await;
        let lagging = (1..=3).rev().find(|&id| id != leader).unwrap();
        let s = g.members.get_mut(&lagging).unwrap().stop();
        check!(g, s.success(), "member {lagging} exit: {s:?}");
        let up: Vec<u64> = (1..=3).filter(|&id| id != lagging).collect();
        let mut fo = Failover::new(up.iter().map(|&id| g.addr(id)).collect());
        let names: Vec<String> = (0..150).map(|i| format!("s-{i}")).collect();
        for n in &names {
            let r = fo.create(n, Duration::from_secs(10)).await;
            check!(g, r.is_ok(), "{r:?}");
        }
        g.spawn(lagging, &[]);
        let t = Instant::now();
        check_everywhere(&g, &[1, 2, 3], &names).await;
        println!("member {lagging} caught up in {:?}", t.elapsed());
        let log = g.members[&lagging].log();
        check!(
            g,
            log.contains("installed snapshot from leader"),
            "member {lagging} caught up without a snapshot"
        );
    });
}

// ---------- 6. wiped data dir ----------

#[test]
fn wiped_member_refuses_to_start() {
    run(async {
        let mut g = Group::start(3, FLAGS);
        let leader = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(leader)).await;
        let r = one(&g.addr(leader)).create_volume(create_req("w-0")).await;
        check!(g, r.is_ok(), "{r:?}");
        let wiped = (1..=3).rev().find(|&id| id != leader).unwrap();
        // The leader records members that hold entries; only those are refused when empty.
        let t = Instant::now();
        while !statuses(&g, &[leader]).await[&leader]
            .as_ref()
            .is_ok_and(|s| s.members_seen.contains(&wiped))
        {
            check!(
                g,
                t.elapsed() < Duration::from_secs(5),
                "member {wiped} never recorded as seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = g.members.get_mut(&wiped).unwrap().stop();
        check!(g, s.success(), "member {wiped} exit: {s:?}");
        std::fs::remove_dir_all(&g.members[&wiped].dir).unwrap();
        g.spawn(wiped, &[]);
        let t = Instant::now();
        let exit = loop {
            let m = g.members.get_mut(&wiped).unwrap();
            if let Some(s) = m.child.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            check!(
                g,
                t.elapsed() < Duration::from_secs(10),
                "wiped member {wiped} keeps running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The log reader thread may lag the exit a little.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = g.members[&wiped].log();
        println!(
            "wiped member {wiped} exited with {exit:?} after {:?}",
            t.elapsed()
        );
        check!(
            g,
            !exit.success(),
            "wiped member {wiped} exited successfully"
        );
        check!(
            g,
            log.contains("remove-member") && log.contains("add-member"),
            "wiped member's refusal does not say how to rejoin"
        );
        g.members.get_mut(&wiped).unwrap().child = None;
        let up: Vec<u64> = (1..=3).filter(|&id| id != wiped).collect();
        agreed_leader(&g, &up, 0, Duration::from_secs(5)).await;
        let r = one(&g.addr(up[0])).create_volume(create_req("w-1")).await;
        check!(g, r.is_ok(), "create after the refusal: {r:?}");
        check_everywhere(&g, &up, &["w-0".into(), "w-1".into()]).await;
    });
}

/// An initial member that starts after the others have elected and committed is not mistaken
/// for a wiped one: it never held entries, so it joins (a StatefulSet's pods start unevenly).
#[test]
fn late_initial_member_joins() {
    run(async {
        let mut g = Group::prepare(3, FLAGS);
        g.spawn(1, &[]);
        g.spawn(2, &[]);
        let leader = agreed_leader(&g, &[1, 2], 0, Duration::from_secs(10))
            .await
            .0;
        register_nodes(&g, &g.addr(leader)).await;
        let r = one(&g.addr(leader))
            .create_volume(create_req("late-0"))
            .await;
        check!(g, r.is_ok(), "{r:?}");
        g.spawn(3, &[]);
        agreed_leader(&g, &[1, 2, 3], 0, Duration::from_secs(10)).await;
        check_everywhere(&g, &[1, 2, 3], &["late-0".into()]).await;
        check!(
            g,
            g.members[&3]
                .log()
                .contains("never joined it and starts fresh"),
            "member 3 took the late-start path"
        );
    });
}

// ---------- 7. requests to a minority ----------

#[test]
fn minority_refuses_and_nothing_is_half_applied() {
    run(async {
        let mut g = Group::start(3, FLAGS);
        let survivor = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(survivor)).await;
        let r = one(&g.addr(survivor))
            .create_volume(create_req("x-0"))
            .await;
        check!(g, r.is_ok(), "{r:?}");
        let others: Vec<u64> = (1..=3).filter(|&id| id != survivor).collect();
        for id in &others {
            g.members.get_mut(id).unwrap().kill();
        }
        // The survivor was the leader: its proposals can no longer commit.
        let mut c = channel(&g.addr(survivor), Duration::from_secs(15));
        for name in ["orphan-1", "orphan-2"] {
            let t = Instant::now();
            let r = c.create_volume(create_req(name)).await;
            let took = t.elapsed();
            println!(
                "create {name} on the minority: {:?} after {took:?}",
                r.as_ref().map_err(|e| e.code())
            );
            check!(
                g,
                matches!(&r, Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded)),
                "create {name} on a minority: {r:?}"
            );
            check!(
                g,
                took < Duration::from_secs(10),
                "create {name} answered after {took:?}"
            );
        }
        let r = c.get_volume(by_name("x-0")).await;
        check!(
            g,
            matches!(&r, Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded)),
            "linearizable read on a minority: {r:?}"
        );
        for id in &others {
            g.spawn(*id, &[]);
        }
        leader_of(&mut g).await;
        let list = check_everywhere(&g, &[1, 2, 3], &["x-0".into()]).await;
        for name in ["orphan-1", "orphan-2"] {
            let present = list.iter().any(|v| v.name == name);
            println!(
                "{name}: {}",
                if present {
                    "committed everywhere"
                } else {
                    "nowhere"
                }
            );
        }
    });
}

fn signal(g: &Group, id: u64, sig: i32) {
    if let Some(c) = &g.members[&id].child {
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
    }
}

// ---------- 4b. a membership change right after an election ----------

/// A newly elected leader counts every entry it inherited as a possibly pending configuration
/// change until it has applied them; raft-rs turns a change proposed meanwhile into an empty
/// entry. The change must not be lost (it used to be: the call timed out although the group was
/// healthy, and every later change was refused as "in progress" until the next election).
///
/// Made likely here: the leader's one live follower is stopped (SIGSTOP) the moment the new
/// leader is seen, so its inherited tail stays unapplied while the change arrives.
#[test]
fn membership_change_right_after_an_election() {
    run(async {
        let mut g = Group::start(3, FLAGS);
        let l = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(l)).await;
        let mut stream = Stream::start((1..=3).map(|id| g.addr(id)).collect(), "e");
        stream.reach(&g, 20, Duration::from_secs(10)).await;
        let l = leader_of(&mut g).await;
        let x = (1..=3).find(|&id| id != l).unwrap();
        let f = (1..=3).find(|&id| id != l && id != x).unwrap();
        // f falls behind, the leader dies, f comes back and elects x (x's log is longer).
        signal(&g, f, libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        g.members.get_mut(&l).unwrap().kill();
        let mut c = channel(&g.addr(x), Duration::from_secs(1));
        signal(&g, f, libc::SIGCONT);
        let t = Instant::now();
        loop {
            if let Ok(s) = c.status(pb::StatusRequest {}).await {
                if s.get_ref().leader == x {
                    signal(&g, f, libc::SIGSTOP);
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(5) {
                signal(&g, f, libc::SIGCONT);
                check!(g, false, "member {x} was not elected");
            }
        }
        // The operator removes the dead member at once; f resumes before the election timeout.
        let addr = g.addr(x);
        let remove = tokio::spawn(async move {
            let t = Instant::now();
            let r = one(&addr)
                .remove_member(RemoveMemberRequest { id: l })
                .await;
            (r, t.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        signal(&g, f, libc::SIGCONT);
        let (r, took) = remove.await.unwrap();
        println!(
            "RemoveMember {l} on the new leader {x}: {:?} after {took:?}",
            r.as_ref().map(|_| ()).map_err(|e| e.code())
        );
        check!(
            g,
            r.is_ok(),
            "RemoveMember {l} right after the election: {r:?}"
        );
        let members = member_ids(r.unwrap().get_ref());
        let mut left = vec![x, f];
        left.sort();
        check!(
            g,
            members == left,
            "RemoveMember answered members {members:?}"
        );
        let acked: Vec<String> = stream
            .finish(&g)
            .await
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        check_everywhere(&g, &left, &acked).await;
        let t = Instant::now();
        loop {
            let st = statuses(&g, &left).await;
            let ok = st.values().all(|s| {
                s.as_ref()
                    .is_ok_and(|s| s.members.iter().map(|m| m.id).collect::<Vec<_>>() == left)
            });
            if ok {
                break;
            }
            check!(
                g,
                t.elapsed() < Duration::from_secs(5),
                "members disagree: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

// ---------- 7. a leader stopped cleanly hands over ----------

/// SIGTERM on the leader (a rolling restart) hands leadership to a follower before the member
/// exits: the group has a new leader well within the election timeout, and a client's calls
/// stall for no longer than that.
#[test]
fn sigterm_leader_hands_over_without_an_election() {
    run(async {
        // The default 100 ms tick: an election after a leader vanishes takes 1-2 s.
        let election_min = Duration::from_secs(1);
        let mut g = Group::start(3, &["--node-timeout", "60m", "--recovery-grace", "60m"]);
        let old = leader_of(&mut g).await;
        register_nodes(&g, &g.addr(old)).await;
        let mut stream = Stream::start((1..=3).map(|id| g.addr(id)).collect(), "h");
        stream.reach(&g, 30, Duration::from_secs(20)).await;

        let old = leader_of(&mut g).await;
        let before = stream.count();
        let stopped_at = Instant::now();
        signal(&g, old, libc::SIGTERM);
        let survivors: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
        let (new, took) = agreed_leader(&g, &survivors, old, Duration::from_secs(5)).await;
        let exit = g.members.get_mut(&old).unwrap().stop();
        let exited_after = stopped_at.elapsed();
        println!(
            "leader {old} got SIGTERM: members {survivors:?} agreed on leader {new} after \
             {took:?}; {old} exited ({exit}) after {exited_after:?}"
        );
        check!(g, exit.success(), "member {old} exited with {exit}");
        check!(
            g,
            g.members[&old].log().contains("leadership handed over"),
            "member {old} did not log the handover"
        );
        check!(
            g,
            took < election_min / 2,
            "a new leader took {took:?} (an election takes at least {election_min:?})"
        );

        stream.reach(&g, before + 30, Duration::from_secs(20)).await;
        let retries = stream.client.retries.load(Ordering::Relaxed);
        let acked = stream.finish(&g).await;
        // The longest a client waited across the stop: from the last acknowledgement before
        // it to the first after, and every gap after it.
        let around: Vec<Instant> = acked
            .iter()
            .map(|(_, t)| *t)
            .skip(before.saturating_sub(1))
            .collect();
        let longest = around
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        println!(
            "{} creates acknowledged, {retries} retried attempts; longest gap between \
             acknowledgements across the stop {longest:?}",
            acked.len()
        );
        check!(
            g,
            longest < election_min,
            "creates stalled for {longest:?} across the leader's clean stop"
        );
        let acked: Vec<String> = acked.into_iter().map(|(n, _)| n).collect();
        check_everywhere(&g, &survivors, &acked).await;
    });
}
