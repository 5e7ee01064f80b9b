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
{{/* The capability service (python -m capability serve): Deployment, Service, HPA, PDB, NetworkPolicy, Ingress. */}}
{{- define "triton-diffusers.capabilityService" -}}
{{- printf "%s-capability" (include "triton-diffusers.fullname" . | trunc 52 | trimSuffix "-") }}
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

{{- /* The labelled clients: labelled pods of this namespace, and of each listed namespace. */}}
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

{{- /* Who may call Triton's and the proxy's HTTP and gRPC ports besides the proxy. Without the capability service:
       the labelled clients (capability hosts that embed the layer). With it: the service's pods alone, "only it
       may reach Triton", and the labelled clients again only if networkPolicy.directClients says so, for
       application hosts that still call Triton themselves. */}}
{{- define "triton-diffusers.tritonClientPeers" -}}
{{- if .Values.service.enabled -}}
- podSelector:
    matchLabels:
      {{- include "triton-diffusers.selectorLabels" (dict "root" . "component" "capability-service") | nindent 6 }}
{{- if .Values.networkPolicy.directClients }}
{{ include "triton-diffusers.clientPeers" . }}
{{- end }}
{{- else }}
{{- include "triton-diffusers.clientPeers" . }}
{{- end }}
{{- end }}

{{- /* The capability service's checks of its values, so that a mistake fails `helm install` with a message
       instead of pods that cannot open their store. */}}
{{- define "triton-diffusers.capabilityServiceChecks" -}}
{{- $service := .Values.service }}
{{- $url := $service.store.url | default "" | trim }}
{{- if not $url }}
{{- fail "service.store.url is required with service.enabled: the PostgreSQL store every capability service instance shares, postgresql://USER@HOST:PORT/DB (the password from service.store.passwordSecret or service.store.passfileSecret)" }}
{{- end }}
{{- $scheme := (urlParse $url).scheme }}
{{- if eq $scheme "sqlite" }}
{{- $instances := ternary (printf "service.autoscaling.maxReplicas=%v" $service.autoscaling.maxReplicas) (printf "service.replicas=%v" $service.replicas) $service.autoscaling.enabled }}
{{- fail (printf "service.store.url is a SQLite store (%s), which lives in one pod's file and cannot be shared: the capability service's instances (%s) and each rollout's new pod beside the old one would each keep their own capabilities, budgets, revocations, tokens and audit. Use a PostgreSQL store: postgresql://USER@HOST:PORT/DB" $url $instances) }}
{{- end }}
{{- if not (has $scheme (list "postgresql" "postgres")) }}
{{- fail (printf "service.store.url must be a PostgreSQL store, postgresql://USER@HOST:PORT/DB; its scheme is %q" $scheme) }}
{{- end }}
{{- if contains ":" ((urlParse $url).userinfo | default "") }}
{{- fail "service.store.url holds a password: it would be stored in clear in the release and shown in the pod's spec, and the capability layer refuses it. Put the password in a Secret and name it in service.store.passwordSecret (or service.store.passfileSecret)" }}
{{- end }}
{{- if and $service.store.passwordSecret.name $service.store.passfileSecret.name }}
{{- fail "service.store.passwordSecret and service.store.passfileSecret are both set: libpq would use PGPASSWORD and ignore the file; set one" }}
{{- end }}
{{- if and $service.trustedHeader.name (not $service.trustedHeader.proxies) }}
{{- fail "service.trustedHeader.name is set but service.trustedHeader.proxies is empty: list the addresses (CIDRs) of the authenticating proxy that sets the header; from any other address the header is refused" }}
{{- end }}
{{- if and $service.autoscaling.enabled (not (dig "requests" "cpu" "" $service.resources)) }}
{{- fail "service.autoscaling scales on CPU utilisation, a percentage of the CPU request: set service.resources.requests.cpu" }}
{{- end }}
{{- if and $service.ingress.enabled (not $service.ingress.tls.secretName) }}
{{- fail "service.ingress.enabled needs service.ingress.tls.secretName: bearer tokens must not cross the network in clear, and the service itself speaks plain HTTP" }}
{{- end }}
{{- if and $service.ingress.enabled (not $service.ingress.host) }}
{{- fail "service.ingress.enabled needs service.ingress.host: the name the TLS certificate is for" }}
{{- end }}
{{- end }}

{{/* The PostgreSQL port the service's egress is opened to: service.networkPolicy.store.port, else the URL's, else
     PostgreSQL's default. */}}
{{- define "triton-diffusers.storePort" -}}
{{- $host := (urlParse (.Values.service.store.url | default "" | trim)).host | default "" }}
{{- $fromUrl := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $host) }}
{{- .Values.service.networkPolicy.store.port | default $fromUrl | default 5432 }}
{{- end }}
