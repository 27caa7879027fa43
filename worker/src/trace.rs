//! W3C trace context carried in message attributes, and the messaging spans
//! that continue it: the one place that knows the attribute names.
//!
//! A message's context is the span that wrote its outbox row (the
//! application's, captured by [`crate::app::OutboxMessage::write`] or set by
//! hand in SQL). It travels as `traceparent`/`tracestate` attributes, which
//! the relay also copies to `googclient_traceparent`/`googclient_tracestate`,
//! the names Google's Pub/Sub client libraries read and write. The inbox and
//! the processor accept either.
//!
//! Parsing and formatting are the OpenTelemetry SDK's
//! ([`TraceContextPropagator`]); spans are `tracing` spans that
//! `tracing-opentelemetry` turns into OpenTelemetry spans, so an
//! application's own spans nest under ours.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::{BTreeMap, HashMap};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::ident::{SubscriptionName, TableName, TopicName};

/// The W3C names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The names Google's client libraries use (their `googclient_` prefix).
pub const GOOGCLIENT_TRACEPARENT: &str = "googclient_traceparent";
pub const GOOGCLIENT_TRACESTATE: &str = "googclient_tracestate";

/// The `tracing` target of the messaging spans; the worker exports only
/// spans of this target.
pub const TARGET: &str = "outbox.messaging";

/// `messaging.system` for Google Cloud Pub/Sub.
pub const MESSAGING_SYSTEM: &str = "gcp_pubsub";

/// A message's trace context as it travels: the two W3C header values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl Carried {
    /// The context in attributes: the W3C names first, else Google's.
    pub fn from_attributes<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Carried> {
        let (parent, state) = match get(TRACEPARENT) {
            Some(parent) => (parent, get(TRACESTATE)),
            None => (get(GOOGCLIENT_TRACEPARENT)?, get(GOOGCLIENT_TRACESTATE)),
        };
        let parent = parent.trim();
        (!parent.is_empty()).then(|| Carried {
            traceparent: parent.to_owned(),
            tracestate: state.map(str::to_owned).filter(|s| !s.trim().is_empty()),
        })
    }

    /// Whether the producer sampled this message (the `sampled` flag of the
    /// last field), read without parsing the rest: the hot path asks this
    /// before doing anything else for a trace.
    pub fn sampled(&self) -> bool {
        sampled_flag(&self.traceparent)
    }

    /// The parsed span context; `None` for a malformed `traceparent`.
    pub fn span_context(&self) -> Option<SpanContext> {
        let cx = TraceContextPropagator::new().extract(self);
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.clone())
    }

    /// The context to parent a span on (empty for a malformed one).
    pub fn context(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(self)
    }
}

impl Extractor for Carried {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.traceparent),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// `traceparent` is `version-traceid-spanid-flags`; bit 0 of the flags is
/// `sampled`.
fn sampled_flag(traceparent: &str) -> bool {
    // The fourth field: later versions may append fields after it.
    let flags = traceparent.trim().split('-').nth(3).unwrap_or("");
    u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1)
}

/// Writes the current span's context into `attributes`, unless they carry
/// one already, there is no valid current context, or there is no room:
/// Pub/Sub allows 100 attributes, and the relay adds `message-id` and the
/// two `googclient_` copies when it can, so a context never makes a
/// publishable message unpublishable.
pub fn inject_current(attributes: &mut BTreeMap<String, String>) {
    if attributes.contains_key(TRACEPARENT) || attributes.len() + 3 > MAX_ATTRIBUTES {
        return;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(attributes));
    // The propagator writes an empty `tracestate` too; it carries nothing.
    if attributes.get(TRACESTATE).is_some_and(|s| s.is_empty()) {
        attributes.remove(TRACESTATE);
    }
}

/// Pub/Sub's limit of attributes per message.
const MAX_ATTRIBUTES: usize = crate::relay::message::limits::MAX_ATTRIBUTES;

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Adds Google's names for the context a message carries under the W3C
/// names, so that a subscriber using Google's client library with tracing
/// on continues the trace. Returns the carried context, if any.
pub fn add_google_names(attributes: &mut HashMap<String, String>) -> Option<Carried> {
    let carried = Carried::from_attributes(|k| attributes.get(k).map(String::as_str))?;
    attributes.insert(
        GOOGCLIENT_TRACEPARENT.to_owned(),
        carried.traceparent.clone(),
    );
    if let Some(state) = &carried.tracestate {
        attributes.insert(GOOGCLIENT_TRACESTATE.to_owned(), state.clone());
    }
    Some(carried)
}

/// Links a publish span keeps at most (the SDK's default span limit); the
/// rest of a batch's messages are not parsed at all.
pub const MAX_LINKS: usize = 128;

/// The relay's span for one claimed batch, from the claim to the commit
/// that deletes what Pub/Sub acknowledged; linked to each sampled message's
/// context (up to [`MAX_LINKS`]). `None` when nothing is exported or the
/// sampler did not pick this batch, so that an unsampled batch costs one
/// sampling decision.
pub fn publish_span(topic: &TopicName, messages: usize) -> Option<PublishSpan> {
    if !outbox_telemetry::exporting() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %topic,
        messaging.batch.message_count = messages,
    );
    span.context()
        .span()
        .span_context()
        .is_sampled()
        .then_some(PublishSpan { span, links: 0 })
}

/// A sampled publish span and how many links it has.
pub struct PublishSpan {
    span: tracing::Span,
    links: usize,
}

