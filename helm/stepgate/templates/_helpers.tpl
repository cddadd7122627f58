{{/* Names, labels and the few values derived from several others. */}}

{{- define "stepgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects are named this; 63 characters is the DNS label limit. */}}
{{- define "stepgate.fullname" -}}
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

{{- define "stepgate.instanceLabels" -}}
app.kubernetes.io/name: {{ include "stepgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* stepgate's pods; the component keeps the `helm test` pod out of the Service and the PDB. */}}
{{- define "stepgate.selectorLabels" -}}
{{ include "stepgate.instanceLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "stepgate.testSelectorLabels" -}}
{{ include "stepgate.instanceLabels" . }}
app.kubernetes.io/component: test
{{- end }}

{{- define "stepgate.releaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "stepgate.labels" -}}
{{ include "stepgate.selectorLabels" . }}
{{ include "stepgate.releaseLabels" . }}
{{- end }}

{{- define "stepgate.testLabels" -}}
{{ include "stepgate.testSelectorLabels" . }}
{{ include "stepgate.releaseLabels" . }}
{{- end }}

{{/* The policy check run before an install or upgrade (policy-check.yaml): a component of its own. */}}
{{- define "stepgate.policyCheckLabels" -}}
{{ include "stepgate.instanceLabels" . }}
app.kubernetes.io/component: policy-check
{{ include "stepgate.releaseLabels" . }}
{{- end }}

{{- define "stepgate.policyCheckName" -}}
{{- printf "%s-policy-check" (include "stepgate.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{/* The policy file as the chart renders it, for the served ConfigMap and the check's. */}}
{{- define "stepgate.policyData" -}}
policy.yaml: |
  {{- toYaml .Values.policy | nindent 2 }}
{{- end }}

{{- define "stepgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stepgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stepgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "stepgate.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "stepgate.fullname" .)) .Values.existingPolicyConfigMap }}
{{- end }}

{{- define "stepgate.tlsSecret" -}}
{{- if .Values.tls.secretName }}
{{- .Values.tls.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "stepgate.fullname" .) }}
{{- else }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret) or tls.certManager.enabled" }}
{{- end }}
{{- end }}

{{/* The admin listener's Service (admin.enabled); a Service name is at most 63 characters. */}}
{{- define "stepgate.adminServiceName" -}}
{{- printf "%s-admin" (include "stepgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The Service's FQDN, as Istio's extension provider and Envoy's cluster name it. */}}
{{- define "stepgate.fqdn" -}}
{{- printf "%s.%s.svc.%s" (include "stepgate.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The DNS names of the chart's cert-manager Certificate, as a JSON list. */}}
{{- define "stepgate.certificateDnsNames" -}}
{{- $fullname := include "stepgate.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $fullname (printf "%s.%s" $fullname $ns) (printf "%s.%s.svc" $fullname $ns) (include "stepgate.fqdn" .) }}
{{- concat $names .Values.tls.certManager.extraDnsNames | toJson }}
{{- end }}

{{/*
The name on stepgate's certificate that the chart's own clients check: the probes and the `helm
test` pod (--tls-server-name), and the Envoy cluster in NOTES (SNI and SAN match). By default the
Service's FQDN, which the chart's Certificate always carries.
*/}}
{{- define "stepgate.tlsServerName" -}}
{{- default (include "stepgate.fqdn" .) .Values.tls.serverName }}
{{- end }}

{{/* Where the stepgate container and the `helm test` pod mount the TLS Secrets. */}}
{{- define "stepgate.tlsDir" -}}/etc/stepgate/tls{{- end }}
{{- define "stepgate.serverCADir" -}}/etc/stepgate/server-ca{{- end }}
{{- define "stepgate.clientCADir" -}}/etc/stepgate/client-ca{{- end }}
{{- define "stepgate.probeClientDir" -}}/etc/stepgate/probe-client{{- end }}

{{/*
The TLS flags of `stepgate health` as the chart's own clients run it (the exec probes against
127.0.0.1, the `helm test` pod through the Service), as a JSON list: trust the CA stepgate's
certificate chains to (tls.serverCA), check the name on it (tls.serverName), and with mutual TLS
present a client certificate the server accepts: tls.probeClient's, or else stepgate's own
(which then must allow client authentication; the chart's Certificate does).
*/}}
{{- define "stepgate.healthTLSArgs" -}}
{{- $args := list "--ca" (printf "%s/%s" (include "stepgate.serverCADir" .) .Values.tls.serverCA.key) "--tls-server-name" (include "stepgate.tlsServerName" .) }}
{{- if .Values.tls.clientCA.enabled }}
{{- $dir := include "stepgate.tlsDir" . }}
{{- if .Values.tls.probeClient.secretName }}
{{- $dir = include "stepgate.probeClientDir" . }}
{{- end }}
{{- $args = concat $args (list "--cert" (printf "%s/tls.crt" $dir) "--key" (printf "%s/tls.key" $dir)) }}
{{- end }}
{{- toJson $args }}
{{- end }}

{{/*
The Secret volumes `stepgate health` reads over TLS (see stepgate.healthTLSArgs), for a pod spec's
`volumes`; `serving` adds stepgate's own certificate and key (the stepgate pods always mount them;
the `helm test` pod only when it presents them as its client certificate).
*/}}
{{- define "stepgate.tlsVolumes" -}}
{{- $ := .root }}
{{- $tls := $.Values.tls }}
{{- if .serving }}
- name: tls
  secret:
    secretName: {{ include "stepgate.tlsSecret" $ }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
- name: server-ca
  secret:
    secretName: {{ default (include "stepgate.tlsSecret" $) $tls.serverCA.secretName }}
    items:
      - key: {{ $tls.serverCA.key }}
        path: {{ $tls.serverCA.key }}
{{- if and $tls.clientCA.enabled $tls.probeClient.secretName }}
- name: probe-client
  secret:
    secretName: {{ $tls.probeClient.secretName }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{/* The mounts of stepgate.tlsVolumes, read-only directories (never subPath: see deployment.yaml). */}}
{{- define "stepgate.tlsVolumeMounts" -}}
{{- $ := .root }}
{{- $tls := $.Values.tls }}
{{- if .serving }}
- name: tls
  mountPath: {{ include "stepgate.tlsDir" $ }}
  readOnly: true
{{- end }}
- name: server-ca
  mountPath: {{ include "stepgate.serverCADir" $ }}
  readOnly: true
{{- if and $tls.clientCA.enabled $tls.probeClient.secretName }}
- name: probe-client
  mountPath: {{ include "stepgate.probeClientDir" $ }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Grace period: the drain, then the longest call still in flight, then a margin for the process
to exit. Any shorter and the kubelet's SIGKILL would cut calls that --drain-delay promised to
finish.
*/}}
{{- define "stepgate.terminationGracePeriodSeconds" -}}
{{- add .Values.drainDelaySeconds .Values.requestTimeoutSeconds .Values.terminationMarginSeconds }}
{{- end }}

{{/* Refusals of combinations the schema cannot express; each says what to change. */}}
{{- define "stepgate.validate" -}}
{{- if and (not .Values.existingPolicyConfigMap) (not .Values.policy) }}
{{- fail "set policy (the policy file as YAML) or existingPolicyConfigMap (a ConfigMap with policy.yaml)" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.enabled) }}
{{- fail "tls.certManager.enabled needs tls.enabled: true" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name must name a cert-manager Issuer or ClusterIssuer" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled: true" }}
{{- end }}
{{- if and .Values.tls.clientSANs (not .Values.tls.clientCA.enabled) }}
{{- fail "tls.clientSANs needs tls.clientCA.enabled: true (only client certificates have SANs to check)" }}
{{- end }}
{{- if and .Values.checkCallers.clientSANs (not (and .Values.tls.enabled .Values.tls.clientCA.enabled)) }}
{{- fail "checkCallers.clientSANs needs tls.enabled: true and tls.clientCA.enabled: true (only a client certificate has SANs to check); without mutual TLS name the callers' networks in checkCallers.networks" }}
{{- end }}
{{- if .Values.tls.clientSANs }}
{{- range .Values.checkCallers.clientSANs }}
{{- if not (has . $.Values.tls.clientSANs) }}
{{- fail (printf "checkCallers.clientSANs names %s, which tls.clientSANs does not: the handshake would refuse the proxy before it could call Check; add it to tls.clientSANs" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (or .Values.tls.serverName .Values.tls.serverCA.secretName) (not .Values.tls.enabled) }}
{{- fail "tls.serverName and tls.serverCA need tls.enabled: true" }}
{{- end }}
{{- if and .Values.tls.probeClient.secretName (not .Values.tls.clientCA.enabled) }}
{{- fail "tls.probeClient.secretName needs tls.clientCA.enabled: true (without mutual TLS the probes present no certificate)" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled }}
{{- $names := include "stepgate.certificateDnsNames" . | fromJsonArray }}
{{- if not (has (include "stepgate.tlsServerName" .) $names) }}
{{- fail (printf "tls.serverName %q is not one of the Certificate's names (%s): add it to tls.certManager.extraDnsNames, or leave tls.serverName empty" .Values.tls.serverName (join ", " $names)) }}
{{- end }}
{{- end }}
{{- /*
With mutual TLS and no tls.probeClient, the probes and the `helm test` pod present stepgate's own
certificate: a SAN allow-list that names none of its names would lock them out, and every pod
would stay unready.
*/}}
{{- if and .Values.tls.enabled .Values.tls.clientCA.enabled .Values.tls.clientSANs (not .Values.tls.probeClient.secretName) }}
{{- $names := list (include "stepgate.tlsServerName" .) }}
{{- if .Values.tls.certManager.enabled }}
{{- $names = include "stepgate.certificateDnsNames" . | fromJsonArray }}
{{- end }}
{{- $listed := false }}
{{- range $names }}
{{- if has . $.Values.tls.clientSANs }}
{{- $listed = true }}
{{- end }}
{{- end }}
{{- if not $listed }}
{{- fail (printf "tls.clientSANs must list %s: the probes and the helm test pod present stepgate's own certificate as their client certificate when tls.probeClient.secretName is empty, and an allow-list without it locks them out (or set tls.probeClient.secretName to a client certificate naming one of tls.clientSANs)" (include "stepgate.tlsServerName" .)) }}
{{- end }}
{{- end }}
{{- $liveness := mul .Values.probes.liveness.periodSeconds .Values.probes.liveness.failureThreshold }}
{{- if le (int $liveness) (int .Values.drainDelaySeconds) }}
{{- fail (printf "probes.liveness.periodSeconds × failureThreshold (%d s) must exceed drainDelaySeconds (%d s): a draining pod reports NOT_SERVING and would be restarted" (int $liveness) (int .Values.drainDelaySeconds)) }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled: true" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.grpcNamespaces) }}
{{- fail "networkPolicy.enabled needs networkPolicy.grpcNamespaces: the namespaces whose workloads (or Envoy) call stepgate" }}
{{- end }}
{{- if .Values.adminListen }}
{{- fail "adminListen is replaced by admin.enabled and admin.port: the admin listener then listens on 0.0.0.0:<admin.port>, on a Service of its own (<fullname>-admin) and, with networkPolicy.enabled, reachable only from networkPolicy.adminFromNamespaces (docs/kubernetes.md)" }}
{{- end }}
{{- if .Values.admin.enabled }}
{{- if eq (int .Values.admin.port) (int .Values.service.port) }}
{{- fail (printf "admin.port (%d) must differ from service.port: the admin listener is a second listener" (int .Values.admin.port)) }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.admin.port) (int .Values.metrics.port)) }}
{{- fail (printf "admin.port (%d) must differ from metrics.port" (int .Values.admin.port)) }}
{{- end }}
{{- end }}
{{- with .Values.networkPolicy.adminFromNamespaces }}
{{- if not $.Values.admin.enabled }}
{{- fail "networkPolicy.adminFromNamespaces needs admin.enabled: true (it lets those namespaces reach the admin listener)" }}
{{- end }}
{{- if not $.Values.networkPolicy.enabled }}
{{- fail "networkPolicy.adminFromNamespaces needs networkPolicy.enabled: true: without the NetworkPolicy every pod in the cluster can reach the admin port, not only these namespaces" }}
{{- end }}
{{- range . }}
{{- if has . $.Values.networkPolicy.grpcNamespaces }}
{{- fail (printf "networkPolicy.adminFromNamespaces must not list %q, which is in networkPolicy.grpcNamespaces: the namespaces that call the gRPC port (the mesh, gateways, Envoy) never reach the admin port; name the operators' namespace instead" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* The escape hatches reach the Deployment too: a password in them would be in its spec. */}}
{{- $riskStoreArg := false }}
{{- range .Values.extraArgs }}
{{- $arg := toString . }}
{{- if or $riskStoreArg (hasPrefix "--risk-store=" $arg) }}
{{- if include "stepgate.redisUrlHasPassword" (trimPrefix "--risk-store=" $arg) }}
{{- fail "extraArgs: the --risk-store URL holds a password: put the URL in a Secret and name it in riskStore.existingSecret" }}
{{- end }}
{{- end }}
{{- $riskStoreArg = eq $arg "--risk-store" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if and (eq .name "STEPGATE_RISK_STORE") .value (include "stepgate.redisUrlHasPassword" (toString .value)) }}
{{- fail "extraEnv: STEPGATE_RISK_STORE holds a password: put the URL in a Secret and name it in riskStore.existingSecret (or give the variable valueFrom.secretKeyRef)" }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- $floor := int (ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled) }}
{{- /* Kubernetes rounds both percentages up (a share of 2 pods above 50 % is both). */}}
{{- if not (kindIs "invalid" $pdb.maxUnavailable) }}
{{- if has (toString $pdb.maxUnavailable) (list "0" "0%") }}
{{- fail (printf "podDisruptionBudget.maxUnavailable (%v) lets no pod be evicted, so no node could ever be drained: use 1 or more" $pdb.maxUnavailable) }}
{{- end }}
{{- else if kindIs "string" $pdb.minAvailable }}
{{- $share := trimSuffix "%" $pdb.minAvailable | int }}
{{- if gt (mul $share $floor) (mul 100 (sub $floor 1)) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%s) of %d replicas rounds up to every one of them, so no node could ever be drained: use at most %d%%, or more replicas" $pdb.minAvailable $floor (div (mul 100 (sub $floor 1)) $floor)) }}
{{- end }}
{{- else if ge (int $pdb.minAvailable) $floor }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below the replica count (%d), or no node could ever be drained" (int $pdb.minAvailable) $floor) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when a Redis URL holds a password (in its user information, or `pass=`/`password=` in
its query): such a URL belongs in a Secret, never in values rendered into the Deployment or the
policy's ConfigMap.
*/}}
{{- define "stepgate.redisUrlHasPassword" -}}
{{- if or (regexMatch "^rediss?(\\+sentinel)?://[^/@]*:[^/@]*@" .) (regexMatch "[?&](pass|password)=" .) }}true{{ end }}
{{- end }}
