//! Logging and metrics setup shared by every daemon.
//!
//! Each daemon calls [`init_tracing`] once and may serve [`serve_metrics`]: a tiny HTTP/1.1
//! responder with `GET /metrics` (Prometheus text from the `metrics` recorder), `GET /healthz`
//! (liveness: 200 while the process serves) and `GET /readyz` (readiness: `200 ready` or `503`
//! with a one-line reason, from the daemon's [`Readiness`]). It is hand-rolled on tokio so that
//! no HTTP stack or TLS provider is built into the binary for three read-only endpoints.
//!
//! Kubernetes probes these: a failing `/healthz` restarts the container, a failing `/readyz`
//! only holds back what waits for readiness (a StatefulSet's next pod in a rolling update,
//! a Service's endpoints), so `/readyz` may say "not yet" for as long as it needs to.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the `tracing` subscriber: `RUST_LOG` wins, else `default_filter`.
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // A second call (tests starting several daemons in one process) is harmless.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the global Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; metrics then go there instead.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A readiness check: `Ok(())` when ready, else why not (one line). Called for every `/readyz`
/// request on a runtime worker, so it must be cheap and never block: read atomics or a watch,
/// never call out.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `/readyz` answers. Created before the daemon's parts exist (the metrics endpoint comes
/// up first), not ready ("starting") until the daemon [`set`](Readiness::set)s its check.
/// Cheap to clone; clones share the check.
#[derive(Clone)]
pub struct Readiness {
    check: Arc<RwLock<Option<ReadyCheck>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("now", &self.check())
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness {
            check: Arc::new(RwLock::new(None)),
        }
    }

    /// Installs (or replaces) the check.
    pub fn set(&self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        let check: ReadyCheck = Arc::new(check);
        match self.check.write() {
            Ok(mut c) => *c = Some(check),
            Err(p) => *p.into_inner() = Some(check),
        }
    }

    /// Runs the check. The lock is held only to clone the check out, never while it runs.
    pub fn check(&self) -> Result<(), String> {
        let check = match self.check.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match check {
            Some(f) => f(),
            None => Err("starting".to_string()),
        }
    }
}

/// The `/readyz` answer: status line and body (one line, whatever the check wrote).
fn readyz(ready: &Readiness) -> (&'static str, String) {
    match ready.check() {
        Ok(()) => ("200 OK", "ready\n".to_string()),
        Err(why) => {
            let line: String = why
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            ("503 Service Unavailable", format!("{}\n", line.trim()))
        }
    }
}

/// Reads a request head into `buf` until its blank line (or `buf` is full: only the request
/// line matters). Closing with a request half read would reset the connection under a
/// client that wrote it in pieces. None if the client went away first.
async fn read_head(sock: &mut tokio::net::TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return (n > 0).then_some(n),
            Ok(m) => n += m,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Some(n)
}

/// Serves `/metrics`, `/healthz` and `/readyz` (answered by `ready`) on `addr` until the
/// process ends.
pub async fn serve_metrics(addr: SocketAddr, ready: Readiness) -> std::io::Result<SocketAddr> {
    let handle = metrics_handle();
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(Some(n)) = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    read_head(&mut sock, &mut buf).await
                })
                .await
                else {
                    return;
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let target = req.split_whitespace().nth(1).unwrap_or("/");
                // Probes may add a query string (`/readyz?verbose`); it changes nothing here.
                let path = target.split('?').next().unwrap_or(target);
                let (status, body) = match path {
                    "/metrics" => ("200 OK", handle.render()),
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" => readyz(&ready),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_follows_the_check() {
        let ready = Readiness::new();
        let addr = serve_metrics("127.0.0.1:0".parse().unwrap(), ready.clone())
            .await
            .unwrap();
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("\r\n\r\nstarting\n"), "{r}");
        // Liveness is independent of readiness.
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 "));

        let up = Arc::new(AtomicBool::new(false));
        let u = up.clone();
        ready.set(move || {
            if u.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no leader known\nsecond line".into())
            }
        });
        let r = get(addr, "/readyz?verbose").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("\r\n\r\nno leader known second line\n"), "{r}");
        up.store(true, Ordering::Relaxed);
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.ends_with("\r\n\r\nready\n"), "{r}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));

        // A request written in pieces is read to its end, then answered.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        s.write_all(b"host: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    }
}