impl PublishSpan {
    /// Links the span to a message's context, if the producer sampled it.
    pub fn link(&mut self, carried: &Carried) {
        if self.links >= MAX_LINKS || !carried.sampled() {
            return;
        }
        if let Some(sc) = carried.span_context() {
            self.span.add_link(sc);
            self.links += 1;
        }
    }

    /// Marks the batch failed when its commit failed (its rows are
    /// published again).
    pub fn commit_failed(&self, error: &sqlx::Error) {
        self.span
            .set_status(opentelemetry::trace::Status::error(format!(
                "commit failed: {error}"
            )));
    }

    /// Records how the batch ended.
    pub fn finish(&self, published: usize, dead_lettered: usize, retried: usize) {
        self.span
            .set_attribute("outbox.published", published as i64);
        self.span
            .set_attribute("outbox.dead_lettered", dead_lettered as i64);
        self.span.set_attribute("outbox.retried", retried as i64);
        if retried > 0 || dead_lettered > 0 {
            self.span
                .set_status(opentelemetry::trace::Status::error(format!(
                    "{retried} not published this time, {dead_lettered} dead-lettered"
                )));
        }
    }
}

/// The inbox worker's span for one received message, a child of the
/// message's context, from its receipt to its acknowledgement after the
/// commit that stored it. Only for messages the producer sampled, and only
/// when spans are exported.
pub fn receive_span(
    subscription: &SubscriptionName,
    pubsub_message_id: &str,
    message_id: &str,
    carried: Option<&Carried>,
) -> Option<tracing::Span> {
    let carried = carried.filter(|c| c.sampled())?;
    if !outbox_telemetry::exporting() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "receive",
        otel.name = %format_args!("receive {subscription}"),
        otel.kind = "consumer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "receive",
        messaging.operation.name = "store",
        messaging.destination.subscription.name = %subscription,
        messaging.message.id = pubsub_message_id,
        outbox.message_id = message_id,
    );
    set_parent(&span, carried);
    Some(span)
}

/// The processor's span around the application's handler for one inbox
/// row: a child of the message's context, so that the handler's own spans
/// join the producer's trace. Without a context it is a plain `tracing`
/// span (the application's subscriber decides what becomes of it).
pub fn process_span(
    table: &TableName,
    id: i64,
    message_id: &str,
    attempt: i32,
    carried: Option<&Carried>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = %format_args!("process {table}"),
        otel.kind = "consumer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        outbox.inbox.table = %table,
        outbox.inbox.id = id,
        outbox.message_id = message_id,
        outbox.attempt = attempt,
    );
    // A malformed context is ignored: the span keeps its contextual parent.
    if let Some(carried) = carried.filter(|c| c.span_context().is_some()) {
        set_parent(&span, carried);
    }
    span
}

/// Marks a span failed, with the reason.
pub fn fail(span: &tracing::Span, reason: &str) {
    span.set_status(opentelemetry::trace::Status::error(reason.to_owned()));
}

/// Sets `parent` as the span's parent (the span must not have started).
fn set_parent(span: &tracing::Span, parent: &Carried) {
    // Only fails when no OpenTelemetry layer is installed: nothing to do then.
    let _ = span.set_parent(parent.context());
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn the_sampled_flag_is_read_from_the_last_field() {
        assert!(sampled_flag(PARENT));
        assert!(!sampled_flag(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        ));
        assert!(!sampled_flag("garbage"));
        assert!(!sampled_flag(""));
    }

    #[test]
    fn a_later_version_with_more_fields_is_read_at_the_fourth() {
        assert!(sampled_flag(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future"
        ));
    }

    #[test]
    fn the_w3c_names_win_over_googles() {
        let attrs: HashMap<&str, &str> = [
            (
                GOOGCLIENT_TRACEPARENT,
                "00-11111111111111111111111111111111-2222222222222222-01",
            ),
            (TRACEPARENT, PARENT),
            (TRACESTATE, "k=v"),
        ]
        .into();
        let carried = Carried::from_attributes(|k| attrs.get(k).copied()).unwrap();
        assert_eq!(carried.traceparent, PARENT);
        assert_eq!(carried.tracestate.as_deref(), Some("k=v"));
        let only_google: HashMap<&str, &str> = [(GOOGCLIENT_TRACEPARENT, PARENT)].into();
        let carried = Carried::from_attributes(|k| only_google.get(k).copied()).unwrap();
        assert_eq!(carried.traceparent, PARENT);
        assert!(Carried::from_attributes(|_| None).is_none());
    }

    #[test]
    fn a_carried_context_parses_and_a_malformed_one_does_not() {
        let good = Carried {
            traceparent: PARENT.into(),
            tracestate: None,
        };
        let sc = good.span_context().unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        let bad = Carried {
            traceparent: "00-zz-yy-01".into(),
            tracestate: None,
        };
        assert!(bad.span_context().is_none());
    }

    #[test]
    fn google_names_are_added_next_to_the_w3c_ones() {
        let mut attrs: HashMap<String, String> = [
            (TRACEPARENT.to_owned(), PARENT.to_owned()),
            (TRACESTATE.to_owned(), "k=v".to_owned()),
        ]
        .into();
        add_google_names(&mut attrs).unwrap();
        assert_eq!(attrs[GOOGCLIENT_TRACEPARENT], PARENT);
        assert_eq!(attrs[GOOGCLIENT_TRACESTATE], "k=v");
        let mut none: HashMap<String, String> = HashMap::new();
        assert!(add_google_names(&mut none).is_none());
        assert!(none.is_empty());
    }
}
