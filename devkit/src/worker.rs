//! The real `outbox-worker` binary as a child process, for tests that kill it.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::process::{signal, spawn_tied};

/// A running `outbox-worker` process.
pub struct WorkerProcess {
    child: Option<Child>,
    /// The health/metrics address it serves.
    pub health_addr: String,
    log: PathBuf,
}

impl WorkerProcess {
    /// Spawns `binary` with `args` and `env`; its output goes to `log`.
    pub fn spawn(
        binary: &Path,
        args: &[&str],
        env: &[(&str, String)],
        health_port: u16,
        log: PathBuf,
    ) -> anyhow::Result<WorkerProcess> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let health_addr = format!("127.0.0.1:{health_port}");
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("HEALTH_ADDR", &health_addr)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child =
            spawn_tied(&mut cmd).with_context(|| format!("spawning {}", binary.display()))?;
        Ok(WorkerProcess {
            child: Some(child),
            health_addr,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// GET a path of the health server: (status, body), or None if it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{}{path}", self.health_addr);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        let response = client.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for("the worker to be ready", timeout, || async {
            self.get("/readyz")
                .await
                .filter(|(s, _)| *s == 200)
                .map(|_| ())
        })
        .await
        .with_context(|| format!("worker log:\n{}", self.log()))
    }

    /// A metric's value from `/metrics` (the first sample whose name and
    /// labels start with `name`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        parse_metric(&body, name)
    }

    /// The worker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Freezes the process (SIGSTOP), e.g. to change the world under it.
    pub fn pause(&self) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP)?;
        }
        Ok(())
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT)?;
        }
        Ok(())
    }

    /// `kill -9`.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL)?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("worker not running")?;
        signal(&child, libc::SIGTERM)?;
        let status = crate::wait_for("the worker to exit", timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }
}

/// The upper bound of the histogram bucket holding quantile `q` (0..1) of
/// histogram `name` in Prometheus text; `None` without observations.
pub fn histogram_quantile(body: &str, name: &str, q: f64) -> Option<f64> {
    bucket_quantile(&histogram_buckets(body, name), q)
}

/// The cumulative buckets `(le, count)` of histogram `name` in Prometheus
/// text, in order (empty when the histogram is not there).
pub fn histogram_buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` (0..1) of cumulative
/// buckets; `None` without observations.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= q * total)
        .map(|(le, _)| *le)
}

/// Finds `name` (with or without labels) in Prometheus text.
pub fn parse_metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_buckets() {
        let body = "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.01\"} 90\nx_bucket{le=\"0.1\"} 100\nx_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(histogram_quantile(body, "x", 0.05), Some(0.001));
        assert_eq!(histogram_quantile(body, "x", 0.5), Some(0.01));
        assert_eq!(histogram_quantile(body, "x", 0.99), Some(0.1));
        assert_eq!(histogram_quantile("", "x", 0.5), None);
    }
}
