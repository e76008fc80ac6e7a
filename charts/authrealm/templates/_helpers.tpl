{{/* Chart name. */}}
{{- define "authrealm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless it already contains it. */}}
{{- define "authrealm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "authrealm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "authrealm.labels" -}}
helm.sh/chart: {{ include "authrealm.chart" . }}
{{ include "authrealm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: authrealm
{{- end }}

{{/* Labels selecting the operator pods. */}}
{{- define "authrealm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "authrealm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "authrealm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "authrealm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "authrealm.operatorName" -}}
{{- printf "%s-operator" (include "authrealm.fullname" .) }}
{{- end }}

{{- define "authrealm.webhookService" -}}
{{- printf "%s-webhook" (include "authrealm.fullname" .) }}
{{- end }}

{{- define "authrealm.webhookTlsSecret" -}}
{{- printf "%s-webhook-tls" (include "authrealm.fullname" .) }}
{{- end }}

{{/* Cluster-scoped objects carry the namespace so two releases cannot collide. */}}
{{- define "authrealm.webhookConfiguration" -}}
{{- printf "%s-%s-sidecar-injector" (include "authrealm.fullname" .) .Release.Namespace | trunc 253 }}
{{- end }}

{{- define "authrealm.clusterRole" -}}
{{- printf "%s-%s-operator" (include "authrealm.fullname" .) .Release.Namespace | trunc 253 }}
{{- end }}

{{- define "authrealm.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "authrealm.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/*
What the reconcile loop needs where AuthRealms live: cluster-wide (ClusterRole) by default, or in
operator.watchNamespace only (Role).
*/}}
{{- define "authrealm.reconcileRules" }}
  # Add/remove the finalizer (patch), write status.
  - apiGroups: ["authrealm.dev"]
    resources: ["authrealms"]
    verbs: ["patch"]
  - apiGroups: ["authrealm.dev"]
    resources: ["authrealms/status"]
    verbs: ["patch"]
  # Owner references with blockOwnerDeletion on the owned Secret and ConfigMaps.
  - apiGroups: ["authrealm.dev"]
    resources: ["authrealms/finalizers"]
    verbs: ["update"]
  # <realm>-signing-keys (create, server-side apply) and the Redis credentials / CA the realm
  # references (get).
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get", "list", "watch", "create", "patch"]
  # <realm>-jwks and <realm>-sidecar (server-side apply; an apply that creates the object is
  # also authorized as "create").
  - apiGroups: [""]
    resources: ["configmaps"]
    verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
