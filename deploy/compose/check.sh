#!/usr/bin/env bash
# The compose mesh, checked end to end (CI runs this): builds both images, brings the Bookinfo
# pods up, checks every flow from inside the containers, reads metrics and a certificate through
# the admin API, and tears everything down (volumes too), pass or fail.
# Usage: bash deploy/compose/check.sh      (KEYCARD_KEEP=1 leaves the mesh running)
set -euo pipefail
cd "$(dirname "$0")"
export KEYCARD_TAG=${KEYCARD_TAG:-dev}
project=keycard-check
if docker compose version >/dev/null 2>&1; then dc=(docker compose); else dc=(docker-compose); fi
dc+=(-p "$project" -f docker-compose.yaml)

bash ../image/build.sh

down() {
  if [ "${KEYCARD_KEEP:-}" != 1 ]; then "${dc[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; fi
}
trap down EXIT
down
"${dc[@]}" up -d

echo "waiting for every sidecar to hold its certificate"
pods=(productpage details reviews ratings sleep)
deadline=$((SECONDS + 120))
for pod in "${pods[@]}"; do
  while [ "$(docker inspect -f '{{.State.Health.Status}}' "$("${dc[@]}" ps -q "$pod")")" != healthy ]; do
    if [ $SECONDS -gt $deadline ]; then
      echo "FAIL: $pod never became healthy"; "${dc[@]}" ps; "${dc[@]}" logs --tail 30 "$pod-proxy" "$pod-init" ca
      exit 1
    fi
    sleep 1
  done
done
until "${dc[@]}" exec -T ingress-proxy keycard healthcheck >/dev/null 2>&1; do
  [ $SECONDS -gt $deadline ] && { echo "FAIL: ingress never ready"; "${dc[@]}" logs --tail 30 ingress-proxy; exit 1; }
  sleep 1
done

failed=0
# check NAME SERVICE EXPECT URL [METHOD]: EXPECT is a status code, or "refused" for no answer.
check() {
  local name=$1 svc=$2 want=$3 url=$4 method=${5:-GET} out code
  set +e
  out=$("${dc[@]}" exec -T "$svc" keycard bookinfo get --method "$method" "$url" 2>&1)
  code=$?
  set -e
  local got
  case $code in
    0|1) got=$(head -1 <<<"$out") ;;
    2) got=refused ;;
    *) got="error($code)" ;;
  esac
  if [ "$got" = "$want" ]; then
    printf 'ok    %-58s %s\n' "$name" "$got"
  else
    printf 'FAIL  %-58s want %s, got %s: %s\n' "$name" "$want" "$got" "$(tr '\n' ' ' <<<"$out" | cut -c1-200)"
    failed=1
  fi
  LAST="$out"
}

check "outside -> ingress -> productpage" intruder 200 http://ingress:8080/productpage
# The page is built from three calls (details, reviews, and reviews' ratings): all 200.
if [ "$(grep -o '"status":200' <<<"$LAST" | wc -l)" -ne 3 ]; then
  echo "FAIL  the page's own calls did not all succeed: $LAST"; failed=1
fi
check "productpage -> details (captured, mTLS)" productpage-app 200 http://details:9080/details/0
check "productpage -> reviews -> ratings" productpage-app 200 http://reviews:9080/reviews/0
check "reviews -> ratings" reviews-app 200 http://ratings:9080/ratings/0
check "productpage -> ratings (only reviews may)" productpage-app 403 http://ratings:9080/ratings/0
check "productpage -> details DELETE (GET only)" productpage-app 403 http://details:9080/details/0 DELETE
check "sleep (identity, no policy) -> details" sleep-app 403 http://details:9080/details/0
check "sleep (identity, no policy) -> productpage" sleep-app 403 http://productpage:9080/productpage
check "intruder (plaintext) -> details" intruder refused http://details:9080/details/0
check "intruder (plaintext) -> ratings" intruder refused http://ratings:9080/ratings/0
check "intruder (plaintext) -> productpage" intruder refused http://productpage:9080/productpage

metrics=$("${dc[@]}" exec -T details-proxy keycard bookinfo get http://127.0.0.1:15020/stats/prometheus)
want='istio_requests_total{.*connection_security_policy="mutual_tls".*source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage"'
if grep -Eq "$want" <<<"$metrics"; then
  echo "ok    details' metrics: requests from productpage over mutual_tls"
else
  echo "FAIL  details' metrics lack mutual_tls requests from productpage"; failed=1
fi
if grep -Eq '^keycard_handshake_failures_total\{direction="inbound",reason="plaintext_in_strict"\} [1-9]' <<<"$metrics"; then
  echo "ok    details' metrics: the intruder's plaintext refusals are counted"
else
  echo "FAIL  details' metrics do not count plaintext refusals"; failed=1
fi
certs=$("${dc[@]}" exec -T details-proxy keycard bookinfo get http://127.0.0.1:15000/certs)
if grep -q 'spiffe://cluster.local/ns/default/sa/bookinfo-details' <<<"$certs"; then
  echo "ok    details' certificate (admin API /certs) names spiffe://cluster.local/ns/default/sa/bookinfo-details"
else
  echo "FAIL  /certs: $certs"; failed=1
fi

if [ $failed -ne 0 ]; then
  "${dc[@]}" ps
  for s in details-proxy productpage-proxy ca; do "${dc[@]}" logs --tail 20 "$s"; done
  echo "compose mesh: FAILED"; exit 1
fi
echo "compose mesh: every flow as the policies say"
