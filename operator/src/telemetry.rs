//! Logging setup: `tracing` with an env filter (`RUST_LOG`), JSON lines when
//! `LOG_FORMAT=json` (what log collectors in a cluster want), text otherwise.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Logs go to stderr so `crd` / `render` keep a clean stdout.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,kube_runtime=info,kube_client=warn,tower=warn,hyper=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
