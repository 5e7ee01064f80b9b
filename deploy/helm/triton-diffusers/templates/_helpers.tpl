{{/* Names: <release>-<chart> cut to 63 characters, unless overridden. */}}
{{- define "triton-diffusers.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "triton-diffusers.fullname" -}}
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

{{/* Service and object names derived from the full name; suffixes are short so that 63 characters hold. */}}
{{- define "triton-diffusers.triton" -}}
{{- include "triton-diffusers.fullname" . | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- define "triton-diffusers.replicas" -}}
{{- printf "%s-replicas" (include "triton-diffusers.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- define "triton-diffusers.proxy" -}}
{{- printf "%s-proxy" (include "triton-diffusers.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "triton-diffusers.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "triton-diffusers.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component ("triton" or "proxy"): call with (dict "root" $ "component" "triton"). */}}
{{- define "triton-diffusers.selectorLabels" -}}
app.kubernetes.io/name: {{ include "triton-diffusers.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Secret holding the inference key (key "infer-key"). */}}
{{- define "triton-diffusers.inferKeySecret" -}}
{{- .Values.inferKey.existingSecret | default (printf "%s-infer-key" (include "triton-diffusers.fullname" . | trunc 53 | trimSuffix "-")) }}
{{- end }}

{{- define "triton-diffusers.hfCacheClaim" -}}
{{- .Values.triton.hfCache.existingClaim | default (printf "%s-hf-cache" (include "triton-diffusers.fullname" . | trunc 54 | trimSuffix "-")) }}
{{- end }}

{{/* Where the key Secret is mounted, and the file the launcher reads. */}}
{{- define "triton-diffusers.inferKeyDir" -}}
/var/run/secrets/triton-diffusers
{{- end }}
{{- define "triton-diffusers.inferKeyFile" -}}
{{- printf "%s/infer-key" (include "triton-diffusers.inferKeyDir" .) }}
{{- end }}

{{/* The launcher's ports: gRPC and metrics follow HTTP. */}}
{{- define "triton-diffusers.grpcPort" -}}
{{- add .Values.triton.launcher.httpPort 1 }}
{{- end }}
{{- define "triton-diffusers.metricsPort" -}}
{{- add .Values.triton.launcher.httpPort 2 }}
{{- end }}
{{/* The launcher's load-balancer agent (--agent-port), which the proxy asks whether a replica is ready,
     draining or down: the chart's rule, HTTP port + 3 (a static server's too). */}}
{{- define "triton-diffusers.agentPort" -}}
{{- add .Values.triton.launcher.httpPort 3 }}
{{- end }}

{{/* Replica count the proxy must have a server slot for: the most replicas that can exist during a rollout. */}}
{{- define "triton-diffusers.serverSlots" -}}
{{- if .Values.proxy.serverSlots }}
{{- .Values.proxy.serverSlots }}
{{- else if .Values.autoscaling.enabled }}
{{- add .Values.autoscaling.maxReplicas .Values.triton.maxSurge }}
{{- else }}
{{- add .Values.triton.replicas .Values.triton.maxSurge }}
{{- end }}
{{- end }}

{{- /* The clients: labelled pods of this namespace, and of each listed namespace. */}}
{{- define "triton-diffusers.clientPeers" -}}
- podSelector:
    matchLabels:
      {{- toYaml .Values.networkPolicy.clientLabel | nindent 6 }}
{{- range .Values.networkPolicy.clientNamespaces }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
  podSelector:
    matchLabels:
      {{- toYaml $.Values.networkPolicy.clientLabel | nindent 6 }}
{{- end }}
{{- end }}
{{- define "triton-diffusers.monitoringPeer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.networkPolicy.monitoringNamespace }}
{{- end }}
