{{/*
Helpers take the chart's root context. An application chart that depends on this chart passes
the subchart's context, `(index .Subcharts "pleo-broker")`, so names, values and the image match
what this chart renders for its ConfigMap and Secret.
*/}}

{{- define "pleo-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pleo-broker.fullname" -}}
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

{{- define "pleo-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pleo-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pleo-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pleo-broker.labels" -}}
helm.sh/chart: {{ include "pleo-broker.chart" . }}
{{ include "pleo-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: credential-broker
{{- end }}

{{- define "pleo-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pleo-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pleo-broker.secretName" -}}
{{- default (include "pleo-broker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "pleo-broker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The proxy leaves the pod's loopback only when a Deployment is asked to expose it. */}}
{{- define "pleo-broker.proxyExposed" -}}
{{- if and (eq .Values.mode "deployment") .Values.proxy.expose }}true{{ end }}
{{- end }}

{{/* The Host names the proxy answers to: loopback, the Service's names in deployment mode, and
proxy.allowedHosts (BROKER_PROXY_ALLOWED_HOSTS; any other Host is refused, against DNS rebinding). */}}
{{- define "pleo-broker.proxyAllowedHosts" -}}
{{- $hosts := list "localhost" "127.0.0.1" "[::1]" }}
{{- if eq .Values.mode "deployment" }}
{{- $svc := include "pleo-broker.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts = concat $hosts (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- end }}
{{- join "," (concat $hosts .Values.proxy.allowedHosts) }}
{{- end }}

{{- define "pleo-broker.vaultKubernetesAuth" -}}
{{- if and (eq .Values.store.type "vault") (eq .Values.vault.auth "kubernetes") }}true{{ end }}
{{- end }}

{{- define "pleo-broker.vaultCaMountPath" -}}/etc/pleo-broker/vault-ca{{- end }}

{{/* The Secret holding the callers file, if callers are set ("" otherwise). */}}
{{- define "pleo-broker.callersSecret" -}}
{{- if .Values.callers.existingSecret }}{{ .Values.callers.existingSecret }}
{{- else if .Values.callers.entries }}{{ include "pleo-broker.fullname" . }}-callers
{{- end }}
{{- end }}
{{- define "pleo-broker.callersMountPath" -}}/etc/pleo-broker/callers{{- end }}

{{/* Refuse configurations that cannot work, with a message that says what to change. */}}
{{- define "pleo-broker.validate" -}}
{{- if not (has .Values.mode (list "deployment" "sidecar")) }}
{{- fail "mode must be \"deployment\" or \"sidecar\"" }}
{{- end }}
{{- if eq .Values.store.type "local" }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled=true needs store.type=vault: the local store lives on one pod's volume, so added replicas would not share tenants" }}
{{- end }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount > 1 needs store.type=vault: the local store lives on one pod's volume, so replicas would not share tenants" }}
{{- end }}
{{- end }}
{{- if eq .Values.store.type "vault" }}
{{- if not .Values.vault.addr }}
{{- fail "store.type=vault needs vault.addr (e.g. https://vault.vault.svc:8200)" }}
{{- end }}
{{- if and (eq .Values.vault.auth "kubernetes") (not .Values.vault.kubernetesRole) }}
{{- fail "vault.auth=kubernetes needs vault.kubernetesRole (the Vault role bound to this service account)" }}
{{- end }}
{{- if and (eq .Values.vault.auth "approle") (not .Values.vault.roleId) }}
{{- fail "vault.auth=approle needs vault.roleId" }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- if and (eq .Values.vault.auth "approle") (not .Values.secrets.vaultSecretId) }}
{{- fail "vault.auth=approle needs secrets.vaultSecretId (or secrets.existingSecret)" }}
{{- end }}
{{- if and (eq .Values.vault.auth "token") (not .Values.secrets.vaultToken) }}
{{- fail "vault.auth=token needs secrets.vaultToken (or secrets.existingSecret)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.callers.existingSecret .Values.callers.entries }}
{{- fail "set callers.existingSecret or callers.entries, not both" }}
{{- end }}
{{- if and .Values.vault.caCert.configMap .Values.vault.caCert.secret }}
{{- fail "set vault.caCert.configMap or vault.caCert.secret, not both" }}
{{- end }}
{{- $stopping := float64 .Values.broker.shutdownDrainSeconds }}
{{- if include "pleo-broker.preStopSleep" . }}
{{- $stopping = addf $stopping (float64 .Values.sidecar.preStopSleepSeconds) }}
{{- end }}
{{- if ge $stopping (float64 .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "broker.shutdownDrainSeconds (plus sidecar.preStopSleepSeconds in sidecar mode) must stay below terminationGracePeriodSeconds (%v), or the kubelet kills the broker mid-drain" .Values.terminationGracePeriodSeconds) }}
{{- end }}
{{- end }}

{{/* A preStop sleep keeps a sidecar serving while its application shuts down (not native). */}}
{{- define "pleo-broker.preStopSleep" -}}
{{- if and (eq .Values.mode "sidecar") (not .Values.sidecar.native) (gt (float64 .Values.sidecar.preStopSleepSeconds) 0.0) }}true{{ end }}
{{- end }}

{{/* Non-secret settings, as BROKER_* variables (DESIGN §7). */}}
{{- define "pleo-broker.settings" -}}
BROKER_PLEO_BASE_URL: {{ .Values.broker.pleoBaseUrl | quote }}
{{- with .Values.broker.pleoClientId }}
BROKER_PLEO_CLIENT_ID: {{ . | quote }}
{{- end }}
BROKER_PROXY_HOST: {{ ternary "0.0.0.0" "127.0.0.1" (eq (include "pleo-broker.proxyExposed" .) "true") | quote }}
BROKER_PROXY_PORT: {{ int64 .Values.proxy.port | quote }}
BROKER_ADMIN_HOST: "0.0.0.0"
BROKER_ADMIN_PORT: {{ int64 .Values.admin.port | quote }}
BROKER_TENANT_HEADER: {{ .Values.broker.tenantHeader | quote }}
BROKER_REQUIRED_SCOPES: {{ join "," .Values.broker.requiredScopes | quote }}
{{- with .Values.broker.catalogPath }}
BROKER_CATALOG_PATH: {{ . | quote }}
{{- end }}
BROKER_STORE: {{ .Values.store.type | quote }}
BROKER_STORE_PATH: "/data"
BROKER_CACHE_TTL: {{ .Values.broker.cacheTtl | toString | quote }}
BROKER_HEALTH_CHECK_INTERVAL: {{ .Values.broker.healthCheckInterval | toString | quote }}
BROKER_HEALTH_CHECK_RATE: {{ .Values.broker.healthCheckRate | toString | quote }}
BROKER_TENANT_MAX_IN_FLIGHT: {{ int64 .Values.broker.tenantMaxInFlight | quote }}
BROKER_INSTALLATION_STATUS_ON_ACTIVATION: {{ .Values.broker.installationStatusOnActivation | quote }}
{{- if include "pleo-broker.callersSecret" . }}
BROKER_CALLERS_FILE: {{ printf "%s/%s" (include "pleo-broker.callersMountPath" .) .Values.callers.key | quote }}
{{- end }}
BROKER_UPSTREAM_CONNECT_TIMEOUT: {{ .Values.broker.upstreamConnectTimeout | toString | quote }}
BROKER_UPSTREAM_TIMEOUT: {{ .Values.broker.upstreamTimeout | toString | quote }}
BROKER_MAX_INSPECTED_BODY: {{ int64 .Values.broker.maxInspectedBody | quote }}
BROKER_PROXY_ALLOW_CONTROL_PLANE: {{ .Values.broker.proxyAllowControlPlane | toString | quote }}
BROKER_REQUEST_BODY_TIMEOUT: {{ .Values.broker.requestBodyTimeout | toString | quote }}
BROKER_UPSTREAM_POOL_TIMEOUT: {{ .Values.broker.upstreamPoolTimeout | toString | quote }}
BROKER_PROXY_ALLOWED_HOSTS: {{ include "pleo-broker.proxyAllowedHosts" . | quote }}
BROKER_MAX_HEADER_BYTES: {{ int64 .Values.broker.maxHeaderBytes | quote }}
BROKER_HEADER_TIMEOUT: {{ .Values.broker.headerTimeout | toString | quote }}
BROKER_IDLE_TIMEOUT: {{ .Values.broker.idleTimeout | toString | quote }}
BROKER_SHUTDOWN_DRAIN_SECONDS: {{ .Values.broker.shutdownDrainSeconds | toString | quote }}
BROKER_PROXY_MAX_CONNECTIONS: {{ int64 .Values.proxy.maxConnections | quote }}
BROKER_ADMIN_MAX_CONNECTIONS: {{ int64 .Values.admin.maxConnections | quote }}
BROKER_CONNECT_HOST: "0.0.0.0"
BROKER_CONNECT_PORT: {{ int64 .Values.connect.port | quote }}
BROKER_CONNECT_PUBLIC_URL: {{ .Values.connect.publicUrl | quote }}
BROKER_CONNECT_RETURN_ORIGINS: {{ join "," .Values.connect.returnOrigins | quote }}
BROKER_CONNECT_MAX_ATTEMPTS: {{ int64 .Values.connect.maxAttempts | quote }}
BROKER_CONNECT_FRAME_ANCESTORS: {{ .Values.connect.frameAncestors | quote }}
BROKER_CONNECT_INTEGRATION_NAME: {{ .Values.connect.integrationName | quote }}
BROKER_LOG_LEVEL: {{ .Values.broker.logLevel | quote }}
BROKER_LOG_FORMAT: {{ .Values.broker.logFormat | quote }}
BROKER_EVENT_RETENTION_DAYS: {{ int64 .Values.broker.eventRetentionDays | quote }}
BROKER_WEBHOOK_URL: {{ .Values.webhooks.url | quote }}
BROKER_WEBHOOK_TIMEOUT: {{ .Values.webhooks.timeout | toString | quote }}
BROKER_WEBHOOK_RETRY_SCHEDULE: {{ .Values.webhooks.retrySchedule | quote }}
{{- if eq .Values.store.type "vault" }}
BROKER_VAULT_ADDR: {{ .Values.vault.addr | quote }}
BROKER_VAULT_AUTH: {{ .Values.vault.auth | quote }}
BROKER_VAULT_MOUNT: {{ .Values.vault.mount | quote }}
BROKER_VAULT_PREFIX: {{ .Values.vault.prefix | quote }}
BROKER_VAULT_TIMEOUT: {{ .Values.vault.timeout | toString | quote }}
BROKER_VAULT_THREADS: {{ int64 .Values.vault.threads | quote }}
{{- with .Values.vault.namespace }}
BROKER_VAULT_NAMESPACE: {{ . | quote }}
{{- end }}
{{- if eq .Values.vault.auth "kubernetes" }}
BROKER_VAULT_K8S_ROLE: {{ .Values.vault.kubernetesRole | quote }}
BROKER_VAULT_K8S_MOUNT: {{ .Values.vault.kubernetesMount | quote }}
BROKER_VAULT_K8S_TOKEN_PATH: {{ .Values.vault.kubernetesTokenPath | quote }}
{{- end }}
{{- if eq .Values.vault.auth "approle" }}
BROKER_VAULT_ROLE_ID: {{ .Values.vault.roleId | quote }}
BROKER_VAULT_APPROLE_MOUNT: {{ .Values.vault.approleMount | quote }}
{{- end }}
{{- if or .Values.vault.caCert.configMap .Values.vault.caCert.secret }}
BROKER_VAULT_CACERT: {{ printf "%s/%s" (include "pleo-broker.vaultCaMountPath" .) .Values.vault.caCert.key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The broker container, for the chart's Deployment and for an application's pod alike. */}}
{{- define "pleo-broker.container" -}}
{{- include "pleo-broker.validate" . -}}
- name: pleo-broker
  image: {{ include "pleo-broker.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve"]
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  {{- if include "pleo-broker.preStopSleep" . }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ .Values.sidecar.preStopSleepSeconds | toString | quote }}]
  {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "pleo-broker.fullname" . }}
    {{- with .Values.broker.extraEnvFrom }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    - name: BROKER_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.adminToken }}
    {{- if eq .Values.store.type "local" }}
    - name: BROKER_MASTER_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.masterKey }}
          optional: true
    {{- end }}
    {{- if and (eq .Values.store.type "vault") (eq .Values.vault.auth "token") }}
    - name: BROKER_VAULT_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.vaultToken }}
    {{- end }}
    {{- if and (eq .Values.store.type "vault") (eq .Values.vault.auth "approle") }}
    - name: BROKER_VAULT_SECRET_ID
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.vaultSecretId }}
    {{- end }}
    - name: BROKER_UPSTREAM_PROXY
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.upstreamProxy }}
          optional: true
    - name: BROKER_WEBHOOK_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ include "pleo-broker.secretName" . }}
          key: {{ .Values.secrets.keys.webhookSecret }}
          optional: true
    {{- with .Values.broker.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: broker-admin
      containerPort: {{ int64 .Values.admin.port }}
      protocol: TCP
    {{- if include "pleo-broker.proxyExposed" . }}
    - name: broker-proxy
      containerPort: {{ int64 .Values.proxy.port }}
      protocol: TCP
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: broker-admin
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: broker-admin
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: broker-admin
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: broker-tmp
      mountPath: /tmp
    - name: broker-data
      mountPath: /data
    {{- if or .Values.vault.caCert.configMap .Values.vault.caCert.secret }}
    - name: broker-vault-ca
      mountPath: {{ include "pleo-broker.vaultCaMountPath" . }}
      readOnly: true
    {{- end }}
    {{- if include "pleo-broker.callersSecret" . }}
    # The whole directory, never a subPath: a Secret update swaps its ..data symlink, which the
    # broker notices; a subPath mount would keep the old file.
    - name: broker-callers
      mountPath: {{ include "pleo-broker.callersMountPath" . }}
      readOnly: true
    {{- end }}
{{- end }}

{{/* The volumes the broker container mounts. */}}
{{- define "pleo-broker.volumes" -}}
- name: broker-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
- name: broker-data
  {{- $persistence := .Values.store.local.persistence }}
  {{- if and (eq .Values.store.type "local") $persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "pleo-broker.fullname" .)) $persistence.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: 64Mi
  {{- end }}
{{- with include "pleo-broker.callersSecret" . }}
- name: broker-callers
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.callers.key }}
        path: {{ $.Values.callers.key }}
{{- end }}
{{- with .Values.vault.caCert }}
{{- if .configMap }}
- name: broker-vault-ca
  configMap:
    name: {{ .configMap }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- else if .secret }}
- name: broker-vault-ca
  secret:
    secretName: {{ .secret }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
For an application chart that depends on this one (values: `pleo-broker: {mode: sidecar}`):
  containers:
    {{- include "pleo-broker.sidecar" (index .Subcharts "pleo-broker") | nindent 8 }}
  volumes:
    {{- include "pleo-broker.sidecarVolumes" (index .Subcharts "pleo-broker") | nindent 8 }}
The proxy listens on 127.0.0.1:<proxy.port> inside the application's pod.
*/}}
{{- define "pleo-broker.sidecar" -}}
{{- if ne .Values.mode "sidecar" }}
{{- fail "include \"pleo-broker.sidecar\" needs the pleo-broker values mode: sidecar" }}
{{- end }}
{{- include "pleo-broker.container" . }}
{{- end }}

{{- define "pleo-broker.sidecarVolumes" -}}
{{- if and (eq .Values.store.type "local") .Values.store.local.persistence.enabled (not .Values.store.local.persistence.existingClaim) }}
{{- fail "a pleo-broker sidecar with store.type=local needs store.local.persistence.existingClaim (or persistence.enabled=false for throwaway data); use store.type=vault for real deployments" }}
{{- end }}
{{- include "pleo-broker.volumes" . }}
{{- end }}
