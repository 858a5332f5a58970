#!/usr/bin/env bash
# The end of `make demo`: a one-screen tour of what the datapath did, each
# step a real request from a pod and the trace line that names its fate.
# Needs KUBECONFIG, PATH (kubectl-ebpf) and KEBPF_TESTSERVER_IMAGE from
# `kebpf-cluster env`. Leaves namespace kebpf-demo in place to explore.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ns=kebpf-demo
: "${KEBPF_TESTSERVER_IMAGE:?run with the exports of kebpf-cluster env}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
probe() { kubectl -n "$ns" exec client -- /usr/local/bin/kebpf-testserver probe --timeout 2s "$@" 2>/dev/null || true; }

say "Three pods and a Service in namespace $ns"
sed "s#IMAGE#${KEBPF_TESTSERVER_IMAGE}#" "$here/tour.yaml" | kubectl apply -f - >/dev/null
kubectl -n "$ns" wait --for=condition=Ready pod/web pod/api pod/client --timeout=3m >/dev/null
kubectl -n "$ns" get pods -o wide
vip=$(kubectl -n "$ns" get svc web -o jsonpath='{.spec.clusterIP}')
web=$(kubectl -n "$ns" get pod web -o jsonpath='{.status.podIP}')
api=$(kubectl -n "$ns" get pod api -o jsonpath='{.status.podIP}')

say "1. client -> Service web ($vip:80): connect() goes straight to the pod, no DNAT"
probe --protocol http --to "$vip:80/"
run kubectl ebpf trace -n "$ns" --type lb --last 1

say "2. A NetworkPolicy lets only app=frontend reach web; client is denied"
kubectl apply -f - >/dev/null <<YAML
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-frontend-only, namespace: $ns}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]
YAML
sleep 2
probe --protocol tcp --to "$web:80"
run kubectl ebpf trace -n "$ns" --verdict denied --last 1
run kubectl ebpf trace policy --from "$ns/client" --to "$ns/web" --port 80 || true

say "3. An L7Policy on api:8080 allows GET /public only; Envoy answers the rest with 403"
kubectl ebpf enable l7 --wait >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: kubectl-ebpf.io/v1alpha1
kind: L7Policy
metadata: {name: api-public, namespace: $ns}
spec:
  podSelector: {matchLabels: {app: api}}
  ports: [{port: 8080}]
  rules: [{methods: [GET], path: {prefix: /public}}]
YAML
for i in $(seq 30); do # until this node's Envoy has the policy
  out=$(probe --protocol http --to "$api:8080/admin")
  case "$out" in *'"status":403'*) break ;; esac
  sleep 1
done
probe --protocol http --to "$api:8080/public"
echo "$out"
run kubectl ebpf trace -n "$ns" --type l7 --last 3

say "4. The agents"
run kubectl ebpf status
