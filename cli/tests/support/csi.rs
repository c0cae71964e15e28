//! CSI test fixture: starts `ironsan csi` as a process and talks to it over gRPC (tonic 0.11,
//! the version the CSI types of `bpfman-csi` are generated for), on a unix socket or TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub use bpfman_csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::VolumeCapability;
use tonic011::transport::{Channel, Endpoint, Uri};

/// How long `ironsan csi` may take to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `ironsan csi`; SIGTERM on drop (SIGKILL if it lingers).
pub struct CsiDriver {
    child: Child,
    pub endpoint: String,
    log: Arc<Mutex<String>>,
}

impl CsiDriver {
    /// Starts `ironsan csi --endpoint ENDPOINT ARGS...` and waits for its `CSI driver serving`
    /// line.
    pub fn start(endpoint: &str, args: &[&str]) -> CsiDriver {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_ironsan"));
        let mut cmd = Command::new(&bin);
        cmd.arg("csi")
            .arg("--endpoint")
            .arg(endpoint)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                    if line.contains("CSI driver serving") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
        }
        let driver = CsiDriver {
            child,
            endpoint: endpoint.to_string(),
            log,
        };
        if rx.recv_timeout(READY_TIMEOUT).is_err() {
            panic!(
                "`ironsan csi {args:?}` did not serve within {READY_TIMEOUT:?}\n--- its stderr ---\n{}",
                driver.log_text()
            );
        }
        driver
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..200 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for CsiDriver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// How long `connect` retries: a plugin in the test VM is reached through a forwarded port
/// that accepts before the guest's plugin listens.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC channel to a CSI endpoint (`unix:///path` or `tcp://IP:PORT`), retried for a few
/// seconds.
pub async fn connect(endpoint: &str) -> Channel {
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        match try_connect(endpoint).await {
            Ok(ch) => return ch,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("connect {endpoint}: {e} (for {CONNECT_TIMEOUT:?})")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One connection attempt.
pub async fn try_connect(endpoint: &str) -> Result<Channel, tonic011::transport::Error> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        // The URI is ignored: every connection goes to the socket.
        Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
    } else if let Some(addr) = endpoint.strip_prefix("tcp://") {
        Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid address")
            .connect()
            .await
    } else {
        panic!("unknown endpoint {endpoint}")
    }
}

/// The three CSI clients on one channel.
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

pub async fn clients(endpoint: &str) -> Clients {
    let ch = connect(endpoint).await;
    Clients {
        identity: IdentityClient::new(ch.clone()),
        controller: ControllerClient::new(ch.clone()),
        node: NodeClient::new(ch),
    }
}

pub fn mount_cap(mode: Mode, fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_string(),
            ..Default::default()
        })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// Asserts a call failed with `code`, naming the call in the failure.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic011::Response<T>, tonic011::Status>,
    code: tonic011::Code,
) -> tonic011::Status {
    match r {
        Ok(resp) => panic!(
            "{what}: expected {code:?}, got success {:?}",
            resp.into_inner()
        ),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: wrong code, message {:?}",
                s.message()
            );
            assert!(
                !s.message().is_empty(),
                "{what}: {code:?} without a message"
            );
            s
        }
    }
}
