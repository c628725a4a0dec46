{{/* Names, labels, and the values checks that JSON schema cannot express. */}}

{{- define "tandem.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* SIGTERM comes after the preStop sleep; the server then drains for up to
shutdownTimeoutSeconds and closes connections within 5 s; 10 s more of margin. */}}
{{- define "tandem.terminationGracePeriod" -}}
{{- add .Values.server.preStopSleepSeconds .Values.server.shutdownTimeoutSeconds 15 -}}
{{- end -}}

{{- define "tandem.shmEnabled" -}}
{{- if or .Values.shm.enabled (gt (int .Values.tensorParallelSize) 1) }}true{{ end -}}
{{- end -}}

{{- define "tandem.validate" -}}
{{- $tp := int .Values.tensorParallelSize -}}
{{- $gpus := int .Values.gpus -}}
{{- if and (gt $gpus 0) (lt $gpus $tp) -}}
{{- fail (printf "gpus (%d) must be at least tensorParallelSize (%d): each tensor-parallel rank needs a GPU" $gpus $tp) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}
