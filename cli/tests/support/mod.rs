//! Test fixture for the real-initiator tests: starts `ironsan dev` on a private data dir and a
//! free port, waits for its `portal ready` log line, and runs Debian's initiator tools
//! (libiscsi utilities, qemu-io / qemu-img with qemu's iscsi driver) against it.
//!
//! Environment knobs (for checking the suite itself against a reference target):
//! - `IRONSAN_TEST_BIN`: binary to start instead of the `ironsan` built by cargo, e.g.
//!   `scripts/tgt-as-ironsan.sh` (tgtd behind the same command line).
//! - `IRONSAN_TEST_LUN`: LUN of each volume (default 0; tgt serves disks on LUN 1).
//! - `IRONSAN_TEST_KEEP=1`: keep data dirs and tool logs.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How long `ironsan dev` may take to log `portal ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of one initiator tool invocation.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

pub const IQN_PREFIX: &str = "iqn.2026-11.io.ironsan:";

pub fn iqn(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

pub fn lun() -> u32 {
    match std::env::var("IRONSAN_TEST_LUN") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("IRONSAN_TEST_LUN={v:?} is not a number")),
        Err(_) => 0,
    }
}

fn keep() -> bool {
    std::env::var_os("IRONSAN_TEST_KEEP").is_some_and(|v| v == "1")
}

// ------------------------------------------------------------------------------------------
// Temporary directories (std only, removed on drop unless IRONSAN_TEST_KEEP=1)

pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("IRONSAN_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!(
            "ironsan-test-{}-{}-{}",
            label,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .unwrap_or_else(|e| panic!("cannot clear old {}: {e}", path.display()));
        }
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create test dir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if keep() {
            eprintln!("IRONSAN_TEST_KEEP=1: keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------------------------------------------
// The server under test

/// Command line of one `ironsan dev` instance.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    pub volumes: Vec<(String, String)>,
    pub chap: Option<(String, String)>,
    pub mutual_chap: Option<(String, String)>,
    /// More `ironsan dev` flags.
    pub extra: Vec<String>,
    /// Serve `/metrics` on a free port ([`Server::metrics_addr`]).
    pub metrics: bool,
}

impl ServerConfig {
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }
    pub fn volume(mut self, name: &str, size: &str) -> Self {
        self.volumes.push((name.to_string(), size.to_string()));
        self
    }
    pub fn chap(mut self, user: &str, secret: &str) -> Self {
        self.chap = Some((user.to_string(), secret.to_string()));
        self
    }
    pub fn mutual_chap(mut self, user: &str, secret: &str) -> Self {
        self.mutual_chap = Some((user.to_string(), secret.to_string()));
        self
    }
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }
}

/// A running `ironsan dev`. SIGTERM (then SIGKILL after a timeout) on drop.
pub struct Server {
    pid: u32,
    /// `IP:PORT` of the portal, parsed from the ready line.
    pub addr: String,
    pub data_dir: PathBuf,
    config: ServerConfig,
    log: Arc<Mutex<String>>,
    exited: Receiver<std::io::Result<ExitStatus>>,
    exit_status: Option<ExitStatus>,
}

fn binary() -> PathBuf {
    match std::env::var_os("IRONSAN_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_ironsan")),
    }
}

/// Strips ANSI escape sequences (tracing colours its output unless told not to).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `addr=127.0.0.1:3260` (possibly quoted) from a log line.
fn parse_addr(line: &str) -> Option<String> {
    let start = line.find("addr=")? + "addr=".len();
    let rest = line[start..].trim_start_matches('"');
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
        .unwrap_or(rest.len());
    let addr = &rest[..end];
    if addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(addr.to_string())
    } else {
        None
    }
}

