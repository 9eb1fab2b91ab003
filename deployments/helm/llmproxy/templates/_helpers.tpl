{{/* Names, labels and the values derived from llmproxy's config. */}}

{{- define "llmproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmproxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llmproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llmproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmproxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmproxy.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The Secret whose keys become environment variables ("" when none). */}}
{{- define "llmproxy.webhookSecretName" -}}
{{- if .Values.webhookSecret.existingSecret -}}
{{- .Values.webhookSecret.existingSecret -}}
{{- else if .Values.webhookSecret.create -}}
{{- printf "%s-webhook" (include "llmproxy.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The port of a listen address: ":8080", "0.0.0.0:8080", "[::]:8080" -> 8080. */}}
{{- define "llmproxy.portOf" -}}
{{- $port := regexFind "[0-9]+$" (toString .) -}}
{{- if not $port -}}
{{- fail (printf "cannot take a port from listen address %q" .) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{- define "llmproxy.port" -}}
{{- include "llmproxy.portOf" (.Values.config.listen | default ":8080") -}}
{{- end -}}

{{/* The admin port when config.admin_listen is set, else "". */}}
{{- define "llmproxy.adminPort" -}}
{{- with .Values.config.admin_listen -}}
{{- include "llmproxy.portOf" . -}}
{{- end -}}
{{- end -}}

{{/* config.shutdown_grace ("30s", "2m", "1500ms", "1h"; default 30s) in whole seconds, rounded up. */}}
{{- define "llmproxy.shutdownGraceSeconds" -}}
{{- $grace := toString (.Values.config.shutdown_grace | default "30s") -}}
{{- $parts := regexFindAll "[0-9]+|[a-z]+" $grace -1 -}}
{{- if ne (len $parts) 2 -}}
{{- fail (printf "config.shutdown_grace %q: expected a number and one unit (ms, s, m, h)" $grace) -}}
{{- end -}}
{{- $n := index $parts 0 | atoi -}}
{{- $unit := index $parts 1 -}}
{{- if eq $unit "ms" -}}{{ div (add $n 999) 1000 }}
{{- else if eq $unit "s" -}}{{ $n }}
{{- else if eq $unit "m" -}}{{ mul $n 60 }}
{{- else if eq $unit "h" -}}{{ mul $n 3600 }}
{{- else -}}{{ fail (printf "config.shutdown_grace %q: unit must be ms, s, m or h" $grace) }}
{{- end -}}
{{- end -}}
