//! Traces across the whole path, exported over real OTLP to a receiver the
//! test runs (devkit's `OtlpReceiver`, which decodes the export requests with
//! the official protobuf definitions): the producer's span in this process
//! (the "application"), the relay's `publish` and the inbox worker's
//! `receive` in their real binaries, and the processor's `process` span with
//! the handler's own span under it, back in this process.

use std::time::Duration;

use devkit::otlp::{OtlpReceiver, Span as Received, render_trace};
use futures::future::BoxFuture;
use google_cloud_pubsub::model::Message;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox_worker::app::{
    HandlerError, InboxMessage, InboxProcessor, OutboxMessage, ProcessorConfig,
};
use sqlx::PgConnection;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::harness::*;
use crate::inbox_support::*;

const WAIT: Duration = Duration::from_secs(60);

/// The application's tracing, as a service using this library would set it
/// up: `tracing` with `tracing-opentelemetry`, exporting over OTLP/HTTP.
/// Installed for this test's thread only (tests are `current_thread`).
struct App {
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl App {
    fn install(receiver: &OtlpReceiver, service: &'static str) -> App {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", receiver.http_endpoint()))
            .build()
            .expect("exporter");
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("app"));
        let subscriber = tracing_subscriber::registry().with(layer);
        App {
            _guard: tracing::subscriber::set_default(subscriber),
            provider,
        }
    }

    /// Sends what the application's exporter holds.
    async fn flush(&self) {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .expect("flush task")
            .expect("flush");
    }
}

/// What the workers need to export to `endpoint`.
fn otel(endpoint: String, protocol: &str, service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        // Export soon after a span ends, so the test does not wait 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

/// Writes one message inside the application's span; returns its trace
/// id, the span's id and the message id.
async fn produce(pool: &sqlx::PgPool, key: &str) -> (String, String, uuid::Uuid) {
    let span = tracing::info_span!("place order", order.key = key);
    async {
        let mut tx = pool.begin().await.expect("begin");
        let id = OutboxMessage::new(b"{\"order\":42}".to_vec())
            .ordering_key(key)
            .attribute("type", "order.placed")
            .write(&mut tx)
            .await
            .expect("write");
        tx.commit().await.expect("commit");
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string(), id)
    }
    .instrument(span)
    .await
}

/// The application's handler: its own span and SQL under the `process` span.
fn charge<'a>(
    tx: &'a mut PgConnection,
    m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    let span = tracing::info_span!("charge card", message_id = %m.message_id);
    Box::pin(
        async move {
            sqlx::query("SELECT pg_sleep(0.01)")
                .execute(&mut *tx)
                .await?;
            Ok(())
        }
        .instrument(span),
    )
}

fn find<'a>(
    spans: &'a [Received],
    service: &str,
    name: &str,
    trace_id: &str,
) -> Option<&'a Received> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && s.trace_id == trace_id)
}

