#!/usr/bin/env bash
# End to end on kind, for machines with Docker: build both images, load them, install the chart, bring up the
# demo model, chat with it through a port-forward, delete everything. `make e2e-kind`.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${QWEN_E2E_CLUSTER:-qwen-e2e}
TAG=e2e
missing=()
command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || missing+=("a running Docker engine")
command -v kind >/dev/null 2>&1 || missing+=("kind (https://kind.sigs.k8s.io)")
command -v kubectl >/dev/null 2>&1 || missing+=("kubectl")
command -v helm >/dev/null 2>&1 || missing+=("helm")
if ((${#missing[@]})); then
  echo "e2e-kind: skipped: this machine lacks ${missing[*]}" >&2
  exit 0
fi
cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; [[ -n ${PF:-} ]] && kill "$PF" 2>/dev/null || true; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*" >&2; }

step "images"
docker build -f Dockerfile.inference --build-arg TARGET=cpu -t "qwen-inference:$TAG" .
docker build -f Dockerfile.operator -t "qwen-operator:$TAG" .
step "kind cluster"
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image --name "$CLUSTER" "qwen-inference:$TAG" "qwen-operator:$TAG"
step "chart"
helm install qwen charts/qwen-operator -n qwen-system --create-namespace --wait --timeout 180s \
  --set image.repository=qwen-operator --set image.tag=$TAG --set image.pullPolicy=Never \
  --set inference.image.repository=qwen-inference --set inference.image.tag=$TAG
kubectl apply -f manifests/examples/demo.yaml
kubectl patch qwd demo --type merge -p '{"spec": {"imagePullPolicy": "Never"}}'
step "waiting for Ready"
for _ in $(seq 1 120); do
  phase=$(kubectl get qwd demo -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [[ $phase == Ready ]] && break
  sleep 5
done
kubectl get qwd demo -o wide
[[ $phase == Ready ]] || { kubectl describe qwd demo; exit 1; }
step "chat"
kubectl port-forward svc/demo 18000:8000 >/dev/null 2>&1 & PF=$!
sleep 3
curl -fsS http://127.0.0.1:18000/v1/chat/completions -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}' | tee /dev/stderr | grep -q '"finish_reason"'
curl -fsS http://127.0.0.1:18000/metrics | grep -q '^qwen_request_success_total'
step "delete"
kubectl delete qwd demo --wait=true
helm uninstall qwen -n qwen-system --wait
echo "e2e-kind: passed" >&2
