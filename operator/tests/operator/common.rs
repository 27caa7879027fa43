//! Shared helpers.

use std::path::PathBuf;

use outbox_operator::crd::{InboxRelay, OutboxRelay};
use outbox_operator::resources::Settings;

/// `operator/` (the crate root).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Text of `operator/examples/<name>`.
pub fn example_text(name: &str) -> String {
    let path = crate_dir().join("examples").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `operator/examples/inbox/<name>` parsed as an InboxRelay, with a uid and generation as
/// the API server would set them.
pub fn inbox_example(name: &str) -> InboxRelay {
    let text = example_text(&format!("inbox/{name}"));
    let mut relay: InboxRelay =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    relay.metadata.uid = Some("66666666-7777-8888-9999-000000000000".into());
    relay.metadata.generation = Some(1);
    relay
}

/// An example parsed as an OutboxRelay, with the uid and namespace the API server would set.
pub fn example(name: &str) -> OutboxRelay {
    let mut relay: OutboxRelay =
        serde_norway::from_str(&example_text(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    relay.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
    relay
        .metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    relay.metadata.generation = Some(1);
    relay
}

/// Settings with a fixed image, so golden files do not change with the crate version.
pub fn settings() -> Settings {
    Settings {
        default_image: "ghcr.io/outbox-dev/outbox-worker:0.0.0-test".into(),
        // The examples name images of these registries in spec.image.
        image_allowlist: vec!["registry.example.com/".into(), "ghcr.io/outbox-dev/".into()],
    }
}

/// Compares `actual` with the golden file `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites it.
pub fn assert_golden(name: &str, actual: &str) {
    let path = crate_dir().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the rendered output (review, then UPDATE_GOLDEN=1 cargo test -p operator):\n{actual}",
        path.display()
    );
}
