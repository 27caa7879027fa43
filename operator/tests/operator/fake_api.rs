//! A small, stateful STAND-IN for the Kubernetes API server, behind
//! `kube::Client::new(service, "default")`.
//!
//! It is not Kubernetes: there is no schema validation, no admission, no watch and no real
//! field ownership. It does what the reconcile tests need to be meaningful:
//! - stores objects per collection path (`/apis/apps/v1/namespaces/ns/deployments`) and name;
//! - GET (object and list), POST (create; 409 AlreadyExists), PUT and DELETE;
//! - server-side apply (`application/apply-patch+yaml`): create-or-replace as a single field
//!   manager would, keeping server-owned metadata (uid, creationTimestamp, generation) and
//!   `status`, bumping `resourceVersion`, and bumping `generation` when anything outside
//!   metadata/status changes;
//! - JSON merge patch (what kube's event recorder uses for event series);
//! - the `/status` subresource for kinds that have one: writes to the main resource ignore
//!   `status`, writes to `/status` change only `status`;
//! - 409 Conflict when a write carries a stale `metadata.resourceVersion`, plus
//!   [`FakeApi::inject_conflicts`] to fail the next N writes to a collection;
//! - [`FakeApi::collect_garbage`], a stand-in for the garbage collector: deletes objects
//!   whose controller owner no longer exists;
//! - watches (`?watch=true`) that stay open without events, so a real `Controller` can run
//!   on the initial lists.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Client;
use serde_json::{Value, json};

/// Resources (plural) that have a status subresource.
const WITH_STATUS: &[&str] = &[
    "outboxrelays",
    "inboxrelays",
    "deployments",
    "poddisruptionbudgets",
];

#[derive(Default)]
struct State {
    /// (collection path, name) → object.
    objects: BTreeMap<(String, String), Value>,
    resource_version: u64,
    uid: u64,
    /// collection suffix (e.g. "deployments") → number of writes to fail, and how.
    conflicts: BTreeMap<String, (u32, StatusCode, &'static str)>,
    /// Method and path of every request, for assertions.
    log: Vec<String>,
}

/// Handle to the stand-in; cheap to clone.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    respond(code, &body)
}

/// An error response (boxed: it is large).
type Failure = Box<Response<Full<Bytes>>>;

