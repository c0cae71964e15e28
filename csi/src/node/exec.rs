//! Running the node's tools (iscsiadm, mount, mkfs, blkid, resize2fs, ...): `tokio::process`
//! with a deadline after which the tool is killed, output captured, `LC_ALL=C` so its messages
//! parse the same everywhere. A failure names the command line (secrets masked) and its stderr.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use super::NodeError;

/// Output kept in an error message: enough for the tool's complaint, never a flood.
const MAX_SHOWN: usize = 2000;

/// One command line. Arguments marked secret (CHAP passwords) are shown as `***`.
#[derive(Clone)]
pub struct Cmd {
    prog: String,
    args: Vec<String>,
    secret: Vec<bool>,
    timeout: Duration,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit status (-1: killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

impl Cmd {
    pub fn new(prog: &str, timeout: Duration) -> Cmd {
        Cmd {
            prog: prog.to_string(),
            args: Vec::new(),
            secret: Vec::new(),
            timeout,
        }
    }

    pub fn arg(mut self, a: impl AsRef<str>) -> Cmd {
        self.args.push(a.as_ref().to_string());
        self.secret.push(false);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// An argument that must never reach a log or an error message.
    pub fn secret_arg(mut self, a: impl AsRef<str>) -> Cmd {
        self.args.push(a.as_ref().to_string());
        self.secret.push(true);
        self
    }

    /// Runs to completion (or the deadline). Any exit status is an `Output`; only a tool that
    /// cannot be started or outlives its deadline is an error.
    pub async fn output(&self) -> Result<Output, NodeError> {
        let mut cmd = tokio::process::Command::new(&self.prog);
        cmd.args(&self.args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| NodeError::Spawn {
            cmd: self.to_string(),
            source: e,
        })?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| NodeError::Spawn {
                cmd: self.to_string(),
                source: e,
            })?,
            // Dropping the future drops the child, which kill_on_drop kills.
            Err(_) => {
                return Err(NodeError::Timeout {
                    cmd: self.to_string(),
                    secs: self.timeout.as_secs(),
                })
            }
        };
        let output = Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        tracing::debug!(cmd = %self, code = output.code, "ran");
        Ok(output)
    }

    /// Runs and requires exit status 0.
    pub async fn run(&self) -> Result<Output, NodeError> {
        let out = self.output().await?;
        if out.success() {
            Ok(out)
        } else {
            Err(self.failed(&out))
        }
    }

    /// The error for a run that ended with `out`.
    pub fn failed(&self, out: &Output) -> NodeError {
        NodeError::Command {
            cmd: self.to_string(),
            code: out.code,
            output: shown(out),
        }
    }
}

/// stderr, or stdout when the tool complained there (iscsiadm does both).
fn shown(out: &Output) -> String {
    let text = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    if text.len() <= MAX_SHOWN {
        return text.to_string();
    }
    let mut end = MAX_SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prog)?;
        for (a, secret) in self.args.iter().zip(&self.secret) {
            if *secret {
                f.write_str(" ***")?;
            } else if a.is_empty() || a.contains(char::is_whitespace) {
                write!(f, " {a:?}")?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let c = Cmd::new("iscsiadm", Duration::from_secs(1))
            .args(["-m", "node", "-v"])
            .secret_arg("hunter2")
            .arg("a b");
        assert_eq!(c.to_string(), "iscsiadm -m node -v *** \"a b\"");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn status_output_and_deadline() {
        let ok = Cmd::new("sh", Duration::from_secs(10))
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output()
            .await
            .unwrap();
        assert_eq!(
            (ok.code, ok.stdout.trim(), ok.stderr.trim()),
            (3, "out", "err")
        );
        let failed = Cmd::new("sh", Duration::from_secs(10))
            .args(["-c", "echo nope >&2; exit 1"])
            .run()
            .await
            .unwrap_err();
        assert!(failed.to_string().contains("nope"), "{failed}");
        let slow = Cmd::new("sleep", Duration::from_millis(200))
            .arg("5")
            .output()
            .await
            .unwrap_err();
        assert!(matches!(slow, NodeError::Timeout { .. }), "{slow}");
        let missing = Cmd::new("/nonexistent/tool", Duration::from_secs(1))
            .output()
            .await
            .unwrap_err();
        assert!(matches!(missing, NodeError::Spawn { .. }), "{missing}");
    }
}
