//! The iSCSI initiator: open-iscsi's `iscsiadm` for discovery, node records, login and logout,
//! and sysfs for what the kernel made of a session (its state and its SCSI disk).
//!
//! - **Discovery** is SendTargets with `-o nonpersistent`: it only tells whether the portal
//!   exports the IQN yet (the gateway picks a freshly published volume up within a second or
//!   two). Its answer also names the target's own address, which is not always the one this
//!   node reaches it by (a gateway on 0.0.0.0, NAT, the test VM), so no record is made from it.
//! - **The node record** is made by hand for exactly (IQN, portal we were given), with
//!   `node.startup = manual` (the plugin, not iscsid at boot, decides what is logged in) and
//!   the CHAP settings, then logged in. A session that already exists is fine.
//! - **The disk** is `/dev/disk/by-path/ip-PORTAL-iscsi-IQN-lun-N` when udev made that link,
//!   else found in sysfs: `/sys/class/iscsi_session/sessionN/targetname` is the IQN, and the
//!   session's SCSI device `H:C:T:LUN` has the block device under `block/`.
//! - **Logout** goes by session id, so it works when the node record is gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::exec::Cmd;
use super::NodeError;

const ADM_TIMEOUT: Duration = Duration::from_secs(30);
/// Login waits for the target; iscsid itself gives up after its own login timeout (15 s by
/// default) times `initial_login_retry_max`.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long discovery may take to list a freshly published volume.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(30);
/// How long the kernel may take to show the disk of a new session.
pub const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// iscsiadm exit statuses (open-iscsi include/iscsi_err.h).
pub const ERR_SESS_EXISTS: i32 = 15;
pub const ERR_NO_OBJS_FOUND: i32 = 21;
pub const ERR_LOGIN_AUTH_FAILED: i32 = 24;

const SESSION_CLASS: &str = "/sys/class/iscsi_session";
const BY_PATH: &str = "/dev/disk/by-path";

/// CHAP credentials for a login (one-way, and optionally the target's for mutual CHAP).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Chap {
    pub username: String,
    pub password: String,
    /// Mutual CHAP: the target proves itself with these.
    pub username_in: Option<String>,
    pub password_in: Option<String>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("username", &self.username)
            .field("username_in", &self.username_in)
            .finish_non_exhaustive()
    }
}

/// One line of `iscsiadm -m session`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub sid: u32,
    /// `IP:PORT` (IPv6 in brackets), as the session connected.
    pub portal: String,
    pub iqn: String,
}

/// Parses `iscsiadm -m session` output:
/// `tcp: [1] 10.0.2.2:3260,1 iqn.2026-11.io.ironsan:vol1 (non-flash)`.
pub fn parse_sessions(out: &str) -> Vec<Session> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            f.next()?.strip_suffix(':')?;
            let sid = f
                .next()?
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            let (portal, _tpgt) = f.next()?.rsplit_once(',')?;
            let iqn = f.next()?;
            (!portal.is_empty() && !iqn.is_empty()).then(|| Session {
                sid,
                portal: portal.to_string(),
                iqn: iqn.to_string(),
            })
        })
        .collect()
}

/// Parses SendTargets discovery output (`PORTAL,TPGT IQN` per line) into the IQNs listed.
pub fn parse_discovery(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            f.next()?.rsplit_once(',')?;
            f.next().map(str::to_string)
        })
        .collect()
}

fn adm(timeout: Duration) -> Cmd {
    Cmd::new("iscsiadm", timeout)
}

/// Every session of this node.
pub async fn sessions() -> Result<Vec<Session>, NodeError> {
    let cmd = adm(ADM_TIMEOUT).args(["-m", "session"]);
    let out = cmd.output().await?;
    match out.code {
        0 => Ok(parse_sessions(&out.stdout)),
        ERR_NO_OBJS_FOUND => Ok(Vec::new()),
        _ => Err(cmd.failed(&out)),
    }
}

/// The sessions to `iqn`.
pub async fn sessions_for(iqn: &str) -> Result<Vec<Session>, NodeError> {
    Ok(sessions()
        .await?
        .into_iter()
        .filter(|s| s.iqn == iqn)
        .collect())
}

