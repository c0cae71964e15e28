//! `ironsan storage` as a process: it logs `storage ready` with the real bound address (port
//! 0), answers on the data path, survives a corrupt frame from one client, and exits 0 on
//! SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ironsan_storage::{ChunkId, Client, ClientConfig, Error};

#[test]
fn storage_daemon_serves_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("ironsan-storage-cli-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(["storage", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("d0"))
        .arg("--data-dir")
        .arg(dir.join("d1"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ironsan storage");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("storage ready line");
        if line.contains("storage ready") {
            let a = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("addr= in the ready line");
            break a.to_string();
        }
    };
    assert!(!addr.ends_with(":0"), "real port in {addr}");

    // A corrupt frame closes only its own connection.
    let mut bad = TcpStream::connect(&addr).unwrap();
    bad.write_all(&[0xde; 64]).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(&addr, &ClientConfig::default())
            .await
            .unwrap();
        let r = c.info(ChunkId::new(1, 0)).await;
        // NotFound with the engine, "not implemented yet" before it: an answer either way.
        assert!(
            matches!(r, Err(Error::NotFound(_) | Error::Invalid(_))),
            "{r:?}"
        );
    });

    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