fn signal(pid: u32, sig: &str) {
    // `kill(1)` keeps the test crate free of extra dependencies.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

impl Server {
    /// Starts a server on `data_dir` with the given volumes and waits until it is ready.
    pub fn start(data_dir: &Path, config: ServerConfig) -> Server {
        let bin = binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--portal")
            .arg("127.0.0.1:0")
            // Free ports for the cluster's managers and storage daemons: tests run in parallel.
            .args(["--manager-port", "0", "--storage-port", "0"]);
        for (name, size) in &config.volumes {
            cmd.arg("--volume").arg(format!("{name}:{size}"));
        }
        if let Some((u, s)) = &config.chap {
            cmd.arg("--chap").arg(format!("{u}:{s}"));
        }
        if let Some((u, s)) = &config.mutual_chap {
            cmd.arg("--mutual-chap").arg(format!("{u}:{s}"));
        }
        cmd.args(&config.extra);
        if config.metrics {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        cmd.env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("IRONSAN_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Own process group: signals aimed at the test's group (terminal Ctrl-C, a runner's
        // timeout) must not reach the server; the fixture alone decides when it stops.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let cmdline = format!("{cmd:?}");
        let mut child: Child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e}\n  command: {cmdline}", bin.display())
        });
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr is piped");

        // Reader thread: keeps the whole log (for failure messages) and reports the ready line.
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut ready_tx = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                    if line.contains("portal ready") {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(line);
                        }
                    }
                }
            });
        }
        // Waiter thread: reports the exit status (so we never poll with sleeps).
        let (exit_tx, exit_rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = exit_tx.send(child.wait());
        });

        let mut server = Server {
            pid,
            addr: String::new(),
            data_dir: data_dir.to_path_buf(),
            config,
            log,
            exited: exit_rx,
            exit_status: None,
        };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => match parse_addr(&line) {
                Some(addr) => server.addr = addr,
                None => panic!(
                    "ready line has no addr=IP:PORT: {line:?}\n  command: {cmdline}\n{}",
                    server.log_text()
                ),
            },
            Err(RecvTimeoutError::Disconnected) => {
                let status = server.wait_exit(Duration::from_secs(10));
                panic!(
                    "`ironsan dev` exited ({status:?}) before logging `portal ready`\n  command: {cmdline}\n--- its stderr ---\n{}",
                    server.log_text()
                );
            }
            Err(RecvTimeoutError::Timeout) => panic!(
                "`ironsan dev` did not log `portal ready` within {READY_TIMEOUT:?}\n  command: {cmdline}\n--- its stderr ---\n{}",
                server.log_text()
            ),
        }
        server
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The `/metrics` address, from the `metrics ready` line (logged before `portal ready`).
    pub fn metrics_addr(&self) -> Option<String> {
        self.log_text()
            .lines()
            .find(|l| l.contains("metrics ready"))
            .and_then(parse_addr)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `iscsi://[auth@]ADDR/IQN/LUN`
    pub fn url(&self, volume: &str) -> String {
        format!("iscsi://{}/{}/{}", self.addr, iqn(volume), lun())
    }

    pub fn url_with_auth(&self, volume: &str, user: &str, secret: &str) -> String {
        format!(
            "iscsi://{user}%{secret}@{}/{}/{}",
            self.addr,
            iqn(volume),
            lun()
        )
    }

    pub fn portal_url(&self) -> String {
        format!("iscsi://{}", self.addr)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit_status.is_some() {
            return self.exit_status;
        }
        match self.exited.recv_timeout(timeout) {
            Ok(Ok(status)) => {
                self.exit_status = Some(status);
                self.exit_status
            }
            Ok(Err(e)) => panic!("waiting for pid {}: {e}", self.pid),
            Err(_) => None,
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// Panics (with the server log) if the process has exited.
    pub fn assert_running(&mut self, context: &str) {
        if let Some(status) = self.wait_exit(Duration::ZERO) {
            panic!(
                "`ironsan dev` died ({status}) {context}\n--- its stderr ---\n{}",
                self.log_text()
            );
        }
    }

    /// SIGTERM, wait for the exit, return the status (SIGKILL and panic after a timeout).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exit_status {
            return s;
        }
        signal(self.pid, "TERM");
        match self.wait_exit(STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                signal(self.pid, "KILL");
                let _ = self.wait_exit(Duration::from_secs(10));
                panic!(
                    "`ironsan dev` did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- its stderr ---\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// SIGTERM and assert a clean exit (status 0).
    pub fn stop_clean(mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "`ironsan dev` exited with {status} after SIGTERM, expected 0\n--- its stderr ---\n{}",
            self.log_text()
        );
    }

    /// SIGKILL: a crash. Data acknowledged as flushed must survive it.
    pub fn kill_hard(mut self) {
        signal(self.pid, "KILL");
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            panic!("pid {} survived SIGKILL", self.pid);
        }
    }

    /// Stops cleanly, then starts again on the same data dir with the same config.
    pub fn restart(self) -> Server {
        let dir = self.data_dir.clone();
        let config = self.config.clone();
        self.stop_clean();
        Server::start(&dir, config)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit_status.is_some() {
            return;
        }
        signal(self.pid, "TERM");
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            signal(self.pid, "KILL");
            let _ = self.wait_exit(Duration::from_secs(10));
        }
        if thread::panicking() {
            eprintln!(
                "--- stderr of `ironsan dev` (pid {}, {}) ---\n{}",
                self.pid,
                self.addr,
                self.log_text()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Initiator tools

/// Where a tool comes from, for the "missing tool" failure message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "iscsi-ls" | "iscsi-inq" | "iscsi-test-cu" | "iscsi-readcapacity16" => "libiscsi-bin",
        "qemu-io" | "qemu-img" => "qemu-utils qemu-block-extra",
        _ => "coreutils",
    }
}

/// Fails the test (never skips) when a tool is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` not found in PATH. Fix with:  apt-get install -y {}   (or run scripts/install-test-deps.sh as root)",
        package_of(tool)
    );
    if tool == "qemu-io" || tool == "qemu-img" {
        require_qemu_iscsi();
    }
}

