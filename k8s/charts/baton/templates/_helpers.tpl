{{/* Names, labels and the pieces every Baton pod shares. */}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "baton.name" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "baton.labels" -}}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "baton.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The model folder every container passes as --model. */}}
{{- define "baton.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "embedded" -}}
{{ $m.mountPath }}/baton/models/SmolLM2-135M-Instruct
{{- else if eq $m.source "image" -}}
{{ required "model.path is required for model.source=image" $m.path }}
{{- else -}}
{{ $m.mountPath }}/{{ required (printf "model.path is required for model.source=%s" $m.source) $m.path }}
{{- end -}}
{{- end -}}

{{/* The model volume (none when the image holds the model). */}}
{{- define "baton.modelVolume" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "embedded" }}
- name: model
  emptyDir: {}
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath is required for model.source=hostPath" $m.hostPath }}
    type: Directory
{{- else if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.claimName is required for model.source=pvc" $m.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "baton.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ ne .Values.model.source "embedded" }}
{{- end }}
{{- end -}}

{{/* With the embedded model: convert the GGUF the image ships into the model volume first. */}}
{{- define "baton.modelInit" -}}
{{- if eq .Values.model.source "embedded" }}
initContainers:
  - name: unpack-model
    image: {{ include "baton.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["python3", "-c", "from baton.services.engine.default_model import ensure_default_model; print(ensure_default_model())"]
    env:
      - name: XDG_CACHE_HOME
        value: {{ .Values.model.mountPath }}
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end -}}

{{/* Environment of every Baton process: offline hub, NVLink multicast off (see deploy/placement.py). */}}
{{- define "baton.commonEnv" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: NCCL_NVLS_ENABLE
  value: "0"
- name: TORCH_SYMM_MEM_DISABLE_MULTICAST
  value: "1"
- name: NVSHMEM_DISABLE_NVLS
  value: "1"
{{- end -}}

{{- define "baton.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/path: /metrics
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "baton.workerDns" -}}
{{ include "baton.fullname" .root }}-{{ .role }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ .root.Values.worker.grpcPort }}
{{- end -}}
