{{/*
haproxy.cfg for HAProxy 2.6: one frontend for Triton's HTTP API, one for its gRPC API (HTTP/2 in clear text),
each balancing every request (not every connection) over the Triton replicas, which are checked by a real
inference. Rendered into the proxy's ConfigMap; the multi-replica test renders it with static servers on
127.0.0.1 and runs Debian's haproxy with it.
*/}}
{{- define "triton-diffusers.haproxyConfig" -}}
{{- $proxy := .Values.proxy }}
{{- $httpPort := int .Values.triton.launcher.httpPort }}
{{- $bind := $proxy.bindAddress }}
{{- $check := $proxy.healthCheck }}
{{- $model := $proxy.healthCheckModel }}
{{- $agent := printf "agent-check agent-port %s agent-inter %s" (include "triton-diffusers.agentPort" .) $check.agentInterval }}
{{- $replicas := printf "%s.%s.svc.%s" (include "triton-diffusers.replicas" .) .Release.Namespace .Values.clusterDomain }}
{{- /* The launcher's start-up probe as a KServe v2 JSON request (inference_client.triton.probe_inference): a
       64x64 image in one step, seed 0; the image comes back as binary data, not as 12288 JSON numbers. */}}
{{- $probeInput := list
      (dict "name" "PROMPT" "datatype" "BYTES" "shape" (list 1 1) "data" (list "readiness probe"))
      (dict "name" "WIDTH" "datatype" "INT32" "shape" (list 1 1) "data" (list 64))
      (dict "name" "HEIGHT" "datatype" "INT32" "shape" (list 1 1) "data" (list 64))
      (dict "name" "NUM_INFERENCE_STEPS" "datatype" "INT32" "shape" (list 1 1) "data" (list 1))
      (dict "name" "SEED" "datatype" "INT64" "shape" (list 1 1) "data" (list 0)) }}
{{- $probeBody := dict "inputs" $probeInput "outputs" (list (dict "name" "IMAGE" "parameters" (dict "binary_data" true))) | toJson -}}
global
    log stdout format raw local0 info
    maxconn {{ $proxy.maxConnections }}
    # A stop (SIGUSR1 from the container runtime, the image's STOPSIGNAL) closes the listeners and lets the
    # generations in flight finish; this bounds how long.
    hard-stop-after {{ $proxy.drainSeconds }}s

defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect {{ $proxy.timeouts.connect }}
    timeout client {{ $proxy.timeouts.client }}
    timeout server {{ $proxy.timeouts.server }}
    timeout http-request {{ $proxy.timeouts.httpRequest }}
    timeout http-keep-alive {{ $proxy.timeouts.httpKeepAlive }}
    timeout check {{ $check.timeout }}
    # A retried request goes to another replica every time (1: on every retry; HAProxy's default, -1, retries the
    # same replica until the last attempt): the one that failed it has most likely died or is stopping.
    option redispatch 1
    retries {{ $proxy.retries }}
{{- if not $proxy.staticServers }}

# The cluster DNS from the pod's resolv.conf; the headless Service lists the ready replicas only.
resolvers cluster-dns
    parse-resolv-conf
    resolve_retries 3
    timeout resolve 2s
    timeout retry 1s
    # A replica that left the Service (stopping, or not ready) leaves its server slot within a resolution; an
    # empty answer (no replica ready) is not held either.
    hold nx 2s
    hold other 2s
    hold refused 2s
    hold timeout 10s
    accepted_payload_size 8192
{{- end }}

frontend triton-http
    bind {{ $bind }}:{{ $proxy.ports.http }}
    default_backend triton-http

frontend triton-grpc
    bind {{ $bind }}:{{ $proxy.ports.grpc }} proto h2
    default_backend triton-grpc

frontend stats
    bind {{ $bind }}:{{ $proxy.ports.stats }}
    # The proxy's own liveness, answered by HAProxy itself.
    monitor-uri /healthz
    http-request use-service prometheus-exporter if { path /metrics }
    stats enable
    stats uri /stats
    stats refresh 10s
    # Scrapes and probes every few seconds would drown the request log.
    http-request set-log-level silent

