#!/usr/bin/env bash
# Creates the kind cluster of the quickstart (kind-config.yaml: a control plane and two
# workers) unless it exists, and loads the locally built images into its nodes.
#
#   scripts/kind-up.sh            (what `make kind-up` runs after `make images`)
#
# Environment: KIND_CLUSTER (default outbox), KIND_NODE_IMAGE (e.g. kindest/node:v1.33.x;
# default: the node image of your kind release), WORKER_IMAGE and OPERATOR_IMAGE (default
# ghcr.io/outbox-dev/outbox-{worker,operator}:<version from Cargo.toml>), KIND, DOCKER.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
KIND="${KIND:-kind}"
DOCKER="${DOCKER:-docker}"
cluster="${KIND_CLUSTER:-outbox}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
worker_image="${WORKER_IMAGE:-ghcr.io/outbox-dev/outbox-worker:$version}"
operator_image="${OPERATOR_IMAGE:-ghcr.io/outbox-dev/outbox-operator:$version}"

for tool in "$KIND" "$DOCKER" kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool is not installed (see README.md, Quickstart on kind)" >&2; exit 1; }
done

for image in "$worker_image" "$operator_image"; do
  if ! "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "kind-up: image $image is missing; build it with: make images" >&2
    exit 1
  fi
done

if "$KIND" get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "kind-up: cluster $cluster exists"
else
  args=(create cluster --name "$cluster" --config kind-config.yaml --wait 180s)
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
    args+=(--image "$KIND_NODE_IMAGE")
  fi
  "$KIND" "${args[@]}"
fi

for image in "$worker_image" "$operator_image"; do
  "$KIND" load docker-image "$image" --name "$cluster"
done
kubectl --context "kind-$cluster" get nodes -o wide
echo "kind-up: cluster $cluster is ready (kubectl context kind-$cluster)"
