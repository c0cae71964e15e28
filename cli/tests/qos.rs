//! Per-volume QoS against the real `ironsan dev` with libiscsi initiators (one logged-in
//! session per worker thread, synchronous 4 KiB / 64 KiB writes):
//! - a volume limited to 200 write IOPS and one limited to 2 MiB/s of writes run within 5 % of
//!   their limits over 5 s, while an unlimited neighbour on the same gateway keeps most of the
//!   rate it has alone and is never throttled (`ironsan_gateway_qos_throttled_total`);
//! - a command larger than the bucket runs, after the time its debt takes;
//! - `ironsan volume qos` lowers and raises the limit live, the same sessions running on;
//!   read IOPS and read bandwidth limits hold too; `--clear` gives the volume its full speed
//!   back;
//! - bad limits are refused by the CLI (exit 1, one `error:` line) and over gRPC
//!   (INVALID_ARGUMENT / NOT_FOUND), changing nothing.
//!
//! The rates are measured after a warm-up that spends the bucket's burst (1 s at the rate).

#[path = "support/libiscsi.rs"]
mod libiscsi;
mod support;

use std::io::{Read, Write};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ironsan_common::manager_client::{Code, ManagerClient};
use ironsan_common::proto::manager::{SetVolumeQosRequest, VolumeQos, VolumeRef};
use libiscsi::{Session, SessionConfig};
use support::*;

const MIB: u64 = 1 << 20;
/// Time for the warm-up (the burst is spent) and for one measurement.
const WARM: Duration = Duration::from_millis(1500);
const WINDOW: Duration = Duration::from_secs(8);
/// The gateway polls the manager every second; a change is live within two polls.
const SETTLE: Duration = Duration::from_millis(2500);
/// Workers per volume (queue depth: each has one write in flight). Enough that a slow
/// replica write on a loaded machine leaves others waiting for tokens: the limiter, not the
/// client, sets the rate.
const WORKERS: usize = 12;

fn cli(managers: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .args(["--manager", managers])
        .env_remove("IRONSAN_MANAGER")
        .env_remove("RUST_LOG")
        .output()
        .expect("run ironsan")
}

fn cli_ok(managers: &str, args: &[&str]) -> String {
    let out = cli(managers, args);
    assert!(
        out.status.success(),
        "ironsan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A refused command: exit status 1 and exactly one line, `error: ...`, holding `needle`.
fn cli_refused(managers: &str, args: &[&str], needle: &str) {
    let out = cli(managers, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "ironsan {args:?}: {err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "ironsan {args:?}: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "ironsan {args:?}: {err}"
    );
}

/// Readers or writers on one volume: each worker its own session and its own region, moving
/// `block` bytes at a time until stopped.
struct Load {
    volume: String,
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(portal: &str, volume: &str, block: usize) -> Load {
        Self::start_io(portal, volume, block, true)
    }

    fn start_io(portal: &str, volume: &str, block: usize, write: bool) -> Load {
        let ops = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..WORKERS)
            .map(|i| {
                let mut cfg = SessionConfig::new(
                    &format!("iqn.2026-11.io.ironsan.test:qos-{volume}-{i}"),
                    &iqn(volume),
                );
                cfg.lun = lun();
                let (portal, ops, stop) = (portal.to_string(), ops.clone(), stop.clone());
                let volume = volume.to_string();
                thread::spawn(move || {
                    let mut s = Session::connect(&portal, &cfg)
                        .map_err(|e| format!("{volume} worker {i}: login: {e}"))?;
                    let mut data = pseudo_random(block, i as u64 + 1);
                    // Small, so that the warm-up has written it once: every measured write
                    // is an overwrite, whichever phase (first writes allocate and are slower).
                    let region = MIB;
                    let base = i as u64 * region;
                    let mut off = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let r = if write {
                            s.write(base + off, &data, false)
                        } else {
                            s.read(base + off, &mut data)
                        };
                        r.map_err(|e| format!("{volume} worker {i}: write={write}: {e}"))?;
                        ops.fetch_add(1, Ordering::Relaxed);
                        off = (off + block as u64) % region;
                    }
                    s.logout();
                    Ok(())
                })
            })
            .collect();
        Load {
            volume: volume.to_string(),
            ops,
            stop,
            workers,
        }
    }

    /// Operations per second over `WINDOW`, after `warm`.
    fn rate(&self, warm: Duration) -> f64 {
        rates(&[self], warm)[0]
    }

    /// A worker that stopped early failed (its session broke or a write failed).
    fn check_alive(&self) {
        assert!(
            self.workers.iter().all(|w| !w.is_finished()),
            "a worker of {} stopped early",
            self.volume
        );
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            if let Err(e) = w.join().expect("worker thread") {
                panic!("{e}");
            }
        }
    }
}