backend triton-http
    # Least outstanding requests: HAProxy counts the requests each replica is serving now.
    balance leastconn
    # One connection to the replica per request, closed after the response: tritonserver's stop waits for
    # every open HTTP connection, not only for requests (2.51: "Found 1 HTTP service connections" until its exit
    # timeout), so an idle keep-alive connection kept by the proxy would make every drain run into the exit
    # timeout and cut what is still in flight. Clients keep their keep-alive connections to the proxy.
    option http-server-close
    # Healthy means a real inference answered: Triton's readiness stays 200 while a model's stub is dead. 503 is
    # Triton's queue refusing the check (full, or timed out): the replica works and is busy. Marking busy
    # replicas down would pile their load onto the others until all were down; the request retry on 503 already
    # sends seeded requests to a replica with room.
    option httpchk
    http-check send meth POST uri /v2/models/{{ $model }}/infer ver HTTP/1.1 hdr Host triton hdr Content-Type application/json hdr infer-key "${TRITON_INFER_KEY}" body '{{ $probeBody }}'
    http-check expect rstatus ^(200|503)$
    # Retried on another replica: a request that reached no replica, and, for requests with an Idempotency-Key
    # (seeded ones, which reproduce bitwise), one whose replica died or timed out under it (before or in the middle
    # of its answer: empty-response, junk-response) or refused it as busy
    # (503: Triton's queue was full and nothing was computed). Anything else could run a generation twice.
    retry-on conn-failure empty-response junk-response response-timeout 503
    http-request disable-l7-retry unless { req.hdr(Idempotency-Key) -m found }
    # The replica's own word (the launcher's agent) takes it out of rotation at once when it drains, restarts
    # or stops; the inference check stays the judge of whether it works.
    default-server check {{ $agent }} inter {{ $check.interval }} fastinter {{ $check.fastInterval }} downinter {{ $check.downInterval }} fall {{ $check.fall }} rise {{ $check.rise }}
{{- if $proxy.staticServers }}
{{- range $index, $server := $proxy.staticServers }}
{{- $parts := splitList ":" $server }}
    server triton{{ add $index 1 }} {{ index $parts 0 }}:{{ index $parts 1 }} agent-port {{ add (index $parts 1 | int) 3 }}
{{- end }}
{{- else }}
    server-template triton 1-{{ include "triton-diffusers.serverSlots" . }} {{ $replicas }}:{{ $httpPort }} resolvers cluster-dns resolve-prefer ipv4 init-addr none
{{- end }}

backend triton-grpc
    balance leastconn
    # The same check on the replica's HTTP port, over HTTP/1.1 (the servers themselves speak HTTP/2). check-proto
    # must be on the server lines: HAProxy 2.6 does not take it from default-server for a server with its own
    # proto (checked against a live tritonserver: the check then speaks HTTP/2 to the HTTP port, and times out).
    option httpchk
    http-check send meth POST uri /v2/models/{{ $model }}/infer ver HTTP/1.1 hdr Host triton hdr Content-Type application/json hdr infer-key "${TRITON_INFER_KEY}" body '{{ $probeBody }}'
    http-check expect rstatus ^(200|503)$
    # A stream that reached a replica is never replayed: only a request that could not connect is retried.
    retry-on conn-failure
    default-server check {{ $agent }} inter {{ $check.interval }} fastinter {{ $check.fastInterval }} downinter {{ $check.downInterval }} fall {{ $check.fall }} rise {{ $check.rise }}
{{- if $proxy.staticServers }}
{{- range $index, $server := $proxy.staticServers }}
{{- $parts := splitList ":" $server }}
{{- $serverHttpPort := index $parts 1 | int }}
    server triton{{ add $index 1 }} {{ index $parts 0 }}:{{ add $serverHttpPort 1 }} proto h2 check-proto h1 port {{ $serverHttpPort }} agent-port {{ add $serverHttpPort 3 }}
{{- end }}
{{- else }}
    server-template triton 1-{{ include "triton-diffusers.serverSlots" . }} {{ $replicas }}:{{ add $httpPort 1 }} proto h2 check-proto h1 port {{ $httpPort }} resolvers cluster-dns resolve-prefer ipv4 init-addr none
{{- end }}
{{- end }}