/// qemu's iscsi:// driver is a loadable module from qemu-block-extra (same version as qemu-utils).
pub fn require_qemu_iscsi() {
    let found = [
        "/usr/lib/x86_64-linux-gnu/qemu",
        "/usr/lib/aarch64-linux-gnu/qemu",
        "/usr/lib/qemu",
    ]
    .iter()
    .any(|d| Path::new(d).join("block-iscsi.so").exists());
    assert!(
        found,
        "qemu's iscsi block driver (block-iscsi.so) is missing. Fix with:  apt-get install -y qemu-block-extra   \
         (its version must match qemu-utils; on Debian 12 with qemu-utils from bookworm-backports: \
         apt-get install -y -t bookworm-backports qemu-block-extra; scripts/install-test-deps.sh does this)"
    );
}

/// Result of one tool run.
pub struct Run {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: Vec<u8>,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "  command: {}\n  status: {}\n  stdout: {}\n  stderr: {}",
            self.cmdline,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        );
        s
    }
    /// Panics with the full output unless the command succeeded.
    pub fn expect_ok(self, what: &str) -> Run {
        assert!(self.ok(), "{what} failed:\n{}", self.describe());
        self
    }
    /// Panics with the full output if the command succeeded.
    pub fn expect_fail(self, what: &str) -> Run {
        assert!(
            !self.ok(),
            "{what} succeeded but must fail:\n{}",
            self.describe()
        );
        self
    }
}

/// Runs `tool args...` under coreutils `timeout` (so a hung target fails the test instead of
/// hanging it) and captures its output.
pub fn run<I, S>(tool: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_timeout(tool, args, TOOL_TIMEOUT)
}

pub fn run_timeout<I, S>(tool: &str, args: I, timeout: Duration) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    require_tool(tool);
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let cmdline = std::iter::once(tool.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out: Output = Command::new("timeout")
        .arg("-k")
        .arg("10")
        .arg(timeout.as_secs().max(1).to_string())
        .arg(tool)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
    if out.status.code() == Some(124) {
        panic!(
            "`{cmdline}` timed out after {timeout:?}\n  stdout: {}\n  stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Run {
        cmdline,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout_bytes: out.stdout,
    }
}

/// `qemu-io -f raw -c CMD... URL`. qemu-io exits non-zero when a command fails; we also look
/// for its failure messages, so a pattern mismatch can never pass unnoticed.
pub fn qemu_io(url: &str, cmds: &[String]) -> Run {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(url.to_string());
    let mut r = run("qemu-io", &args);
    let text = format!("{}{}", r.stdout, r.stderr);
    if r.ok()
        && (text.contains("Pattern verification failed")
            || text.contains("failed:")
            || text.contains("Input/output error"))
    {
        // Treat as failure even if this qemu-io version exits 0.
        r.status = failing_status();
    }
    r
}

fn failing_status() -> ExitStatus {
    Command::new("false").status().expect("run `false`")
}

/// Writes `len` bytes of `pattern` at `offset` and flushes.
pub fn qemu_write(url: &str, offset: u64, len: u64, pattern: u8) -> Run {
    qemu_io(
        url,
        &[
            format!("write -P 0x{pattern:02x} {offset} {len}"),
            "flush".to_string(),
        ],
    )
}

/// Reads `len` bytes at `offset` and verifies every byte equals `pattern`.
pub fn qemu_verify(url: &str, offset: u64, len: u64, pattern: u8) -> Run {
    qemu_io(url, &[format!("read -P 0x{pattern:02x} {offset} {len}")])
}

/// Deterministic pseudo-random bytes (xorshift64*), so test data needs no extra crates.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The manager addresses of a running `ironsan dev` (from its `cluster.json`).
pub fn dev_managers(data_dir: &Path) -> String {
    let path = data_dir.join("cluster.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    let managers: Vec<&str> = v["managers"]
        .as_array()
        .expect("cluster.json has managers")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert!(!managers.is_empty(), "no managers in {}", path.display());
    managers.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_parsing() {
        assert_eq!(
            parse_addr(
                "2026-01-01T00:00:00Z  INFO ironsan_gateway: portal ready addr=127.0.0.1:40123"
            )
            .as_deref(),
            Some("127.0.0.1:40123")
        );
        assert_eq!(
            parse_addr("portal ready addr=\"[::1]:3260\" x=1").as_deref(),
            Some("[::1]:3260")
        );
        assert_eq!(parse_addr("portal ready").as_deref(), None);
        assert_eq!(strip_ansi("\u{1b}[2maddr\u{1b}[0m=1"), "addr=1");
    }
}