/// Operations per second of each load over the same `WINDOW`, after `warm`.
fn rates(loads: &[&Load], warm: Duration) -> Vec<f64> {
    thread::sleep(warm);
    let count = || -> Vec<u64> {
        loads
            .iter()
            .map(|l| l.ops.load(Ordering::Relaxed))
            .collect()
    };
    let (c0, t0) = (count(), Instant::now());
    thread::sleep(WINDOW);
    let (c1, secs) = (count(), t0.elapsed().as_secs_f64());
    for l in loads {
        l.check_alive();
    }
    c0.iter()
        .zip(c1)
        .map(|(a, b)| (b - a) as f64 / secs)
        .collect()
}

fn within(rate: f64, limit: f64, what: &str) {
    let err = (rate - limit).abs() / limit;
    assert!(
        err <= 0.05,
        "{what}: {rate:.1}/s against a limit of {limit}/s ({:.1} % off)",
        err * 100.0
    );
}

/// The value of metric `name` for `volume` with `label` (e.g. `dir="write"`); 0 when absent.
fn metric(metrics: &str, name: &str, volume: &str, label: &str) -> f64 {
    let text = http_get(metrics, "/metrics");
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains(&format!("volume=\"{volume}\""))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `ironsan_gateway_qos_throttled_total` of a volume's writes (0 when never throttled).
fn throttled(metrics: &str, volume: &str) -> u64 {
    metric(
        metrics,
        "ironsan_gateway_qos_throttled_total",
        volume,
        "dir=\"write\"",
    ) as u64
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read response");
    body
}

#[test]
fn limits_hold_per_volume_change_live_and_spare_the_neighbour() {
    require_tool("iscsi-ls");
    let dir = TestDir::new("qos");
    let server = Server::start(
        dir.path(),
        ServerConfig::default()
            .volume("lim", "256MiB")
            .volume("bw", "256MiB")
            .volume("free", "256MiB")
            .metrics(),
    );
    let mgr = dev_managers(dir.path());
    let metrics = server.metrics_addr().expect("metrics address in the log");

    cli_ok(&mgr, &["volume", "qos", "lim", "--write-iops", "200"]);
    let out = cli_ok(
        &mgr,
        &["volume", "qos", "bw", "--write-bps", "2MiB", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["qos"]["write_bps"], 2 * MIB);
    assert_eq!(v["qos"]["burst_ms"], 1000);
    let out = cli_ok(&mgr, &["volume", "list"]);
    assert!(out.contains("write:200iops,burst:1s"), "{out}");
    // A bucket lets any window T carry rate x (T + burst): with the default 1 s, a stall of
    // this loaded 2-core machine is caught up 1 s / 8 s = 12 % above the rate; with a tiny
    // burst a stall is lost instead. 200 ms bounds the catch-up at 2.5 % and absorbs stalls
    // up to 200 ms, so the 5 % check measures the limiter, not the machine.
    for v in ["lim", "bw"] {
        cli_ok(&mgr, &["volume", "qos", v, "--burst", "200ms"]);
    }
    thread::sleep(SETTLE);
    // The gateway publishes the limits it applies.
    let gauge = |volume: &str, limit: &str| {
        metric(
            &metrics,
            "ironsan_gateway_qos_limit",
            volume,
            &format!("limit=\"{limit}\""),
        )
    };
    assert_eq!(gauge("lim", "write_iops"), 200.0);
    assert_eq!(gauge("bw", "write_bps"), (2 * MIB) as f64);
    assert_eq!(gauge("free", "write_iops"), 0.0);

    // The neighbour alone.
    let free = Load::start(&server.addr, "free", 4096);
    let alone = free.rate(WARM);
    eprintln!("neighbour alone: {alone:.0} writes/s");
    assert!(
        alone > 400.0,
        "the unlimited volume must outrun the 200 IOPS limit by far to prove anything: {alone:.0}/s"
    );

    // All three at once: the limits hold, the neighbour runs on.
    let lim = Load::start(&server.addr, "lim", 4096);
    let bw = Load::start(&server.addr, "bw", 64 * 1024);
    let r = rates(&[&lim, &bw, &free], WARM);
    let (lim_rate, bw_rate, beside) = (r[0], r[1] * 64.0 * 1024.0, r[2]);
    eprintln!(
        "together: lim {lim_rate:.1} writes/s (limit 200), bw {:.3} MiB/s (limit 2), neighbour {beside:.0} writes/s",
        bw_rate / MIB as f64
    );
    within(lim_rate, 200.0, "write IOPS of lim");
    within(bw_rate, 2.0 * MIB as f64, "write bytes of bw");
    // Generous for a loaded 2-core machine, but far above anything a shared limit would give.
    assert!(
        beside >= alone * 0.5 && beside > 400.0,
        "the neighbour slowed from {alone:.0} to {beside:.0} writes/s"
    );
    assert_eq!(
        throttled(&metrics, "free"),
        0,
        "the neighbour was throttled"
    );
    assert!(throttled(&metrics, "lim") > 0);
    assert!(throttled(&metrics, "bw") > 0);
    free.finish();
    bw.finish();

    // Commands larger than bw's bucket (0.4 MiB: 2 MiB/s for 200 ms) still run, on debt: once
    // the bucket is full again, two 4 MiB writes owe 7.6 MiB, 3.8 s at the limit.
    thread::sleep(Duration::from_millis(1500));
    let mut cfg = SessionConfig::new("iqn.2026-11.io.ironsan.test:qos-big", &iqn("bw"));
    cfg.lun = lun();
    let mut s = Session::connect(&server.addr, &cfg).expect("login to bw");
    let big = pseudo_random(4 * MIB as usize, 9);
    let t = Instant::now();
    for i in 0..2 {
        s.write(i * 4 * MIB, &big, false)
            .expect("a write beyond the burst");
    }
    let took = t.elapsed();
    eprintln!("two 4 MiB writes at 2 MiB/s, 0.4 MiB burst: {took:?}");
    assert!(
        took >= Duration::from_millis(3700) && took < Duration::from_secs(8),
        "{took:?}"
    );
    s.logout();

    // Lowered, then raised, live: the same sessions go on. Meanwhile reads get limits of
    // their own: bw's IOPS (its write limit does not touch them), free's bandwidth.
    cli_ok(&mgr, &["volume", "qos", "lim", "--write-iops", "100"]);
    cli_ok(&mgr, &["volume", "qos", "bw", "--read-iops", "150"]);
    cli_ok(&mgr, &["volume", "qos", "free", "--read-bps", "1MiB"]);
    let reads = Load::start_io(&server.addr, "bw", 4096, false);
    let big_reads = Load::start_io(&server.addr, "free", 64 * 1024, false);
    let r = rates(&[&lim, &reads, &big_reads], SETTLE);
    let (lowered, read_rate, read_bw) = (r[0], r[1], r[2] * 64.0 * 1024.0);
    eprintln!(
        "lim lowered to 100: {lowered:.1} writes/s; bw reads {read_rate:.1}/s (limit 150); free reads {:.3} MiB/s (limit 1)",
        read_bw / MIB as f64
    );
    within(lowered, 100.0, "write IOPS of lim lowered to 100");
    within(read_rate, 150.0, "read IOPS of bw");
    within(read_bw, MIB as f64, "read bytes of free");
    reads.finish();
    big_reads.finish();
    cli_ok(&mgr, &["volume", "qos", "lim", "--write-iops", "300"]);
    let raised = lim.rate(SETTLE);
    eprintln!("lim raised to 300: {raised:.1} writes/s");
    within(raised, 300.0, "write IOPS of lim raised to 300");

    // Cleared: full speed again.
    let out = cli_ok(&mgr, &["volume", "qos", "lim", "--clear"]);
    assert!(out.contains("unlimited"), "{out}");
    let cleared = lim.rate(SETTLE);
    eprintln!("lim cleared: {cleared:.0} writes/s (neighbour alone had {alone:.0})");
    assert!(
        cleared >= alone * 0.5 && cleared > 600.0,
        "cleared limits must give full speed back: {cleared:.0}/s against {alone:.0}/s"
    );
    lim.finish();
}

#[test]
fn bad_limits_are_refused_from_the_cli_and_grpc() {
    let dir = TestDir::new("qos-bad");
    let _server = Server::start(dir.path(), ServerConfig::default().volume("v", "64MiB"));
    let mgr = dev_managers(dir.path());
    cli_ok(&mgr, &["volume", "qos", "v", "--write-iops", "50"]);

    let refused: [(&[&str], &str); 6] = [
        (
            &["volume", "qos", "v", "--write-iops", "10", "--burst", "0"],
            "burst",
        ),
        (
            &["volume", "qos", "v", "--read-iops", "10000001"],
            "read IOPS",
        ),
        (
            &["volume", "qos", "v", "--write-bps", "101GiB"],
            "write bandwidth",
        ),
        (&["volume", "qos", "v", "--burst", "2m"], "burst"),
        (
            &["volume", "qos", "nope", "--write-iops", "1"],
            r#"volume "nope" not found"#,
        ),
        (
            &[
                "volume",
                "create",
                "w",
                "--size",
                "64MiB",
                "--write-iops",
                "5",
                "--burst",
                "0ms",
            ],
            "burst",
        ),
    ];
    for (args, needle) in refused {
        cli_refused(&mgr, args, needle);
    }
    // Nothing changed, nothing created.
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(&mgr, &["volume", "get", "v", "--json"])).expect("json");
    assert_eq!(
        v["qos"],
        serde_json::json!({"read_iops": 0, "write_iops": 50, "read_bps": 0, "write_bps": 0, "burst_ms": 1000})
    );
    cli_refused(&mgr, &["volume", "get", "w"], r#"volume "w" not found"#);

    // The same over gRPC.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = ManagerClient::new(&mgr).expect("client");
    let set = |name: &str, qos: VolumeQos| {
        rt.block_on(client.set_volume_qos(SetVolumeQosRequest {
            volume: Some(VolumeRef {
                id: 0,
                name: name.into(),
            }),
            qos: Some(qos),
        }))
    };
    for (qos, code) in [
        (
            VolumeQos {
                write_iops: 1,
                burst_ms: Some(0),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            VolumeQos {
                write_iops: 20_000_000,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            VolumeQos {
                read_bps: 200 << 30,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
    ] {
        let e = set("v", qos).expect_err("refused");
        assert_eq!(e.code(), code, "{qos:?}: {e}");
    }
    let e = set(
        "nope",
        VolumeQos {
            write_iops: 1,
            ..Default::default()
        },
    )
    .expect_err("refused");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let v = set(
        "v",
        VolumeQos {
            read_iops: 7,
            ..Default::default()
        },
    )
    .expect("accepted");
    assert_eq!(
        v.qos,
        Some(VolumeQos {
            read_iops: 7,
            burst_ms: Some(1000),
            ..Default::default()
        })
    );
}