#[tokio::test]
async fn one_trace_connects_the_producer_the_relay_the_inbox_and_the_handler() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let ib = InboxEnv::new("trace_path").await;
    let app = App::install(&receiver, "shop");
    // The relay exports over OTLP/HTTP, the inbox worker over OTLP/gRPC.
    let relay_env = otel(receiver.http_endpoint(), "http/protobuf", "outbox-relay");
    let _relay = ib.env.spawn_relay_with(&[], &relay_env);
    let inbox_env = otel(receiver.grpc_endpoint(), "grpc", "outbox-inbox");
    let _inbox = ib.spawn_inbox_with(&[], &inbox_env);

    let (trace_id, producer, message_id) = produce(&ib.env.pool, "order-42").await;
    let traceparent = format!("00-{trace_id}-{producer}-01");

    // A plain subscriber sees the context under both names.
    let received = ib
        .env
        .collector
        .wait_distinct(1, WAIT)
        .await
        .expect("delivered");
    let attrs = &received[0].attributes;
    assert_eq!(attrs.get("traceparent"), Some(&traceparent), "{attrs:?}");
    assert_eq!(
        attrs.get("googclient_traceparent"),
        Some(&traceparent),
        "{attrs:?}"
    );

    // The inbox kept it with the row.
    ib.wait_stored(1).await;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM inbox WHERE message_id = $1")
            .bind(message_id.to_string())
            .fetch_one(&ib.env.pool)
            .await
            .expect("inbox row");
    assert_eq!(stored.as_deref(), Some(traceparent.as_str()));

    // The application processes it.
    let processor = InboxProcessor::new(
        ib.env.pool.clone(),
        ProcessorConfig::new("inbox".parse().expect("table")),
    );
    let report = processor.process_batch(&charge).await.expect("process");
    assert_eq!(report.processed, 1, "{report:?}");
    app.flush().await;

    let spans = receiver
        .wait_for("the whole path in one trace", WAIT, |spans| {
            let place = find(spans, "shop", "place order", &trace_id)?;
            let publish = spans.iter().find(|s| {
                s.service == "outbox-relay"
                    && s.links.contains(&(trace_id.clone(), producer.clone()))
            })?;
            let receive = spans
                .iter()
                .find(|s| s.service == "outbox-inbox" && s.trace_id == trace_id)?;
            let process = spans.iter().find(|s| {
                s.service == "shop" && s.trace_id == trace_id && s.name.starts_with("process")
            })?;
            let charge = find(spans, "shop", "charge card", &trace_id)?;
            Some((
                place.clone(),
                publish.clone(),
                receive.clone(),
                process.clone(),
                charge.clone(),
            ))
        })
        .await
        .expect("spans");
    let (place, publish, receive, process, charge) = spans;
    println!("{}", render_trace(&receiver.spans(), &trace_id));

    assert_eq!(place.span_id, producer);
    assert_eq!(publish.name, format!("publish {}", ib.env.topic));
    assert_eq!(publish.kind, "producer");
    assert_ne!(
        publish.trace_id, trace_id,
        "a batch's span is its own trace, linked"
    );
    assert_eq!(publish.attributes["messaging.system"], "gcp_pubsub");
    assert_eq!(
        publish.attributes["messaging.destination.name"],
        ib.env.topic
    );
    assert_eq!(publish.attributes["messaging.operation.type"], "send");
    assert_eq!(publish.attributes["outbox.published"], "1");

    assert_eq!(
        receive.parent_span_id, producer,
        "receive is a child of the producer"
    );
    assert_eq!(receive.name, format!("receive {}", ib.subscription));
    assert_eq!(receive.kind, "consumer");
    assert_eq!(receive.attributes["messaging.operation.type"], "receive");
    assert_eq!(
        receive.attributes["outbox.message_id"],
        message_id.to_string()
    );
    assert!(!receive.attributes["messaging.message.id"].is_empty());

    assert_eq!(
        process.parent_span_id, producer,
        "process is a child of the producer"
    );
    assert_eq!(process.kind, "consumer");
    assert_eq!(process.attributes["messaging.operation.type"], "process");
    assert_eq!(
        charge.parent_span_id, process.span_id,
        "the handler's span nests in process"
    );
    assert!(charge.start_unix_nano >= process.start_unix_nano);
    assert!(charge.end_unix_nano <= process.end_unix_nano);
}

#[tokio::test]
async fn googles_client_library_attribute_carries_the_trace_both_ways() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let ib = InboxEnv::new("trace_google").await;
    let app = App::install(&receiver, "shop");
    let _relay = ib.env.spawn_relay(&[]);
    let inbox_env = otel(receiver.http_endpoint(), "http/protobuf", "outbox-inbox");
    let _inbox = ib.spawn_inbox_with(&[], &inbox_env);

    // Out: a subscriber that reads only `googclient_traceparent` (as Google's
    // libraries do, with a prefixed carrier) continues the producer's trace.
    let (trace_id, producer, _) = produce(&ib.env.pool, "k").await;
    let received = ib
        .env
        .collector
        .wait_distinct(1, WAIT)
        .await
        .expect("delivered");
    let google_only: std::collections::HashMap<String, String> = received[0]
        .attributes
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("googclient_")
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect();
    let cx = TraceContextPropagator::new().extract(&google_only);
    let sc = cx.span().span_context().clone();
    assert_eq!(sc.trace_id().to_string(), trace_id);
    assert_eq!(sc.span_id().to_string(), producer);

    // In: a message published by such a library (only the `googclient_`
    // names) is stored with its context, and processed inside its trace.
    let foreign_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let foreign_parent = format!("00-{foreign_trace}-00f067aa0ba902b7-01");
    let message = Message::new()
        .set_data(b"from a Go service".to_vec())
        .set_attributes([
            ("message-id".to_owned(), "from-go-1".to_owned()),
            ("googclient_traceparent".to_owned(), foreign_parent.clone()),
            ("googclient_tracestate".to_owned(), "vendor=1".to_owned()),
        ]);
    devkit::pull::publish_raw(&endpoint(&ib.env), &ib.env.topic, vec![message])
        .await
        .expect("publish");
    ib.wait_stored(2).await;
    let (parent, state): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT traceparent, tracestate FROM inbox WHERE message_id = 'from-go-1'")
            .fetch_one(&ib.env.pool)
            .await
            .expect("row");
    assert_eq!(parent.as_deref(), Some(foreign_parent.as_str()));
    assert_eq!(state.as_deref(), Some("vendor=1"));

    let processor = InboxProcessor::new(
        ib.env.pool.clone(),
        ProcessorConfig::new("inbox".parse().expect("table")),
    );
    processor.process_batch(&charge).await.expect("process");
    app.flush().await;
    receiver
        .wait_for("the handler inside the Go service's trace", WAIT, |spans| {
            let receive = spans
                .iter()
                .find(|s| s.service == "outbox-inbox" && s.trace_id == foreign_trace)?;
            let charge = find(spans, "shop", "charge card", foreign_trace)?;
            (receive.parent_span_id == "00f067aa0ba902b7").then_some(charge.clone())
        })
        .await
        .expect("spans");
}

