{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "defender-offboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every resource: the release name, plus the
chart name unless the release name already contains it.
*/}}
{{- define "defender-offboard.fullname" -}}
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

{{- define "defender-offboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "defender-offboard.labels" -}}
helm.sh/chart: {{ include "defender-offboard.chart" . }}
{{ include "defender-offboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Labels that select the controller pods; never change them after a release
exists (Deployment selectors are immutable).
*/}}
{{- define "defender-offboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "defender-offboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "defender-offboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "defender-offboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the existing service account to use when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: a digest wins over a tag; the tag defaults to appVersion.
*/}}
{{- define "defender-offboard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the client secret, and the key inside it.
*/}}
{{- define "defender-offboard.secretName" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else }}
{{- include "defender-offboard.fullname" . }}
{{- end }}
{{- end }}

{{- define "defender-offboard.secretKey" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecretKey }}
{{- else }}
{{- "client-secret" }}
{{- end }}
{{- end }}

{{/*
True ("true") when the pods read a client secret from a mounted Secret.
*/}}
{{- define "defender-offboard.usesSecret" -}}
{{- if and (not .Values.workloadIdentity.enabled) (or .Values.credentials.existingSecret .Values.credentials.clientSecret) }}true{{ end }}
{{- end }}

{{/*
Namespace of the DeviceOffboards node offboarding creates: the value, else
the watched namespace, else the release namespace.
*/}}
{{- define "defender-offboard.nodeOffboardNamespace" -}}
{{- .Values.nodeOffboarding.namespace | default .Values.watchNamespace | default .Release.Namespace }}
{{- end }}

{{/*
Reject settings that cannot work, with a message naming the value and the fix.
Rendered by the Deployment so every install and upgrade checks them.
*/}}
{{- define "defender-offboard.validate" -}}
{{- $cloud := .Values.cloud | toString }}
{{- if not (has $cloud (list "commercial" "gcc" "gcc-high" "dod")) }}
{{- fail (printf "cloud: %q is not one of commercial, gcc, gcc-high, dod" $cloud) }}
{{- end }}
{{- if not (has (.Values.logFormat | toString) (list "json" "text")) }}
{{- fail (printf "logFormat: %q is not json or text" (.Values.logFormat | toString)) }}
{{- end }}
{{- if lt (int .Values.concurrency) 1 }}
{{- fail "concurrency: must be at least 1" }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true, or two controllers would reconcile the same resources" }}
{{- end }}
{{- if and .Values.nodeOffboarding.enabled .Values.watchNamespace (ne (include "defender-offboard.nodeOffboardNamespace" .) .Values.watchNamespace) }}
{{- fail "nodeOffboarding.namespace must be watchNamespace (or empty) when watchNamespace is set: the controller reconciles only that namespace" }}
{{- end }}
{{- if and .Values.nodeOffboarding.enabled (not (has (.Values.nodeOffboarding.identity | toString) (list "required" "preferred" "name"))) }}
{{- fail (printf "nodeOffboarding.identity: %q is not required, preferred or name (see docs/security.md, Node identity)" (.Values.nodeOffboarding.identity | toString)) }}
{{- end }}
{{- if .Values.workloadIdentity.enabled }}
{{- if or .Values.credentials.clientSecret .Values.credentials.existingSecret }}
{{- fail "workloadIdentity.enabled=true uses no client secret: unset credentials.clientSecret and credentials.existingSecret" }}
{{- end }}
{{- if and .Values.serviceAccount.create (not .Values.clientId) }}
{{- fail "workloadIdentity.enabled=true needs clientId (the app registration or managed identity client id) for the service account annotation" }}
{{- end }}
{{- else if and .Values.connections.enabled (not (include "defender-offboard.usesSecret" .)) }}
{{- /* DefenderConnections only: no default credentials, so none may be half set. */}}
{{- if or .Values.tenantId .Values.clientId }}
{{- fail "tenantId/clientId are set without a credential: set credentials.existingSecret, credentials.clientSecret or workloadIdentity.enabled=true, or unset them to serve only DeviceOffboards with a connectionRef" }}
{{- end }}
{{- else }}
{{- if and .Values.credentials.clientSecret .Values.credentials.existingSecret }}
{{- fail "set either credentials.clientSecret or credentials.existingSecret, not both" }}
{{- end }}
{{- if not (or .Values.credentials.clientSecret .Values.credentials.existingSecret) }}
{{- fail "no credentials: set credentials.existingSecret (recommended), credentials.clientSecret, or workloadIdentity.enabled=true (or connections.enabled=true to use DefenderConnections only)" }}
{{- end }}
{{- if and .Values.credentials.existingSecret (not .Values.credentials.existingSecretKey) }}
{{- fail "credentials.existingSecretKey: name the key of credentials.existingSecret that holds the client secret" }}
{{- end }}
{{- if not .Values.tenantId }}
{{- fail "tenantId: set the Microsoft Entra tenant id (a GUID) of the app registration" }}
{{- end }}
{{- if not .Values.clientId }}
{{- fail "clientId: set the application (client) id of the app registration" }}
{{- end }}
{{- end }}
{{- if and .Values.connections.enabled .Values.rbac.create }}
{{- if hasKey .Values.connections "clusterWide" }}
{{- fail "connections.clusterWide was removed (it let the operator read any Secret and mint any ServiceAccount's token cluster-wide): list the namespaces in connections.namespaces" }}
{{- end }}
{{- if not .Values.connections.namespaces }}
{{- fail "connections.enabled=true needs connections.namespaces: the namespaces whose Secrets and opted-in ServiceAccounts DefenderConnections may use (the operator gets a Role in each)" }}
{{- end }}
{{- if .Values.watchNamespace }}
{{- range .Values.connections.namespaces }}
{{- if ne (toString .) $.Values.watchNamespace }}
{{- fail (printf "connections.namespaces: %q is not watchNamespace %q; the controller serves only that namespace" (toString .) $.Values.watchNamespace) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
