//! `outbox-operator render`: the objects the operator would apply for a manifest, computed
//! offline with the same validation and translation as the reconcile loop.

use crate::crd::{InboxRelay, OutboxRelay};
use crate::resources::{self, DesiredError, Settings};
use crate::workload::Workload;

/// Written where render cannot know the value: the relay's uid (owner references).
pub const OFFLINE_UID: &str = "00000000-0000-0000-0000-000000000000";
/// Written where render cannot know the value: the hash of the referenced Secret keys.
pub const OFFLINE_SECRET_HASH: &str = "offline-render";

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Not YAML, or not shaped like its kind (e.g. a required field is missing).
    #[error("not a valid OutboxRelay or InboxRelay: {0}")]
    Parse(serde_norway::Error),
    /// Neither an OutboxRelay nor an InboxRelay.
    #[error("expected apiVersion outbox.dev/v1alpha1 and kind OutboxRelay or InboxRelay, got {0}")]
    WrongKind(String),
    /// Refused by validation: the same message the reconcile would report.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// Serialization of the output failed.
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<serde_norway::Error> for RenderError {
    fn from(e: serde_norway::Error) -> Self {
        // Not a `source`: the message already carries it, and `{:#}` would repeat it.
        RenderError::Parse(e)
    }
}

/// Parses `manifest` (one OutboxRelay or InboxRelay) and returns the objects as a
/// multi-document YAML stream. `namespace` is used when the manifest has none.
pub fn render(manifest: &str, settings: &Settings, namespace: &str) -> Result<String, RenderError> {
    let value: serde_json::Value = serde_norway::from_str(manifest)?;
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("outbox.dev/v1alpha1", "OutboxRelay") => {
            render_as::<OutboxRelay>(manifest, settings, namespace)
        }
        ("outbox.dev/v1alpha1", "InboxRelay") => {
            render_as::<InboxRelay>(manifest, settings, namespace)
        }
        _ => Err(RenderError::WrongKind(format!("{api_version:?} {kind:?}"))),
    }
}

fn render_as<W: Workload>(
    manifest: &str,
    settings: &Settings,
    namespace: &str,
) -> Result<String, RenderError> {
    let mut relay: W = serde_norway::from_str(manifest)?;
    let meta = relay.meta_mut();
    if meta.namespace.is_none() {
        meta.namespace = Some(namespace.to_owned());
    }
    if meta.uid.is_none() {
        meta.uid = Some(OFFLINE_UID.to_owned());
    }
    let desired = resources::desired(&relay, settings, OFFLINE_SECRET_HASH)?;
    let mut out = String::new();
    for value in desired.to_values()? {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&value)?);
    }
    Ok(out)
}
