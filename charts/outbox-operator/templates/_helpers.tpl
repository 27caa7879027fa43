{{/* Name of the chart, overridable. */}}
{{- define "outbox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the objects: the release name when it already contains the chart name. */}}
{{- define "outbox-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: immutable once installed. */}}
{{- define "outbox-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outbox-operator.labels" -}}
helm.sh/chart: {{ include "outbox-operator.chart" . }}
{{ include "outbox-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: pubsub-outbox
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outbox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is set. Argument: (dict "image" X "ctx" $). */}}
{{- define "outbox-operator.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's rules for the relays and what they own, shared by the ClusterRole (all
     namespaces) and the Role in watchNamespace. Least privilege: exactly the API calls
     outbox-operator makes (charts/tests/test_chart_rbac.py records them from the binary and
     fails on a missing or an extra grant). No wildcards. */}}
{{- define "outbox-operator.relayRules" -}}
# The controllers list and watch both kinds of relay; status is written with server-side apply.
- apiGroups: ["outbox.dev"]
  resources: ["outboxrelays", "inboxrelays"]
  verbs: ["list", "watch"]
- apiGroups: ["outbox.dev"]
  resources: ["outboxrelays/status", "inboxrelays/status"]
  verbs: ["patch"]
# Owned objects carry blockOwnerDeletion: clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) require this.
- apiGroups: ["outbox.dev"]
  resources: ["outboxrelays/finalizers", "inboxrelays/finalizers"]
  verbs: ["update"]
# Owned objects: watched (list, watch), read by name before applying (get: the operator
# refuses to touch a same-named object it does not own) and applied with server-side apply
# (patch, which needs create when the object does not exist yet). The garbage collector
# deletes them with the relay; the operator itself only deletes a PDB when replicas drops
# to 1.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Referenced Secrets are read by name (to hash them); never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The workers' Leases (get, for status.leader); create, update and patch because the
# workers' Roles grant them on their Lease and RBAC only lets the operator grant verbs it
# holds itself. Without watchNamespace the operator's own Lease is covered here too.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update", "patch"]
# Events about relays (events.k8s.io/v1; repeated events are patched as a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
