//! The gateway: its targets (one per volume, LUN 0) and the portal that accepts iSCSI
//! connections for them. A target may be exported write-protected ([`TargetOptions`]); the
//! flag lives on its LUN and can be switched while sessions are logged in; so do its QoS
//! limits ([`crate::qos`]), applied on the command path before the LUN.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::BlockDevice;
use crate::iscsi::chap::Credentials;
use crate::iscsi::params::Limits;
use crate::iscsi::session::Registry;
use crate::metrics::TargetMetrics;
use crate::qos::{self, Qos};
use crate::scsi::{Lun, LunIdentity};

/// Prefix of every IronSAN target name; the volume name follows.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.ironsan:";

/// Portal-wide settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Credentials initiators must present (one-way CHAP) for normal sessions.
    pub chap: Option<Credentials>,
    /// Credentials the target presents when the initiator asks (mutual CHAP).
    pub mutual_chap: Option<Credentials>,
    pub limits: Limits,
    /// Target portal group tag of this portal.
    pub tpgt: u16,
    /// Idle time after which the target pings the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// Silence after a ping after which the connection is declared dead.
    pub nop_timeout: Duration,
    /// Connections served at once; more are closed at accept (a flood cannot exhaust fds).
    pub max_connections: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            chap: None,
            mutual_chap: None,
            limits: Limits::default(),
            tpgt: 1,
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Why a gateway configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("CHAP user must not be empty")]
    EmptyUser,
    #[error("CHAP secret of {0:?} must be 12 to 255 bytes long (RFC 7143 §12.1.3)")]
    SecretLength(String),
    #[error("mutual CHAP needs one-way CHAP too, and a different secret")]
    MutualChap,
    #[error("invalid volume name {0:?}: use letters, digits, '.', '-' and '_' (at most 200)")]
    VolumeName(String),
    #[error("volume {0} exists already")]
    DuplicateVolume(String),
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for c in self.chap.iter().chain(self.mutual_chap.iter()) {
            if c.user.is_empty() {
                return Err(ConfigError::EmptyUser);
            }
            if !(12..=255).contains(&c.secret.len()) {
                return Err(ConfigError::SecretLength(c.user.clone()));
            }
        }
        if let Some(m) = &self.mutual_chap {
            match &self.chap {
                Some(c) if c.secret != m.secret => {}
                _ => return Err(ConfigError::MutualChap),
            }
        }
        Ok(())
    }
}

/// One target: a volume exported as LUN 0.
pub struct Target {
    pub iqn: String,
    pub name: String,
    pub lun: Lun,
    /// Initiator names allowed to log in; empty allows all.
    pub acl: Vec<String>,
    pub metrics: TargetMetrics,
    /// The volume's I/O limits, changed live by the cluster follower.
    pub qos: Qos,
}

/// How a volume is exported.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    /// Initiator names allowed to log in; empty allows all.
    pub acl: Vec<String>,
    /// Export the LUN write-protected (WP in MODE SENSE; writes fail with DATA PROTECT).
    pub write_protected: bool,
    /// I/O limits from the first command on (changed later through [`Target::qos`]).
    pub qos: qos::Limits,
}

impl TargetOptions {
    pub fn acl(acl: Vec<String>) -> Self {
        Self {
            acl,
            ..Self::default()
        }
    }
}

impl Target {
    pub fn allows(&self, initiator: &str) -> bool {
        self.acl.is_empty() || self.acl.iter().any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

/// Checks a target name (a volume's, or `VOLUME:SNAPSHOT` for an exported snapshot) for use
/// in an IQN and a file name.
pub fn check_volume_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::VolumeName(name.to_string()))
    }
}

/// A stable 64-bit id for a volume name (FNV-1a), the source of its NAA designator.
pub fn volume_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The gateway: targets plus the sessions logged in to them.
pub struct Gateway {
    pub config: GatewayConfig,
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    pub sessions: Arc<Registry>,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        Ok(Arc::new(Self {
            config,
            targets: RwLock::new(BTreeMap::new()),
            sessions: Arc::new(Registry::default()),
        }))
    }

    /// Exports `device` as target `iqn.2026-11.io.ironsan:<name>`.
    pub fn add_target(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        options: TargetOptions,
    ) -> Result<Arc<Target>, ConfigError> {
        check_volume_name(name)?;
        let iqn = format!("{IQN_PREFIX}{name}").to_ascii_lowercase();
        let identity = LunIdentity {
            name: name.to_string(),
            naa: volume_id(name),
        };
        let target = Arc::new(Target {
            iqn: iqn.clone(),
            name: name.to_string(),
            // Protected from the start: an initiator must never see it writable first.
            lun: Lun::new(device, identity).with_write_protect(options.write_protected),
            acl: options.acl,
            metrics: TargetMetrics::new(name),
            qos: Qos::new(name),
        });
        // Before the target is findable, so no command ever runs unlimited by mistake.
        target.qos.set(options.qos);
        let mut t = self.targets.write().unwrap_or_else(|e| e.into_inner());
        if t.contains_key(&iqn) {
            return Err(ConfigError::DuplicateVolume(name.to_string()));
        }
        t.insert(iqn, target.clone());
        Ok(target)
    }

    /// Stops exporting volume `name` and ends its sessions.
    pub fn remove_target(&self, name: &str) -> Option<Arc<Target>> {
        let iqn = format!("{IQN_PREFIX}{name}").to_ascii_lowercase();
        let t = self
            .targets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&iqn);
        self.sessions.end_target(&iqn);
        t
    }

    pub fn target_by_name(&self, name: &str) -> Option<Arc<Target>> {
        self.target(&format!("{IQN_PREFIX}{name}"))
    }

    /// Looks a target up by IQN (case-insensitive, as initiators vary).
    pub fn target(&self, iqn: &str) -> Option<Arc<Target>> {
        self.targets
            .read()
            .ok()?
            .get(&iqn.to_ascii_lowercase())
            .cloned()
    }

    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.targets
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Accepts connections on `listener` until `shutdown`, then waits for every connection to
    /// drain its in-flight commands and flushes every device.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let conns = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if conns.len() >= self.config.max_connections {
                tracing::warn!(%peer, limit = self.config.max_connections, "too many connections; closing");
                drop(stream);
                continue;
            }
            conns.spawn(crate::iscsi::connection::serve(
                self.clone(),
                stream,
                peer,
                shutdown.clone(),
            ));
        }
        drop(listener);
        conns.close();
        conns.wait().await;
        for t in self.targets() {
            if let Err(e) = t.lun.device().flush().await {
                tracing::error!(volume = %t.name, "flush at shutdown failed: {e}");
            }
        }
    }
}

/// Binds the portal address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
