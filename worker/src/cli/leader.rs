//! Leader election flags, shared by `relay` and `inbox`, and starting the
//! chosen elector (see `outbox_worker::leader`).

use anyhow::Context;
use clap::Args;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::duration;
use outbox_worker::health::Health;
use outbox_worker::ident::TableName;
use outbox_worker::leader::kubernetes::{LeaseElector, Report};
use outbox_worker::leader::postgres::{LockSpace, PgElector};
use outbox_worker::leader::{self, Backend, Fence, Leadership, Timings};

/// Which worker elects a leader: it decides the default Lease name and the
/// advisory lock's key space, so a relay and an inbox worker never share a
/// lock.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Relay,
    Inbox,
}

/// Leader election flags.
#[derive(Args)]
pub struct LeaderArgs {
    /// Which lock decides the leader: kubernetes (a Lease), postgres (an
    /// advisory lock) or none. Default: kubernetes inside a pod, else
    /// postgres. With none every replica works at once: a relay must then
    /// run as a single instance; every inbox worker pulls, which is only
    /// safe for an unordered subscription (replicas storing one key's
    /// messages at once may store them out of order).
    #[arg(long, env = "LEADER_ELECTION", value_enum)]
    leader_election: Option<Backend>,
    /// Name of the Lease (kubernetes backend). Default:
    /// outbox-relay-<table> (relay), outbox-inbox-<table> (inbox worker).
    #[arg(long, env = "LEASE_NAME")]
    lease_name: Option<String>,
    /// Namespace of the Lease. Default: the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity. Default: the host (pod) name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's lock stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How long a leader keeps leading without a confirmed renewal.
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    renew_deadline: Duration,
    /// Time between renewals and between acquisition attempts.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    retry_period: Duration,
    /// Owner of the Lease (kubernetes backend): its apiVersion, e.g.
    /// outbox.dev/v1alpha1. The Lease then names it as an owner, so it is
    /// garbage-collected with it. All four --lease-owner-* flags or none.
    #[arg(long, env = "LEASE_OWNER_API_VERSION")]
    lease_owner_api_version: Option<String>,
    /// Owner of the Lease: its kind, e.g. OutboxRelay.
    #[arg(long, env = "LEASE_OWNER_KIND")]
    lease_owner_kind: Option<String>,
    /// Owner of the Lease: its name.
    #[arg(long, env = "LEASE_OWNER_NAME")]
    lease_owner_name: Option<String>,
    /// Owner of the Lease: its uid.
    #[arg(long, env = "LEASE_OWNER_UID")]
    lease_owner_uid: Option<String>,
}

/// A running election: [`Election::lead`] works during each term.
pub struct Election {
    leadership: Leadership,
    release: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Keeps a `none` election's channel open.
    _always: Option<watch::Sender<Option<Fence>>>,
}

impl Election {
    /// Gives up leadership (the lock or Lease is released at once, so a
    /// standby takes over without waiting for expiry) and waits for the
    /// elector to finish.
    async fn release(self) {
        self.release.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

impl LeaderArgs {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("outbox-worker-{}", std::process::id()))
        })
    }

    /// The Lease's owner: all four flags, or none.
    fn owner(&self) -> anyhow::Result<Option<OwnerReference>> {
        let parts = [
            (
                "--lease-owner-api-version (LEASE_OWNER_API_VERSION)",
                &self.lease_owner_api_version,
            ),
            (
                "--lease-owner-kind (LEASE_OWNER_KIND)",
                &self.lease_owner_kind,
            ),
            (
                "--lease-owner-name (LEASE_OWNER_NAME)",
                &self.lease_owner_name,
            ),
            ("--lease-owner-uid (LEASE_OWNER_UID)", &self.lease_owner_uid),
        ];
        let given = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
        let missing: Vec<&str> = parts
            .iter()
            .filter(|(_, v)| !given(v))
            .map(|(n, _)| *n)
            .collect();
        if missing.len() == parts.len() {
            return Ok(None);
        }
        anyhow::ensure!(
            missing.is_empty(),
            "the Lease owner needs all four --lease-owner-* flags or none; missing: {}",
            missing.join(", ")
        );
        let value = |v: &Option<String>| v.clone().unwrap_or_default();
        Ok(Some(OwnerReference {
            api_version: value(&self.lease_owner_api_version),
            kind: value(&self.lease_owner_kind),
            name: value(&self.lease_owner_name),
            uid: value(&self.lease_owner_uid),
            controller: Some(false),
            block_owner_deletion: None,
        }))
    }

    /// Checks the flags, so that a mistake fails start-up before anything
    /// else runs ([`LeaderArgs::start`] checks them again).
    pub fn check(&self) -> anyhow::Result<()> {
        self.timings().validate()?;
        self.owner().map(|_| ())
    }

    fn timings(&self) -> Timings {
        Timings {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }

    /// Checks the flags and starts the elector. `table` is the worker's
    /// table (it names the lock); `report` is written on the Lease.
    pub async fn start(
        &self,
        role: Role,
        options: &sqlx::postgres::PgConnectOptions,
        table: &TableName,
        report: Report,
    ) -> anyhow::Result<Election> {
        let timings = self.timings();
        timings.validate()?;
        let owner = self.owner()?;
        let identity = self.identity();
        let backend = self.leader_election.unwrap_or_else(Backend::detect);
        tracing::info!(?backend, %identity, ?role, "leader election");
        let release = CancellationToken::new();
        let (leadership, task, always) = match backend {
            Backend::None => {
                let (tx, rx) = leader::always_leader();
                (rx, None, Some(tx))
            }
            Backend::Postgres => {
                let space = match role {
                    Role::Relay => LockSpace::Relay,
                    Role::Inbox => LockSpace::Inbox,
                };
                let elector =
                    PgElector::new(options.clone(), table.clone(), space, timings, identity);
                let (rx, task) = elector.spawn(release.clone());
                (rx, Some(task), None)
            }
            Backend::Kubernetes => {
                let client = kube::Client::try_default().await.context(
                    "--leader-election kubernetes needs in-cluster credentials or a kubeconfig",
                )?;
                let namespace = self
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                let name = self.lease_name.clone().unwrap_or_else(|| {
                    let prefix = match role {
                        Role::Relay => "outbox-relay",
                        Role::Inbox => "outbox-inbox",
                    };
                    format!("{prefix}-{}", table.name().replace('_', "-").to_lowercase())
                });
                tracing::info!(lease = %name, %namespace, owner = ?owner.as_ref().map(|o| &o.name), "using a Kubernetes Lease");
                let api = kube::Api::namespaced(client, &namespace);
                let elector = LeaseElector::new(api, name, identity, timings)
                    .with_owner(owner)
                    .with_report(report);
                let (rx, task) = elector.spawn(release.clone());
                (rx, Some(task), None)
            }
        };
        Ok(Election {
            leadership,
            release,
            task,
            _always: always,
        })
    }
}