/// Runs SendTargets discovery against `portal` until it lists `iqn` or `wait` has passed.
pub async fn wait_listed(portal: &str, iqn: &str, wait: Duration) -> Result<(), NodeError> {
    let start = Instant::now();
    let mut last;
    loop {
        let cmd = adm(ADM_TIMEOUT).args([
            "-m",
            "discovery",
            "-t",
            "sendtargets",
            "-p",
            portal,
            "-o",
            "nonpersistent",
        ]);
        match cmd.output().await {
            Ok(out) if out.success() => {
                let listed = parse_discovery(&out.stdout);
                if listed.iter().any(|t| t == iqn) {
                    return Ok(());
                }
                last = format!(
                    "portal lists {} other target(s) but not {iqn}",
                    listed.len()
                );
            }
            Ok(out) => last = cmd.failed(&out).to_string(),
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() >= wait {
            return Err(NodeError::Unavailable(format!(
                "{iqn} not offered by portal {portal} within {}s: {last}",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates (or recreates) the node record for (`iqn`, `portal`) with manual startup and the
/// given CHAP settings. Only called when no session to `iqn` exists.
pub async fn setup_node(portal: &str, iqn: &str, chap: Option<&Chap>) -> Result<(), NodeError> {
    let node = || adm(ADM_TIMEOUT).args(["-m", "node", "-T", iqn, "-p", portal]);
    // A stale record (other settings, an old secret) must not survive.
    let _ = node().args(["-o", "delete"]).output().await?;
    node().args(["-o", "new"]).run().await?;
    let update = |name: &str, value: &str, secret: bool| {
        let c = node().args(["-o", "update", "-n", name, "-v"]);
        if secret {
            c.secret_arg(value)
        } else {
            c.arg(value)
        }
    };
    update("node.startup", "manual", false).run().await?;
    match chap {
        None => {
            update("node.session.auth.authmethod", "None", false)
                .run()
                .await?;
        }
        Some(c) => {
            update("node.session.auth.authmethod", "CHAP", false)
                .run()
                .await?;
            update("node.session.auth.username", &c.username, false)
                .run()
                .await?;
            update("node.session.auth.password", &c.password, true)
                .run()
                .await?;
            if let (Some(u), Some(p)) = (&c.username_in, &c.password_in) {
                update("node.session.auth.username_in", u, false)
                    .run()
                    .await?;
                update("node.session.auth.password_in", p, true)
                    .run()
                    .await?;
            }
        }
    };
    Ok(())
}

/// Logs in to (`iqn`, `portal`) through its node record; an existing session is fine.
pub async fn login(portal: &str, iqn: &str) -> Result<(), NodeError> {
    let cmd = adm(LOGIN_TIMEOUT).args(["-m", "node", "-T", iqn, "-p", portal, "--login"]);
    let out = cmd.output().await?;
    match out.code {
        0 | ERR_SESS_EXISTS => Ok(()),
        ERR_LOGIN_AUTH_FAILED => Err(NodeError::Auth(cmd.failed(&out).to_string())),
        _ => Err(NodeError::Unavailable(cmd.failed(&out).to_string())),
    }
}

/// Logs out of one session; a session already gone is fine.
pub async fn logout(sid: u32) -> Result<(), NodeError> {
    let cmd = adm(LOGOUT_TIMEOUT).args(["-m", "session", "-r", &sid.to_string(), "-u"]);
    let out = cmd.output().await?;
    match out.code {
        0 | ERR_NO_OBJS_FOUND => Ok(()),
        // "No session found" for a sid that vanished meanwhile.
        _ if !Path::new(SESSION_CLASS)
            .join(format!("session{sid}"))
            .exists() =>
        {
            Ok(())
        }
        _ => Err(cmd.failed(&out)),
    }
}

/// Deletes every node record of `iqn` (all portals); none is fine.
pub async fn delete_records(iqn: &str) -> Result<(), NodeError> {
    let cmd = adm(ADM_TIMEOUT).args(["-m", "node", "-T", iqn, "-o", "delete"]);
    let out = cmd.output().await?;
    match out.code {
        0 | ERR_NO_OBJS_FOUND => Ok(()),
        _ => Err(cmd.failed(&out)),
    }
}

/// The kernel's state of the sessions to `iqn` (`LOGGED_IN`, `FAILED`, `FREE`), from sysfs.
pub async fn session_states(iqn: &str) -> Vec<String> {
    let iqn = iqn.to_string();
    tokio::task::spawn_blocking(move || {
        sessions_in(Path::new(SESSION_CLASS), &iqn)
            .into_iter()
            .map(|s| read_trimmed(&s.join("state")).unwrap_or_else(|| "unknown".into()))
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The disk of LUN `lun` of a session to `iqn`, once the kernel has it with a size: the
/// by-path link of `portal` if udev made one, else through sysfs.
pub async fn find_device(iqn: &str, lun: u32, portal: &str) -> Option<PathBuf> {
    let link = PathBuf::from(BY_PATH).join(format!("ip-{portal}-iscsi-{iqn}-lun-{lun}"));
    let iqn = iqn.to_string();
    tokio::task::spawn_blocking(move || {
        let dev = std::fs::canonicalize(&link)
            .ok()
            .filter(|d| d.starts_with("/dev"))
            .or_else(|| {
                device_in(Path::new(SESSION_CLASS), &iqn, lun)
                    .map(|name| PathBuf::from("/dev").join(name))
            })?;
        let name = dev.file_name()?.to_str()?;
        let sectors: u64 = read_trimmed(&Path::new("/sys/class/block").join(name).join("size"))?
            .parse()
            .ok()?;
        (sectors > 0 && dev.exists()).then_some(dev)
    })
    .await
    .ok()
    .flatten()
}

/// Waits up to `wait` for [`find_device`].
pub async fn wait_device(
    iqn: &str,
    lun: u32,
    portal: &str,
    wait: Duration,
) -> Result<PathBuf, NodeError> {
    let start = Instant::now();
    loop {
        if let Some(d) = find_device(iqn, lun, portal).await {
            return Ok(d);
        }
        if start.elapsed() >= wait {
            return Err(NodeError::Unavailable(format!(
                "logged in to {iqn}, but no disk for LUN {lun} appeared within {}s",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The session directories (`.../iscsi_session/sessionN`) whose targetname is `iqn`.
fn sessions_in(class: &Path, iqn: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| read_trimmed(&p.join("targetname")).as_deref() == Some(iqn))
        .collect();
    found.sort();
    found
}

/// The block device name (`sdb`) of LUN `lun` in a session to `iqn`, under a sysfs
/// `iscsi_session` class directory.
pub fn device_in(class: &Path, iqn: &str, lun: u32) -> Option<String> {
    for session in sessions_in(class, iqn) {
        // sessionN/device -> .../hostH/sessionN, holding targetH:C:T/H:C:T:L/block/sdX
        let Ok(targets) = std::fs::read_dir(session.join("device")) else {
            continue;
        };
        for target in targets.flatten() {
            if !target.file_name().to_string_lossy().starts_with("target") {
                continue;
            }
            let Ok(luns) = std::fs::read_dir(target.path()) else {
                continue;
            };
            for sdev in luns.flatten() {
                let name = sdev.file_name();
                let name = name.to_string_lossy();
                let parts: Vec<&str> = name.split(':').collect();
                if parts.len() != 4 || parts[3].parse::<u32>().ok() != Some(lun) {
                    continue;
                }
                if let Ok(mut blocks) = std::fs::read_dir(sdev.path().join("block")) {
                    if let Some(Ok(b)) = blocks.next() {
                        return Some(b.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    None
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_lines() {
        let out = "tcp: [1] 10.0.2.2:3260,1 iqn.2026-11.io.ironsan:vol1 (non-flash)\n\
                   tcp: [12] [fd00::1]:3260,1 iqn.2026-11.io.ironsan:vol-2 (non-flash)\n\
                   iscsiadm: No active sessions.\n\
                   tcp: [x] 1.2.3.4:3260,1 iqn.bad (non-flash)\n";
        assert_eq!(
            parse_sessions(out),
            vec![
                Session {
                    sid: 1,
                    portal: "10.0.2.2:3260".into(),
                    iqn: "iqn.2026-11.io.ironsan:vol1".into()
                },
                Session {
                    sid: 12,
                    portal: "[fd00::1]:3260".into(),
                    iqn: "iqn.2026-11.io.ironsan:vol-2".into()
                },
            ]
        );
        assert!(parse_sessions("").is_empty());
    }

    #[test]
    fn discovery_lines() {
        let out = "127.0.0.1:3260,1 iqn.2026-11.io.ironsan:a\n\
                   [::1]:3260,1 iqn.2026-11.io.ironsan:b\n\
                   iscsiadm: cannot make connection\n";
        assert_eq!(
            parse_discovery(out),
            vec!["iqn.2026-11.io.ironsan:a", "iqn.2026-11.io.ironsan:b"]
        );
    }

    #[test]
    fn finds_the_disk_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path();
        let mk = |session: &str, iqn: &str, sdev: &str, disk: &str| {
            let s = class.join(session);
            std::fs::create_dir_all(
                s.join("device")
                    .join("target2:0:0")
                    .join(sdev)
                    .join("block")
                    .join(disk),
            )
            .unwrap();
            std::fs::write(s.join("targetname"), format!("{iqn}\n")).unwrap();
            std::fs::write(s.join("state"), "LOGGED_IN\n").unwrap();
        };
        mk("session1", "iqn.2026-11.io.ironsan:a", "2:0:0:0", "sdb");
        mk("session2", "iqn.2026-11.io.ironsan:b", "3:0:0:0", "sdc");
        mk("session3", "iqn.2026-11.io.ironsan:c", "4:0:0:1", "sdd");
        assert_eq!(
            device_in(class, "iqn.2026-11.io.ironsan:b", 0).as_deref(),
            Some("sdc")
        );
        assert_eq!(
            device_in(class, "iqn.2026-11.io.ironsan:a", 0).as_deref(),
            Some("sdb")
        );
        assert_eq!(device_in(class, "iqn.2026-11.io.ironsan:c", 0), None);
        assert_eq!(
            device_in(class, "iqn.2026-11.io.ironsan:c", 1).as_deref(),
            Some("sdd")
        );
        assert_eq!(device_in(class, "iqn.2026-11.io.ironsan:zzz", 0), None);
        assert_eq!(
            device_in(&class.join("missing"), "iqn.2026-11.io.ironsan:a", 0),
            None
        );
        assert_eq!(sessions_in(class, "iqn.2026-11.io.ironsan:a").len(), 1);
    }

    #[test]
    fn chap_debug_hides_secrets() {
        let c = Chap {
            username: "u".into(),
            password: "hunter2".into(),
            username_in: Some("t".into()),
            password_in: Some("swordfish".into()),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("swordfish"), "{s}");
    }
}
