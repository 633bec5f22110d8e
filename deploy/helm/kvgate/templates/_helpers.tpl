{{/* The release's base name, at most 50 characters so that suffixes fit in 63. */}}
{{- define "kvgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvgate.epp.name" -}}{{ include "kvgate.fullname" . }}-epp{{- end -}}
{{- define "kvgate.operator.name" -}}{{ include "kvgate.fullname" . }}-operator{{- end -}}

{{- define "kvgate.poolName" -}}
{{- .Values.inferencePool.name | default (printf "%s-pool" (include "kvgate.fullname" .)) -}}
{{- end -}}

{{- define "kvgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels of every object; the argument is (dict "ctx" $ "component" "epp"). */}}
{{- define "kvgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "kvgate.selectorLabels" . }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: kvgate
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvgate.serviceAccountName" -}}
{{- $names := .ctx.Values.serviceAccount.names -}}
{{- if eq .component "epp" -}}{{ $names.epp | default (include "kvgate.epp.name" .ctx) }}{{- else -}}{{ $names.operator | default (include "kvgate.operator.name" .ctx) }}{{- end -}}
{{- end -}}

{{/* dynamo.serviceMesh.* checked once, for the DestinationRule and the operator alike. */}}
{{- define "kvgate.checkMesh" -}}
{{- $m := .Values.dynamo.serviceMesh -}}
{{- if $m.enabled -}}
{{- if ne $m.provider "istio" -}}
{{- fail (printf "dynamo.serviceMesh.provider %q: istio is the only supported provider" $m.provider) -}}
{{- end -}}
{{- if and (eq $m.istio.tlsMode "MUTUAL") (or (not $m.istio.clientCertificate) (not $m.istio.privateKey)) -}}
{{- fail "dynamo.serviceMesh.istio.tlsMode MUTUAL needs dynamo.serviceMesh.istio.clientCertificate and privateKey" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Router replica sync: on with more than one replica unless epp.env decides. */}}
{{- define "kvgate.replicaSync" -}}
{{- if hasKey .Values.epp.env "DYN_ROUTER_REPLICA_SYNC" -}}
{{- index .Values.epp.env "DYN_ROUTER_REPLICA_SYNC" | toString -}}
{{- else -}}
{{- gt (int .Values.epp.replicas) 1 | toString -}}
{{- end -}}
{{- end -}}
