"""A small, permissive stand-in for the Kubernetes API server that records every request as
the RBAC attributes (API group, resource[/subresource], verb) the real server would
authorize. Used to run the real `outbox-operator run` binary and learn which API calls it
makes, so that the chart's ClusterRole is checked against the code rather than a list.

It stores objects in memory and implements just enough of the API for a controller: get,
list, watch (an empty stream that ends after a moment), create, server-side apply and other
patches (merged into the stored object), update, delete, and the status subresource.
"""

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

CORE_KINDS = {"secrets": "Secret", "serviceaccounts": "ServiceAccount", "events": "Event"}


def parse_path(path):
    """(group, version, namespace, resource, name, subresource) of an API path."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"]:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
        if not rest:  # the Namespace object itself
            return (group, version, None, "namespaces", namespace, None)
    resource = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return (group, version, namespace, resource, name, sub)


def merge(base, patch):
    """JSON merge patch semantics (good enough for apply and strategic patches here)."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(base.get(key), value)
    return out


class FakeApiServer:
    def __init__(self, seed=()):
        self.lock = threading.Lock()
        self.calls = []  # (method, group, resource, verb, namespace, name)
        self.objects = {}  # (group, resource, namespace, name) -> object
        self.resource_version = 1
        self.stopping = threading.Event()
        for obj in seed:
            self.put(obj)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.handle(self, "GET")

            def do_POST(self):
                server.handle(self, "POST")

            def do_PUT(self):
                server.handle(self, "PUT")

            def do_PATCH(self):
                server.handle(self, "PATCH")

            def do_DELETE(self):
                server.handle(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- storage ----------------------------------------------------------------------
    @staticmethod
    def key_of(obj):
        api_version = obj["apiVersion"]
        group = api_version.split("/")[0] if "/" in api_version else ""
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        if obj["kind"] == "PodDisruptionBudget":
            plural = "poddisruptionbudgets"
        meta = obj["metadata"]
        return (group, plural, meta.get("namespace"), meta["name"])

    def put(self, obj, key=None):
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.resource_version += 1
        meta["resourceVersion"] = str(self.resource_version)
        self.objects[key or self.key_of(obj)] = obj
        return obj

    def where(self, group, resource, namespace=None):
        return [
            o
            for (g, r, ns, _), o in sorted(self.objects.items(), key=lambda kv: str(kv[0]))
            if g == group and r == resource and (namespace is None or ns == namespace)
        ]

    def verbs_seen(self):
        with self.lock:
            return {(g, r, v) for (_, g, r, v, _, _) in self.calls}

    # -- HTTP -------------------------------------------------------------------------
    def reply(self, h, code, body):
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def status(self, h, code, reason, message):
        self.reply(
            h,
            code,
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
             "message": message, "reason": reason, "code": code},
        )

    def record(self, method, group, resource, verb, namespace, name):
        with self.lock:
            self.calls.append((method, group, resource, verb, namespace, name))

    def handle(self, h, method):
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        parsed = parse_path(url.path)
        if parsed is None:
            self.status(h, 404, "NotFound", f"unknown path {url.path}")
            return
        group, version, namespace, resource, name, sub = parsed
        rbac_resource = resource + (f"/{sub}" if sub else "")
        key = (group, resource, namespace, name)
        content_type = h.headers.get("Content-Type", "")

        if method == "GET" and name is None:
            watching = query.get("watch", ["false"])[0] in ("true", "1")
            self.record(method, group, rbac_resource, "watch" if watching else "list", namespace, None)
            if watching:
                # An empty watch stream that ends after a moment; the client re-watches.
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                self.stopping.wait(1.0)
                try:
                    h.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                return
            with self.lock:
                items = self.where(group, resource, namespace)
                rv = str(self.resource_version)
            self.reply(h, 200, {"kind": "List", "apiVersion": version if not group else f"{group}/{version}",
                                "metadata": {"resourceVersion": rv}, "items": items})
            return

        if method == "GET":
            self.record(method, group, rbac_resource, "get", namespace, name)
            with self.lock:
                obj = self.objects.get(key)
            if obj is None:
                self.status(h, 404, "NotFound", f"{resource} {name!r} not found")
            else:
                self.reply(h, 200, obj)
            return

        if method == "POST":
            self.record(method, group, rbac_resource, "create", namespace, name)
            body = json.loads(raw or b"{}")
            body.setdefault("metadata", {}).setdefault("namespace", namespace)
            new_key = (group, resource, namespace, body["metadata"].get("name"))
            with self.lock:
                if new_key in self.objects:
                    self.status(h, 409, "AlreadyExists", "exists")
                    return
                obj = self.put(body, new_key)
            self.reply(h, 201, obj)
            return

        if method in ("PATCH", "PUT"):
            apply = "apply-patch" in content_type
            with self.lock:
                existing = self.objects.get(key)
            verb = "patch" if method == "PATCH" else "update"
            self.record(method, group, rbac_resource, verb, namespace, name)
            if existing is None:
                if not apply and method == "PATCH":
                    self.status(h, 404, "NotFound", f"{resource} {name!r} not found")
                    return
                # Server-side apply (or PUT) of a missing object creates it: the API server
                # authorizes `create` as well.
                self.record(method, group, rbac_resource, "create", namespace, name)
                if sub:
                    self.status(h, 404, "NotFound", f"{resource} {name!r} not found")
                    return
            body = yaml.safe_load(raw) if raw else {}
            with self.lock:
                base = existing or {}
                if sub == "status":
                    obj = dict(base)
                    obj["status"] = merge(base.get("status"), body.get("status"))
                elif method == "PUT":
                    obj = body
                else:
                    obj = merge(base, body)
                obj.setdefault("metadata", {}).update({"name": name, "namespace": namespace})
                obj = self.put(obj, key)
            self.reply(h, 200, obj)
            return

        if method == "DELETE":
            self.record(method, group, rbac_resource, "delete", namespace, name)
            with self.lock:
                obj = self.objects.pop(key, None)
            if obj is None:
                self.status(h, 404, "NotFound", f"{resource} {name!r} not found")
            else:
                self.reply(h, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            return

        self.status(h, 405, "MethodNotAllowed", method)
