{{/* Labels every object carries. */}}
{{- define "credlet.labels" -}}
app.kubernetes.io/part-of: credlet
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The image reference: the digest wins over the tag. */}}
{{- define "credlet.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The CA Service's in-cluster name. */}}
{{- define "credlet.caHost" -}}
credlet-ca.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* Node selector: the chart-wide one merged with a component's. */}}
{{- define "credlet.nodeSelector" -}}
{{- $sel := merge (deepCopy .component) .root.Values.nodeSelector -}}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
