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

{{/* The Service's FQDN, as Istio's extension provider and Envoy's cluster name it. */}}
{{- define "stepgate.fqdn" -}}
{{- printf "%s.%s.svc.%s" (include "stepgate.fullname" .) .Release.Namespace .Values.clusterDomain }}
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
{{- $floor := ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled }}
{{- if and (kindIs "invalid" $pdb.maxUnavailable) (not (kindIs "string" $pdb.minAvailable)) (ge (int $pdb.minAvailable) (int $floor)) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below the replica count (%d), or no node could ever be drained" (int $pdb.minAvailable) (int $floor)) }}
{{- end }}
{{- end }}
{{- end }}
