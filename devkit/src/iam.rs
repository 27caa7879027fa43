//! A stand-in for the IAM policy service that the Pub/Sub emulator consults
//! when it runs with `--enable_iam_integration` (the emulator has no IAM of
//! its own). It grants every permission except publishing to the topics it
//! is told to deny, so the emulator answers those publishes with
//! `PERMISSION_DENIED`, as Pub/Sub does for a topic the relay's service
//! account may not publish to. The status, the message and the path through
//! the emulator are the emulator's own; only the policy decision is ours.
//!
//! The service is one unary gRPC method,
//! `IamInternal/TestPermissions(credentials = 1, policy name = 2,
//! permissions = 3) -> (granted permissions = 1)`, served over cleartext
//! HTTP/2 with hand-written protobuf (three string fields do not justify a
//! code generator).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

const METHOD: &str =
    "/com.google.cloud.iam.testing.v1.shared.internalapi.IamInternal/TestPermissions";

/// A running policy service.
pub struct IamStandIn {
    port: u16,
    denied: Arc<Mutex<HashSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl IamStandIn {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<IamStandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let denied: Arc<Mutex<HashSet<String>>> = Arc::default();
        let policy = denied.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let policy = policy.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let policy = policy.clone();
                        async move { Ok::<_, Infallible>(answer(req, &policy).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                });
            }
        });
        Ok(IamStandIn { port, denied, task })
    }

    /// The port to pass as the emulator's `--iam_port`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, publishing to `topic` (`projects/P/topics/T`) is denied.
    pub fn deny_publish(&self, topic: &str) {
        self.lock().insert(format!("pubsub/{topic}"));
    }

    /// Publishing to `topic` is allowed again.
    pub fn allow_publish(&self, topic: &str) {
        self.lock().remove(&format!("pubsub/{topic}"));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.denied.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for IamStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn answer(req: Request<Incoming>, denied: &Mutex<HashSet<String>>) -> Response<Body> {
    if req.uri().path() != METHOD {
        return grpc_response(None, 12, "unimplemented"); // UNIMPLEMENTED
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return grpc_response(None, 13, "unreadable request"),
    };
    let Some((policy, permissions)) = body.get(5..).and_then(parse_request) else {
        return grpc_response(None, 3, "malformed TestPermissions request");
    };
    let deny = denied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&policy);
    let mut message = BytesMut::new();
    for permission in permissions {
        if deny && permission == "pubsub.topics.publish" {
            continue;
        }
        put_string(&mut message, 1, &permission);
    }
    grpc_response(Some(message.freeze()), 0, "")
}

/// A gRPC response: the message (length-prefixed) and the status trailers.
fn grpc_response(message: Option<Bytes>, status: u32, text: &str) -> Response<Body> {
    let mut frames = Vec::new();
    if let Some(message) = message {
        let mut framed = BytesMut::with_capacity(message.len() + 5);
        framed.put_u8(0);
        framed.put_u32(message.len() as u32);
        framed.put_slice(&message);
        frames.push(Ok(Frame::data(framed.freeze())));
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    if let Ok(text) = http::HeaderValue::from_str(text)
        && !text.is_empty()
    {
        trailers.insert("grpc-message", text);
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut response = Response::new(StreamBody::new(futures::stream::iter(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Field 2 (the policy name) and every field 3 (permissions) of a
/// TestPermissions request.
fn parse_request(mut bytes: &[u8]) -> Option<(String, Vec<String>)> {
    let mut policy = String::new();
    let mut permissions = Vec::new();
    while bytes.has_remaining() {
        let key = varint(&mut bytes)?;
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
            }
            2 => {
                let len = varint(&mut bytes)? as usize;
                let value = bytes.get(..len)?;
                match key >> 3 {
                    2 => policy = String::from_utf8(value.to_vec()).ok()?,
                    3 => permissions.push(String::from_utf8(value.to_vec()).ok()?),
                    _ => {}
                }
                bytes.advance(len);
            }
            _ => return None,
        }
    }
    Some((policy, permissions))
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.first()?;
        bytes.advance(1);
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_string(out: &mut BytesMut, field: u64, value: &str) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, value.len() as u64);
    out.put_slice(value.as_bytes());
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields_round_trip() {
        let mut request = BytesMut::new();
        put_string(&mut request, 1, "creds");
        put_string(&mut request, 2, "pubsub/projects/p/topics/t");
        put_string(&mut request, 3, "pubsub.topics.publish");
        put_string(&mut request, 3, "pubsub.topics.get");
        let (policy, permissions) = parse_request(&request).expect("parses");
        assert_eq!(policy, "pubsub/projects/p/topics/t");
        assert_eq!(permissions, ["pubsub.topics.publish", "pubsub.topics.get"]);
        assert!(parse_request(&[0x12, 0x05, b'a']).is_none(), "truncated");
    }
}
