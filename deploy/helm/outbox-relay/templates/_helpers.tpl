{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "outbox-relay.fullname" -}}
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

{{- define "outbox-relay.migrateName" -}}
{{- printf "%s-migrate" (include "outbox-relay.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; selectors use the stable subset below. */}}
{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "outbox-relay.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The relay pods (not the migrate Job's): Deployment, Service and PDB select these. */}}
{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "outbox-relay.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "outbox-relay.imageTag" .) }}
{{- end }}

{{/*
The Secret and key holding one URL. Called with (dict "ref" <database|broker|migrate.database>
"default" <name of the Secret the chart makes>): existingSecret if set, else the chart's Secret.
*/}}
{{- define "outbox-relay.secretKeyRef" -}}
name: {{ .ref.existingSecret | default .default }}
key: {{ .ref.secretKey }}
{{- end }}

{{/* URLs the chart stores in the Secret <fullname>: {key: url}. */}}
{{- define "outbox-relay.secretData" -}}
{{- $data := dict }}
{{- range $ref := list .Values.database .Values.broker }}
{{- if and $ref.url (not $ref.existingSecret) }}
{{- $_ := set $data $ref.secretKey $ref.url }}
{{- end }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/*
Refuse combinations that would start pods reading a key that no Secret holds: when the chart
makes the Secret <fullname>, every URL read from it must be given; and the two keys must differ.
*/}}
{{- define "outbox-relay.validate" -}}
{{- include "outbox-relay.validateFile" . }}
{{- $made := include "outbox-relay.secretData" . | fromYaml }}
{{- if $made }}
{{- range $field, $ref := dict "database" .Values.database "broker" .Values.broker }}
{{- if and (not $ref.url) (not $ref.existingSecret) }}
{{- fail (printf "%s: the chart creates the Secret for the other URL, so set %s.url or %s.existingSecret too" $field $field $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.broker.existingSecret) (eq .Values.database.secretKey .Values.broker.secretKey) }}
{{- fail "database.secretKey and broker.secretKey must differ: both URLs live in the same Secret" }}
{{- end }}
{{- if and .Values.migrate.enabled .Values.migrate.database.url .Values.migrate.database.existingSecret }}
{{- fail "migrate.database: set url or existingSecret, not both" }}
{{- end }}
{{- range $field, $ref := dict "database" .Values.database "broker" .Values.broker }}
{{- if and $ref.url $ref.existingSecret }}
{{- fail (printf "%s: set url or existingSecret, not both" $field) }}
{{- end }}
{{- end }}
{{- if eq (int .Values.healthPort) (int .Values.metricsPort) }}
{{- fail "healthPort and metricsPort must differ: the relay serves probes and metrics on separate ports" }}
{{- end }}
{{- end }}

{{/*
Seconds between SIGTERM and SIGKILL: the relay finishes its batch for up to shutdownTimeout,
then closes its connections; the margin covers that.
*/}}
{{- define "outbox-relay.terminationGracePeriodSeconds" -}}
{{- $timeout := float64 .Values.shutdownTimeout }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int64 (ceil $timeout)) 10 }}
{{- else if le (float64 .Values.terminationGracePeriodSeconds) $timeout }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than shutdownTimeout (%v): the kubelet would kill the relay while it finishes its batch" .Values.terminationGracePeriodSeconds .Values.shutdownTimeout) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
A value for an environment variable: YAML numbers reach templates as float64, which would print
134217728 as 1.34217728e+08; whole numbers are printed as integers.
*/}}
{{- define "outbox-relay.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The variable the relay reads for a config key: batchSize -> OUTBOX_RELAY_BATCH_SIZE. */}}
{{- define "outbox-relay.envName" -}}
{{- printf "OUTBOX_RELAY_%s" (snakecase . | upper) }}
{{- end }}

{{/* Whether the relay reads a config file (configFile): "true" or "". */}}
{{- define "outbox-relay.fileMode" -}}
{{- if or .Values.configFile.content .Values.configFile.existingConfigMap }}true{{ end }}
{{- end }}

{{/* Where the config file is mounted; OUTBOX_RELAY_CONFIG points at it. */}}
{{- define "outbox-relay.configDir" -}}
/etc/outbox-relay
{{- end }}

{{- define "outbox-relay.configPath" -}}
{{- printf "%s/%s" (include "outbox-relay.configDir" .) .Values.configFile.key }}
{{- end }}

{{/* The relay's ConfigMap holding the file: the user's, or the chart's <fullname>-file. */}}
{{- define "outbox-relay.fileConfigMap" -}}
{{- .Values.configFile.existingConfigMap | default (printf "%s-file" (include "outbox-relay.fullname" . | trunc 58 | trimSuffix "-")) }}
{{- end }}

{{/* The Secret the chart stores configFile.secretEnv values in. */}}
{{- define "outbox-relay.fileEnvSecret" -}}
{{- printf "%s-file-env" (include "outbox-relay.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The migrate hook's copy of the file (a hook runs before the release's own ConfigMap exists). */}}
{{- define "outbox-relay.migrateFileConfigMap" -}}
{{- .Values.configFile.existingConfigMap | default (printf "%s-file" (include "outbox-relay.migrateName" .)) }}
{{- end }}

{{/* Values of configFile.secretEnv the chart stores: {NAME: value}. */}}
{{- define "outbox-relay.fileEnvData" -}}
{{- $data := dict }}
{{- range $name, $ref := .Values.configFile.secretEnv }}
{{- if $ref.value }}
{{- $_ := set $data $name $ref.value }}
{{- end }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/* The migrate hook's variables with a file: configFile.secretEnv, migrate.secretEnv over it. */}}
{{- define "outbox-relay.migrateFileEnv" -}}
{{- $env := dict }}
{{- range $name, $ref := .Values.configFile.secretEnv }}{{ $_ := set $env $name $ref }}{{ end }}
{{- range $name, $ref := .Values.migrate.secretEnv }}{{ $_ := set $env $name $ref }}{{ end }}
{{- toYaml $env }}
{{- end }}

{{/*
Variables from Secrets: one env entry per {NAME: {value} | {existingSecret, secretKey}}; values
the chart stores are read from the Secret .default under key NAME.
*/}}
{{- define "outbox-relay.secretEnvEntries" -}}
{{- range $name, $ref := .env }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.existingSecret | default $.default }}
      key: {{ $ref.secretKey | default $name }}
{{- end }}
{{- end }}

{{/* With a config file, what would name one outbox for all of them is refused. */}}
{{- define "outbox-relay.validateFile" -}}
{{- if include "outbox-relay.fileMode" . }}
{{- if and .Values.configFile.content .Values.configFile.existingConfigMap }}
{{- fail "configFile: set content or existingConfigMap, not both" }}
{{- end }}
{{- range $field, $ref := dict "database" .Values.database "broker" .Values.broker "migrate.database" .Values.migrate.database }}
{{- if or $ref.url $ref.existingSecret }}
{{- fail (printf "%s: not with configFile: the file names each outbox's URLs; reference them as ${NAME} and set NAME in configFile.secretEnv (migrate.secretEnv for the owner's)" $field) }}
{{- end }}
{{- end }}
{{- range $key := list "schema" "slotName" "publication" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s: not with configFile: it names one outbox (set it in the file's [[outbox]] tables)" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
