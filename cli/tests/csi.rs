//! The CSI driver against a real `ironsan dev` cluster, over its unix socket.

#[path = "support/csi.rs"]
mod csi_support;
mod support;

use csi_support::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_answers() {
    let dir = TestDir::new("csi-identity");
    let server = Server::start(&dir.path().join("data"), ServerConfig::default());
    let sock = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let managers = dev_managers(&server.data_dir);
    let driver = CsiDriver::start(
        &endpoint,
        &[
            "--mode",
            "node",
            "--node-id",
            "dev",
            "--manager",
            &managers,
            "--state-dir",
            &dir.path().join("state").display().to_string(),
        ],
    );
    let mut c = clients(&endpoint).await;
    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.ironsan.io");
    assert!(driver.stop());
}
