#!/usr/bin/env bash
# The main job: a 3-node cluster on this machine (`ferry cluster up`), the seed
# article's nginx -> app -> redis app on it, and a visit through the NodePort
# from a client outside the cluster.
# `scripts/demo.sh --down DIR` removes it all (`ferry cluster down`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ferry="$root/target/debug/ferry"
if [ "${1:-}" = "--down" ]; then
  "$ferry" cluster down --state-dir "$2"
  exit 0
fi
dir="$1"
if [ -e "$dir/cluster.json" ]; then
  echo "a demo cluster is already up; removing it first"
  "$ferry" cluster down --state-dir "$dir"
fi
kubeconfig="$("$ferry" cluster up --nodes 3 --name ferry --state-dir "$dir" | tee /dev/stderr | tail -n 1)"
export KUBECONFIG="$kubeconfig"
set -x
kubectl get nodes -o wide
kubectl create configmap app-code --from-file=app.py="$root/examples/demo/app.py"
kubectl apply -f "$root/examples/demo/three-tier.yaml"
kubectl rollout status deploy/redis deploy/app deploy/nginx --timeout=180s
kubectl get svc
kubectl get pods -o wide
for _ in 1 2 3; do
  ip netns exec ferry-client curl -s --max-time 5 http://198.18.0.11:30080/
done
set +x
cat <<TXT

The cluster is up: 3 nodes (namespaces ferry-node-1..3), ferry proxy and ferry overlay
on each, the app behind nginx's NodePort 30080. Try:
  export KUBECONFIG=$kubeconfig
  ip netns exec ferry-client curl http://198.18.0.12:30080/     # any node's address works
  kubectl scale deploy/app --replicas=3 && kubectl get pods -o wide
  kubectl logs deploy/app
  kubectl label node ferry-node-2 storage=ssd
  kubectl patch deploy redis -p '{"spec":{"template":{"spec":{"nodeSelector":{"storage":"ssd"}}}}}'
  kubectl delete -f $root/examples/demo/three-tier.yaml
Remove everything with: make demo-down
TXT