fn err(code: StatusCode, reason: &str, message: &str) -> Failure {
    Box::new(status_error(code, reason, message))
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `/api/v1/namespaces/ns/secrets/name/status` → (collection, Some(name), Some("status")).
fn split_path(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Where the resource plural is: api/v1/namespaces/ns/PLURAL or apis/g/v/namespaces/ns/PLURAL.
    let plural_idx = match *segments.first()? {
        "api" => 4,
        "apis" => 5,
        _ => return None,
    };
    if segments.len() <= plural_idx || segments.get(plural_idx - 2) != Some(&"namespaces") {
        return None;
    }
    let collection = format!("/{}", segments[..=plural_idx].join("/"));
    let name = segments.get(plural_idx + 1).map(|s| s.to_string());
    let sub = segments.get(plural_idx + 2).map(|s| s.to_string());
    Some((collection, name, sub))
}

fn plural(collection: &str) -> &str {
    collection.rsplit('/').next().unwrap_or_default()
}

fn json_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    json_merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Everything but metadata and status, to decide whether `generation` moves.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl State {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn take_injected(&mut self, collection: &str) -> Option<(StatusCode, &'static str)> {
        match self.conflicts.get_mut(plural(collection)) {
            Some((n, code, reason)) if *n > 0 => {
                *n -= 1;
                Some((*code, *reason))
            }
            _ => None,
        }
    }

    fn create(&mut self, collection: &str, mut obj: Value) -> Result<Value, Failure> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name is required",
            ));
        }
        let key = (collection.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(err(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{name} already exists"),
            ));
        }
        self.uid += 1;
        let rv = self.next_rv();
        let ns = collection
            .split('/')
            .skip_while(|s| *s != "namespaces")
            .nth(1)
            .unwrap_or("default")
            .to_owned();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
        meta["resourceVersion"] = json!(rv);
        meta["generation"] = json!(1);
        meta["namespace"] = json!(ns);
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if WITH_STATUS.contains(&plural(collection)) {
            // Status is only written through the subresource.
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        self.objects.insert(key, obj.clone());
        Ok(obj)
    }

    /// Replaces the object (as a sole field manager's apply or a PUT would), keeping
    /// server-owned fields; `status_only` for the `/status` subresource.
    fn replace(
        &mut self,
        collection: &str,
        name: &str,
        mut incoming: Value,
        status_only: bool,
        merge: bool,
    ) -> Result<Value, Failure> {
        let key = (collection.to_owned(), name.to_owned());
        let Some(current) = self.objects.get(&key).cloned() else {
            return Err(err(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{name} not found"),
            ));
        };
        if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current["metadata"]["resourceVersion"].as_str()
        {
            return Err(err(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    plural(collection)
                ),
            ));
        }
        let has_status = WITH_STATUS.contains(&plural(collection));
        let mut next = if status_only {
            let mut next = current.clone();
            if merge {
                json_merge(&mut next["status"], &incoming["status"]);
            } else {
                next["status"] = incoming["status"].take();
            }
            next
        } else {
            let mut next = if merge {
                let mut n = current.clone();
                json_merge(&mut n, &incoming);
                n
            } else {
                incoming
            };
            if has_status {
                match current.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            next
        };
        for field in ["uid", "creationTimestamp", "namespace", "generation"] {
            next["metadata"][field] = current["metadata"][field].clone();
        }
        if !status_only && spec_part(&next) != spec_part(&current) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            next["metadata"]["generation"] = json!(generation);
        }
        next["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.objects.insert(key, next.clone());
        Ok(next)
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        self.log.push(format!("{method} {path}"));
        let Some((collection, name, sub)) = split_path(path) else {
            return status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            );
        };
        let status_only = sub.as_deref() == Some("status");
        if sub.is_some() && !status_only {
            return status_error(StatusCode::NOT_FOUND, "NotFound", "unsupported subresource");
        }
        if status_only && !WITH_STATUS.contains(&plural(&collection)) {
            return status_error(StatusCode::NOT_FOUND, "NotFound", "no status subresource");
        }
        let parsed: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
                }
            }
        };
        let is_write = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
        if is_write
            && *method != Method::POST
            && let Some((code, reason)) = self.take_injected(&collection)
        {
            return status_error(code, reason, &format!("injected {reason} error"));
        }
        let result = match (method.clone(), name) {
            (Method::GET, Some(name)) => self
                .objects
                .get(&(collection.clone(), name.clone()))
                .cloned()
                .ok_or_else(|| {
                    err(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{name} not found"),
                    )
                }),
            (Method::GET, None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((c, _), _)| *c == collection)
                    .map(|(_, v)| v.clone())
                    .collect();
                Ok(json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items,
                }))
            }
            (Method::POST, None) => self.create(&collection, parsed),
            (Method::PUT, Some(name)) => {
                self.replace(&collection, &name, parsed, status_only, false)
            }
            (Method::PATCH, Some(name)) => {
                if content_type.starts_with("application/apply-patch") {
                    let exists = self
                        .objects
                        .contains_key(&(collection.clone(), name.clone()));
                    if exists {
                        self.replace(&collection, &name, parsed, status_only, false)
                    } else if status_only {
                        Err(err(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            &format!("{name} not found"),
                        ))
                    } else {
                        self.create(&collection, parsed)
                    }
                } else if content_type.starts_with("application/merge-patch") {
                    self.replace(&collection, &name, parsed, status_only, true)
                } else {
                    Err(err(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        content_type,
                    ))
                }
            }
            (Method::DELETE, Some(name)) => {
                match self.objects.remove(&(collection.clone(), name.clone())) {
                    Some(_) => Ok(
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                    ),
                    None => Err(err(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{name} not found"),
                    )),
                }
            }
            _ => Err(err(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                method.as_str(),
            )),
        };
        match result {
            Ok(v) => respond(StatusCode::OK, &v),
            Err(resp) => *resp,
        }
    }
}

