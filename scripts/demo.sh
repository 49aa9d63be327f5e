#!/usr/bin/env bash
# Starts `ferry controlplane`, applies the example app with kubectl and shows it.
# `scripts/demo.sh --down DIR` stops it and removes DIR.
set -euo pipefail
if [ "${1:-}" = "--down" ]; then
  dir="$2"
  [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
  rm -rf "$dir"
  echo "ferry demo stopped"
  exit 0
fi
dir="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
ferry="$root/target/debug/ferry"
[ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
rm -rf "$dir" && mkdir -p "$dir"
port=16443
"$ferry" controlplane --data-dir "$dir/data" --listen "127.0.0.1:$port" --kubeconfig-out "$dir/kubeconfig" \
  >"$dir/controlplane.log" 2>&1 &
echo $! >"$dir/pid"
for _ in $(seq 1 100); do
  [ -f "$dir/kubeconfig" ] && curl -sk "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
export KUBECONFIG="$dir/kubeconfig"
set -x
kubectl version
kubectl apply -f "$root/examples/web.yaml"
kubectl get svc,deploy,cm -o wide
kubectl get ns
set +x
cat <<TXT

ferry controlplane is running (pid $(cat "$dir/pid"), log: $dir/controlplane.log). Try:
  export KUBECONFIG=$dir/kubeconfig
  kubectl get svc web -o yaml          # the allocated clusterIP and nodePort
  kubectl scale deploy web --replicas=4 && kubectl get deploy web
  kubectl get cm -w                    # then, in another shell: kubectl create configmap x --from-literal=a=b
  kubectl delete -f $root/examples/web.yaml
Stop it with: make demo-down
TXT