/// A worker's leadership gauges: 1 while leading, and a count of every
/// gain and loss.
pub type LeaderGauges<'a> = (&'a Gauge, &'a Counter);

impl Election {
    /// Runs `term` (given a token cancelled when leadership is lost, and
    /// the term's fence) during each term of leadership and stands by in
    /// between, until `stop`; then releases. `term` returns `true` when it
    /// found itself no longer leading before the elector did: the next
    /// term then waits until the elector noticed, so this term is not
    /// started again. Releasing only after the last term ended lets the
    /// next leader start after this one's last commit.
    pub async fn lead(
        mut self,
        (health, stop): (&Health, &CancellationToken),
        (is_leader, transitions): LeaderGauges<'_>,
        work: &str,
        mut term: impl AsyncFnMut(&CancellationToken, &Fence) -> bool,
    ) {
        loop {
            tracing::info!("standing by until elected");
            // A standby is alive too: keep /healthz green while waiting.
            let fence = loop {
                health.heartbeat();
                let wait = leader::wait_until_leading(&mut self.leadership, stop);
                match tokio::time::timeout(Duration::from_secs(1), wait).await {
                    Ok(Some(fence)) => break Some(fence),
                    Ok(None) => break None,
                    Err(_) => continue,
                }
            };
            let Some(fence) = fence else { break };
            is_leader.set(1);
            transitions.inc();
            tracing::info!("leading: {work}");
            let lost = leader::lost_token(self.leadership.clone());
            let not_leader = term(&lost, &fence).await;
            is_leader.set(0);
            transitions.inc();
            if not_leader {
                let noticed = self.leadership.wait_for(Option::is_none);
                tokio::select! {
                    _ = noticed => {},
                    _ = stop.cancelled() => {},
                }
            }
            lost.cancel();
            if stop.is_cancelled() {
                break;
            }
            tracing::warn!("no longer leading: standing by");
        }
        self.release().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        leader: LeaderArgs,
    }

    fn parse(args: &[&str]) -> LeaderArgs {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .expect("parses")
            .leader
    }

    #[test]
    fn the_lease_owner_needs_all_four_flags_or_none() {
        assert!(parse(&[]).owner().expect("none is fine").is_none());
        let owner = parse(&[
            "--lease-owner-api-version",
            "outbox.dev/v1alpha1",
            "--lease-owner-kind",
            "OutboxRelay",
            "--lease-owner-name",
            "orders",
            "--lease-owner-uid",
            "1234",
        ])
        .owner()
        .expect("all four")
        .expect("an owner");
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("OutboxRelay", "orders", "1234")
        );
        assert_eq!(owner.controller, Some(false));
        assert_eq!(owner.block_owner_deletion, None);
        let error = parse(&[
            "--lease-owner-kind",
            "OutboxRelay",
            "--lease-owner-name",
            "orders",
        ])
        .owner()
        .expect_err("two of four");
        let message = error.to_string();
        assert!(
            message.contains("--lease-owner-api-version") && message.contains("--lease-owner-uid"),
            "{message}"
        );
    }
}