impl FakeApi {
    /// A fresh, empty stand-in.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// A kube client whose requests this stand-in serves.
    pub fn client(&self) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let is_watch = parts
                    .uri
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
                if is_watch {
                    // Watches stay open and never deliver events: controllers see the
                    // initial list only (and their own requeues).
                    api.lock().log.push(format!("WATCH {}", parts.uri.path()));
                    let pending = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
                    return Ok::<_, Infallible>(Response::new(StreamBody::new(pending).boxed()));
                }
                let resp =
                    api.lock()
                        .handle(&parts.method, parts.uri.path(), &content_type, &bytes);
                Ok::<_, Infallible>(resp.map(BodyExt::boxed))
            }
        });
        Client::new(service, "default")
    }

    /// Stores an object as if created by `kubectl create` (`collection` as in the URL).
    pub fn create(&self, collection: &str, obj: Value) -> Value {
        match self.lock().create(collection, obj) {
            Ok(v) => v,
            Err(_) => panic!("could not create object in {collection}"),
        }
    }

    /// Edits an object as a user's update would (`kubectl edit`): status untouched,
    /// resourceVersion bumped, generation bumped when the spec changes.
    pub fn edit(&self, collection: &str, name: &str, f: impl FnOnce(&mut Value)) -> Value {
        let mut state = self.lock();
        let mut obj = state
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_else(|| panic!("{collection}/{name} missing"));
        f(&mut obj);
        match state.replace(collection, name, obj, false, false) {
            Ok(v) => v,
            Err(_) => panic!("could not edit {collection}/{name}"),
        }
    }

    /// Sets `status` as a controller (kubelet, deployment controller) would.
    pub fn set_status(&self, collection: &str, name: &str, status: Value) {
        let mut state = self.lock();
        let key = (collection.to_owned(), name.to_owned());
        let rv = state.next_rv();
        let obj = state
            .objects
            .get_mut(&key)
            .unwrap_or_else(|| panic!("{collection}/{name} missing"));
        obj["status"] = status;
        obj["metadata"]["resourceVersion"] = json!(rv);
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
    }

    /// All stored objects of a collection.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored object.
    pub fn all(&self) -> Vec<(String, Value)> {
        self.lock()
            .objects
            .iter()
            .map(|((c, _), v)| (c.clone(), v.clone()))
            .collect()
    }

    /// Deletes an object directly.
    pub fn delete(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .remove(&(collection.to_owned(), name.to_owned()))
    }

    /// Makes the next `n` writes (PUT/PATCH) to collections named `plural` fail with 409.
    pub fn inject_conflicts(&self, plural: &str, n: u32) {
        self.inject_errors(plural, n, StatusCode::CONFLICT, "Conflict");
    }

    /// Makes the next `n` writes (PUT/PATCH) to collections named `plural` fail with `code`.
    pub fn inject_errors(&self, plural: &str, n: u32, code: StatusCode, reason: &'static str) {
        self.lock()
            .conflicts
            .insert(plural.to_owned(), (n, code, reason));
    }

    /// Injected conflicts not consumed yet.
    pub fn pending_conflicts(&self, plural: &str) -> u32 {
        self.lock().conflicts.get(plural).map_or(0, |(n, _, _)| *n)
    }

    /// Requests served so far (`METHOD /path`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Stand-in for the garbage collector: deletes (repeatedly) every object that has owner
    /// references and none of whose owners exists any more (controller or not, as the real
    /// one does). Returns what it deleted.
    pub fn collect_garbage(&self) -> Vec<String> {
        let mut state = self.lock();
        let mut deleted = Vec::new();
        loop {
            let uids: std::collections::BTreeSet<String> = state
                .objects
                .values()
                .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
                .collect();
            let orphans: Vec<(String, String)> = state
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| {
                            !refs.is_empty()
                                && refs
                                    .iter()
                                    .all(|r| r["uid"].as_str().is_some_and(|u| !uids.contains(u)))
                        })
                })
                .map(|(k, _)| k.clone())
                .collect();
            if orphans.is_empty() {
                return deleted;
            }
            for key in orphans {
                state.objects.remove(&key);
                deleted.push(format!("{}/{}", key.0, key.1));
            }
        }
    }
}
