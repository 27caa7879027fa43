//! `outbox-operator`: `run` the controller, print the `crd`, or `render` the objects for a
//! relay without a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use outbox_operator::crd;
use outbox_operator::http::{self, Probes};
use outbox_operator::metrics::Metrics;
use outbox_operator::reconcile::{self, Context};
use outbox_operator::resources::{DEFAULT_WORKER_IMAGE, Settings};
use outbox_operator::telemetry;
use tracing::{error, info, warn};

/// Kubernetes operator for OutboxRelay and InboxRelay resources.
#[derive(Parser, Debug)]
#[command(name = "outbox-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (in-cluster or with the current kubeconfig).
    Run(RunArgs),
    /// Print the OutboxRelay and InboxRelay CustomResourceDefinitions as YAML.
    Crd(CrdArgs),
    /// Print, without a cluster, the objects the operator would apply for a relay (either kind).
    Render(RenderArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Worker image for relays that do not set spec.image.
    #[arg(long, env = "WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    worker_image: String,
    /// Image prefixes spec.image may start with, comma-separated (e.g.
    /// `registry.example.com/outbox/`). Empty: spec.image may only name --worker-image.
    #[arg(long, env = "IMAGE_ALLOWLIST", value_delimiter = ',', num_args = 0..)]
    image_allowlist: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Use a Lease so that only one operator replica reconciles.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the operator's Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "outbox-operator")]
    lease_name: String,
    /// Namespace of the operator's Lease (default: POD_NAMESPACE, else the client's default).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the Lease and in Events (default: hostname).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// `json` for JSON log lines, anything else for text.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(clap::Args, Debug)]
struct CrdArgs {
    /// Only this CRD, by plural name (`outboxrelays`, `inboxrelays`); default: both.
    #[arg(value_parser = ["outboxrelays", "inboxrelays"])]
    plural: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RenderArgs {
    /// OutboxRelay or InboxRelay manifest (YAML; `-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Worker image for relays that do not set spec.image.
    #[arg(long, env = "WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    worker_image: String,
    /// Image prefixes spec.image may start with, as for `run`.
    #[arg(long, env = "IMAGE_ALLOWLIST", value_delimiter = ',', num_args = 0..)]
    image_allowlist: Vec<String>,
    /// Namespace when the manifest has none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

fn settings(worker_image: &str, allowlist: &[String]) -> Settings {
    Settings {
        default_image: worker_image.to_owned(),
        image_allowlist: allowlist
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect(),
    }
}

fn render(args: &RenderArgs) -> anyhow::Result<String> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let settings = settings(&args.worker_image, &args.image_allowlist);
    Ok(outbox_operator::render::render(
        &text,
        &settings,
        &args.namespace,
    )?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(args.log_format == "json")?;
    let metrics = Arc::new(Metrics::new());
    let probes = Probes {
        ready: Arc::default(),
        metrics: metrics.clone(),
    };
    let server = tokio::spawn(http::serve(args.health_addr, probes.clone()));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let settings = settings(&args.worker_image, &args.image_allowlist);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics.clone(),
        args.pod_name.clone(),
    ));
    info!(image = %args.worker_image, allowlist = ?args.image_allowlist, namespace = ?args.watch_namespace, "outbox-operator starting");

    if !args.leader_election {
        probes.ready.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        reconcile::run(ctx, args.watch_namespace).await;
        return Ok(());
    }

    let identity = match &args.pod_name {
        Some(p) => p.clone(),
        None => std::env::var("HOSTNAME").unwrap_or_else(|_| "outbox-operator".into()),
    };
    let lease_namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration_seconds)
        .with_grace(args.lease_duration_seconds.div_ceil(3).max(1))
        .with_field_manager(reconcile::FIELD_MANAGER)
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leader, lease_task) = manager.watch().await;
    probes.ready.store(true, Ordering::Relaxed);
    info!(lease = %args.lease_name, namespace = %lease_namespace, %identity, "waiting for leadership");

    // Wait to become leader (or stop on a signal while standing by).
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    bail!("leader election stopped");
                }
            }
            _ = tokio::signal::ctrl_c() => {
                info!("shutting down while standing by");
                return Ok(());
            }
        }
    }
    info!("became leader; starting the controller");
    metrics.leader.set(1);

    let controller = reconcile::run(ctx, args.watch_namespace);
    tokio::pin!(controller);
    let lost = async {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                return;
            }
        }
    };
    tokio::select! {
        () = &mut controller => {
            info!("controller stopped; releasing the Lease");
            drop(leader);
            match lease_task.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %e, "releasing the Lease failed"),
                Err(e) => warn!(error = %e, "lease task failed"),
            }
            server.abort();
            Ok(())
        }
        () = lost => {
            metrics.leader.set(0);
            error!("lost leadership; exiting so that a fresh process can stand by");
            bail!("lost leadership")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd(args) => crd::crd_yaml(args.plural.as_deref())
            .map(|yaml| print!("{yaml}"))
            .map_err(anyhow::Error::from),
        Command::Render(args) => render(&args).map(|yaml| print!("{yaml}")),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whole cause chain; no backtrace even with RUST_BACKTRACE set.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
