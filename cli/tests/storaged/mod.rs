//! Test fixture: one `ironsan storage` process on real directories and a free port, with its
//! log, its `/metrics` text and a data-path client; killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ironsan_storage::client::{Client, ClientConfig};

/// One `ironsan storage` process, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub metrics: String,
    pub dirs: Vec<PathBuf>,
    log: Arc<Mutex<String>>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    pub fn start(dirs: &[PathBuf], extra: &[&str]) -> Daemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ironsan"));
        cmd.arg("storage")
            .args(["--listen", "127.0.0.1:0", "--metrics", &metrics]);
        for d in dirs {
            cmd.arg("--data-dir").arg(d);
        }
        cmd.args(extra).env("NO_COLOR", "1").env("RUST_LOG", "info");
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ironsan runs");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("storage ready") {
                    if let Some(a) = line.split("addr=").nth(1) {
                        let _ = tx.send(
                            a.split_whitespace()
                                .next()
                                .unwrap_or("")
                                .trim_matches('"')
                                .to_string(),
                        );
                    }
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "no ready line from ironsan storage; log:\n{}",
                    log.lock().unwrap()
                )
            });
        Daemon {
            child,
            addr,
            metrics,
            dirs: dirs.to_vec(),
            log,
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "ironsan storage did not exit within 30 s of SIGTERM; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn restart(mut self, extra: &[&str]) -> Daemon {
        let _ = self.child.try_wait();
        let dirs = self.dirs.clone();
        let _ = self.child.kill();
        let _ = self.child.wait();
        Daemon::start(&dirs, extra)
    }

    /// `/readyz`: status code and body.
    pub fn readyz(&self) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
        (code, body)
    }

    /// Polls `/readyz` until `pred` holds for its (code, body); returns them.
    pub fn wait_readyz(&self, within: Duration, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (code, body) = self.readyz();
            if pred(code, &body) {
                return (code, body);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz still {code} {body:?} after {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub async fn client(&self) -> Client {
        let cfg = ClientConfig {
            request_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        Client::connect(&self.addr, &cfg).await.unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of every sample of the metrics whose lines start with `name`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