/// A row written by SQL from another language, with a sampled context.
/// Rows `start..start + n` of key `k`, payload `k:i`.
async fn insert_traced(pool: &sqlx::PgPool, start: usize, n: usize) {
    for i in start..start + n {
        let traceparent = format!("00-{:032x}-{:016x}-01", 0xabc0_0000 + i, 0x1000 + i);
        sqlx::query(
            "INSERT INTO outbox (payload, ordering_key, attributes) \
             VALUES ($1, 'k', jsonb_build_object('traceparent', $2::text))",
        )
        .bind(format!("k:{i}").into_bytes())
        .bind(traceparent)
        .execute(pool)
        .await
        .expect("insert");
    }
}

#[tokio::test]
async fn sampling_off_exports_no_spans() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let env = TestEnv::new("trace_off").await;
    let mut otel_env = otel(receiver.http_endpoint(), "http/protobuf", "outbox-relay");
    otel_env.push(("OTEL_TRACES_SAMPLER", "always_off".to_owned()));
    let mut relay = env.spawn_relay_with(&[], &otel_env);
    insert_traced(&env.pool, 0, 50).await;
    let received = env
        .collector
        .wait_distinct(50, WAIT)
        .await
        .expect("delivered");
    assert_per_key_order(&received);
    env.wait_drained().await;
    assert_eq!(relay.metric("otel_spans_exported_total").await, Some(0.0));
    // A clean stop flushes whatever the exporter holds: nothing.
    relay
        .terminate(Duration::from_secs(20))
        .await
        .expect("stop");
    assert_eq!(receiver.requests(), 0, "{:?}", receiver.spans());
    // The same relay with sampling on does export (the test can fail).
    let on = otel(receiver.http_endpoint(), "http/protobuf", "outbox-relay");
    let _relay = env.spawn_relay_with(&[], &on);
    insert_traced(&env.pool, 50, 5).await;
    receiver
        .wait_for("a publish span with sampling on", WAIT, |spans| {
            spans
                .iter()
                .find(|s| s.name.starts_with("publish"))
                .cloned()
        })
        .await
        .expect("spans");
}

/// Waits until the relay counted spans dropped for `reason`.
async fn wait_for_drops(relay: &devkit::WorkerProcess, reason: &str) {
    let metric = format!("otel_spans_dropped_total{{reason=\"{reason}\"}}");
    devkit::wait_for(&format!("{reason} drops counted"), WAIT, || async {
        (relay.metric(&metric).await? > 0.0).then_some(())
    })
    .await
    .expect("dropped spans counted");
}

/// Accepts connections and never answers: a collector that hangs.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_dead_collector_costs_nothing_but_dropped_spans() {
    let env = TestEnv::new("trace_dead").await;
    // A collector that refuses connections: each export fails and is counted.
    let refused = format!("http://127.0.0.1:{}", devkit::free_port().expect("port"));
    let mut relay = env.spawn_relay_with(&[], &otel(refused, "http/protobuf", "r"));
    insert_traced(&env.pool, 0, 20).await;
    env.collector
        .wait_distinct(20, WAIT)
        .await
        .expect("delivered while refused");
    wait_for_drops(&relay, "export_failed").await;
    relay
        .terminate(Duration::from_secs(20))
        .await
        .expect("stop");

    // A collector that hangs: the queue fills, new spans are dropped and
    // counted, and the relay publishes as fast as ever.
    let (hole, _task) = black_hole().await;
    let mut hanging = otel(hole, "http/protobuf", "r");
    hanging.push(("OTEL_BSP_MAX_QUEUE_SIZE", "4".to_owned()));
    hanging.push(("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2".to_owned()));
    let relay = env.spawn_relay_with(&[], &hanging);
    // Each row published before the next is written: one batch, so one
    // span, per row (rows written back to back may share a claim), far
    // more than the queue of 4 holds while the first export hangs.
    for i in 20..60 {
        insert_traced(&env.pool, i, 1).await;
        env.collector
            .wait_distinct(i + 1, WAIT)
            .await
            .expect("delivered while hanging");
    }
    assert_per_key_order(&env.collector.snapshot());
    wait_for_drops(&relay, "queue_full").await;
    assert_eq!(relay.metric("otel_spans_exported_total").await, Some(0.0));
}
