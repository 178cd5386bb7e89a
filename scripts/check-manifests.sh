#!/usr/bin/env bash
# Validates every YAML document in deploy/kubernetes/ offline, with no cluster:
#   1. against the JSON schemas of pinned Kubernetes versions, strictly (an unknown or misspelled
#      field is an error; so is a kind or apiVersion the version has no schema for), with
#      kubernetes-validate from PyPI, which ships the schemas: no network when validating.
#      A file of CRD kinds only (certificate.yaml: cert-manager's Certificate and Issuer, which
#      kubernetes-validate has no schema for) is checked by scripts/check_manifests.py instead:
#      known kinds, known and required fields, types; a file mixing them with built-in kinds is
#      refused, so a misspelled built-in kind can never pass as a "CRD";
#   2. that the check can fail: broken copies of the manifests (a misspelled field, a kind that
#      does not exist, a wrong type) must each be rejected, so it never passes vacuously;
#   3. cross-document rules no schema knows (scripts/check_manifests.py): Services select pods
#      and name declared ports, mounted ConfigMaps exist, probes reach a port tollgate serves on
#      the pod IP, grace period above the shutdown timeout, restrictive securityContext, ...;
#      TLS (issue 12): every certificate, key and CA flag names a file of a Secret mounted
#      read-only as a directory (never subPath, which rotation never reaches), a tollgate
#      reachable on the pod IP serves TLS and mTLS and has a NetworkPolicy admitting its gRPC
#      port only from selected pods, probes go to the plaintext --health-listen port, relays and
#      followers dial over TLS with a CA and the right server name, the Certificates (if any)
#      make the Secrets mounted with the names and usages needed, and no token, password or key
#      is in clear (and that copies breaking each of them are reported);
#   4. every policy the ConfigMaps carry, with `tollgate check-policy` (and that a broken one is
#      refused);
#   5. once the server's `serve --help` has the flags the manifests are written against (it
#      names --upstream), that every flag and TOLLGATE_* variable the manifests and the
#      Dockerfile use is one the server knows (and that a made-up one would not be).
# Every step is checked against a broken input too, so none of them can pass vacuously.
set -euo pipefail
cd "$(dirname "$0")/.."

# kubernetes-validate's version fixes the schemas; the Kubernetes versions are the oldest the
# manifests support (native sidecars, on by default since 1.29) and the newest it ships.
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VERSIONS="1.29.0 1.37.0"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

venv=${KUBERNETES_VALIDATE_VENV:-target/kubernetes-validate-venv}
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
kv="$venv/bin/kubernetes-validate"
py="$venv/bin/python"
echo "kubernetes-validate $("$kv" --version)"

shopt -s nullglob
manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/*.yml)
shopt -u nullglob
[ "${#manifests[@]}" -gt 0 ] || { echo "no manifests in deploy/kubernetes/"; exit 1; }

# validate FILE VERSION: 0 only if every document of FILE passed against VERSION's schemas.
# kubernetes-validate only warns (exit 0) about a kind it has no schema for, and passes an
# empty file: both are failures here, and every document must be reported as passed.
# A file whose documents are all of CRD kinds (an API group check_manifests.py lists in
# CRD_GROUPS) is checked by check_manifests.py, deliberately: kubernetes-validate has no schema
# for them. A file mixing CRD kinds with built-in ones is refused.
validate() {
  local file=$1 version=$2 out counts docs crds passed
  counts=$("$py" -B scripts/check_manifests.py count "$file") || return 1
  read -r docs crds <<<"$counts"
  if [ "$docs" -eq 0 ]; then echo "$file: no YAML documents"; return 1; fi
  if [ "$crds" -gt 0 ]; then
    if [ "$crds" -ne "$docs" ]; then
      echo "$file: $crds of its $docs documents are of CRD kinds: keep those in a file of their own"
      return 1
    fi
    "$py" -B scripts/check_manifests.py crd "$file"
    return
  fi
  if ! out=$("$kv" --strict --kubernetes-version "$version" "$file" 2>&1); then
    echo "$out"
    return 1
  fi
  if grep -qv ' passed for resource ' <<<"$out"; then
    echo "$out"
    return 1
  fi
  passed=$(grep -c ' passed for resource ' <<<"$out" || true)
  if [ "$passed" -ne "$docs" ]; then
    echo "$out"
    echo "$file: $docs documents, but $passed validated"
    return 1
  fi
  echo "$out"
}

fails=0
for version in $KUBERNETES_VERSIONS; do
  for f in "${manifests[@]}"; do
    if ! validate "$f" "$version"; then
      echo "FAILED: $f against Kubernetes $version"
      fails=$((fails + 1))
    fi
  done
done
[ "$fails" -eq 0 ] || { echo "$fails manifest validations failed"; exit 1; }

# The check must be able to fail: each broken copy must be rejected, against every version.
must_fail() {
  local what=$1 src=$2 edit=$3 broken version
  broken="$work/broken-$(basename "$src")"
  sed "$edit" "$src" >"$broken"
  if cmp -s "$src" "$broken"; then
    echo "self-test '$what': the edit '$edit' changed nothing in $src (update the self-test)"
    exit 1
  fi
  for version in $KUBERNETES_VERSIONS; do
    if validate "$broken" "$version" >"$work/rejected.txt" 2>&1; then
      cat "$work/rejected.txt"
      echo "self-test FAILED: $what was accepted against Kubernetes $version"
      exit 1
    fi
  done
  echo "ok: rejected as expected ($what): $(grep -m1 -vE '^INFO' "$work/rejected.txt")"
}
must_fail "a misspelled field" deploy/kubernetes/sidecar.yaml \
  's/readOnlyRootFilesystem: true/readOnlyRootFileSystem: true/'
must_fail "a kind that does not exist" deploy/kubernetes/central.yaml \
  's/^kind: StatefulSet$/kind: StatefulSett/'
must_fail "a wrong type" deploy/kubernetes/central.yaml \
  's/^  replicas: 1$/  replicas: one/'
must_fail "a misspelled probe field" deploy/kubernetes/central.yaml \
  '0,/^ *periodSeconds:/s/periodSeconds:/periodSecond:/'
if [ -f deploy/kubernetes/certificate.yaml ]; then
  must_fail "a misspelled field of a cert-manager Certificate" deploy/kubernetes/certificate.yaml \
    '0,/^  secretName:/s/^  secretName:/  secretNme:/'
  must_fail "a cert-manager kind that does not exist" deploy/kubernetes/certificate.yaml \
    '0,/^kind: Certificate$/s/^kind: Certificate$/kind: Certificat/'
  must_fail "a CRD kind in a file of built-in kinds" deploy/kubernetes/central.yaml \
    's/^apiVersion: networking.k8s.io\/v1$/apiVersion: cert-manager.io\/v1/'
fi

# Cross-document rules; writes the ConfigMaps' policies and the flags used into $work.
mkdir "$work/extracted"
"$py" -B scripts/check_manifests.py check "$work/extracted" "${manifests[@]}"
# ... which must be able to fail too. Each broken set is a copy of the manifests with a few
# edits (each must change its file), and each expected problem must be reported.
# broken_rules NAME FILE SED_SCRIPT [FILE SED_SCRIPT ...] -- EXPECTED...
broken_rules() {
  local name=$1 dir="$work/rules-$1" file edit
  shift
  mkdir "$dir" "$dir-out"
  cp "${manifests[@]}" "$dir/"
  while [ "$1" != "--" ]; do
    file=$1 edit=$2
    shift 2
    if [[ $edit == awk:* ]]; then
      awk "${edit#awk:}" "$dir/$file" >"$dir/$file.new" && mv "$dir/$file.new" "$dir/$file"
    else
      sed -i "$edit" "$dir/$file"
    fi
    if cmp -s "deploy/kubernetes/$file" "$dir/$file"; then
      echo "self-test '$name': the edit '$edit' changed nothing in $file (update the self-test)"
      exit 1
    fi
  done
  shift
  if "$py" -B scripts/check_manifests.py check "$dir-out" "$dir"/*.yaml >"$dir.txt" 2>&1; then
    cat "$dir.txt"
    echo "self-test FAILED ($name): broken cross-document rules were accepted"
    exit 1
  fi
  for expected in "$@"; do
    grep -qF -- "$expected" "$dir.txt" || { cat "$dir.txt"; echo "self-test FAILED ($name): no problem reported for: $expected"; exit 1; }
  done
  echo "ok: broken rules rejected as expected ($name): $(grep -c '^PROBLEM' "$dir.txt") problems found"
}
# Probes of the relay's loopback-only port, a grace period shorter than the shutdown timeout, a
# ledger in relaxed durability.
broken_rules basics \
  sidecar.yaml 's/port: 50052$/port: 50051/' \
  central.yaml 's/terminationGracePeriodSeconds: 30$/terminationGracePeriodSeconds: 5/; s/--durability=strict/--durability=relaxed/' \
  -- "which tollgate does not serve on the pod IP" "is not above --shutdown-timeout" "--durability strict"
# The TLS Secret mounted with subPath (a renewed certificate would never arrive), probes on the
# TLS port instead of the health port, no client CA, a relay dialing in plaintext.
broken_rules tls \
  central.yaml 's|^\( *\)mountPath: /etc/tollgate-tls$|\1mountPath: /etc/tollgate-tls/tls.crt\n\1subPath: tls.crt|' \
  central.yaml 's/^\( *\)port: 50052$/\1port: 50051/' \
  replicas.yaml '/--client-ca=/d' \
  sidecar.yaml 's|--upstream=https://|--upstream=http://|' \
  -- "is mounted with subPath" "not the --health-listen port" "without --client-ca" "is plaintext: dial https://"
# No NetworkPolicy for the replicas; central's gRPC port open to every pod of the namespace.
broken_rules network \
  replicas.yaml 'awk:BEGIN { RS = "\n---\n"; ORS = "\n---\n" } !/\nkind: NetworkPolicy\n/' \
  central.yaml '/tollgate.io\/client: "true"/d' \
  -- "replicas.yaml Deployment/tollgate-replicas container tollgate: no NetworkPolicy selects its pods" \
     "admits the gRPC port 50051 from every pod of the namespace"
# Credentials in clear: an API key as a literal variable, a private key pasted in a comment, a
# token in the policy instead of its hash.
broken_rules secrets \
  sidecar.yaml 's|^\( *\)- name: TOLLGATE_ADDR$|\1- name: OPENAI_API_KEY\n\1  value: sk-proj-AbCdEfGhIjKlMnOpQrStUv\n&|' \
  sidecar.yaml '$a # -----BEGIN PRIVATE KEY-----' \
  central.yaml 's/^    default_tier = "free"$/&\n    [callers.app]\n    token = "0123456789abcdef"/' \
  -- "OPENAI_API_KEY is not read from a Secret" "an API key (sk-...) in clear" "a PEM block" "a token or password in clear in the policy"

# Every shipped policy is one tollgate accepts.
cargo build --quiet --bin tollgate || { echo "FAILED: tollgate does not build"; exit 1; }
shopt -s nullglob
policies=("$work"/extracted/*.toml)
shopt -u nullglob
[ "${#policies[@]}" -gt 0 ] || { echo "no policy found in the ConfigMaps"; exit 1; }
for p in "${policies[@]}"; do
  echo "check-policy: ConfigMap key $(basename "$p")"
  cargo run --quiet --bin tollgate -- check-policy "$p" || { echo "FAILED: the policy in $(basename "$p") is refused"; exit 1; }
  # ... and check-policy refuses a broken copy (a misspelled key in the first tier).
  awk 'BEGIN { done = 0 } { print } !done && /^\[tiers\./ { print "tokens_per_dya = 1"; done = 1 }' \
    "$p" >"$work/broken-policy.toml"
  if cargo run --quiet --bin tollgate -- check-policy "$work/broken-policy.toml" >"$work/refused.txt" 2>&1; then
    cat "$work/refused.txt"
    echo "self-test FAILED: check-policy accepted a misspelled key"
    exit 1
  fi
  echo "ok: check-policy refuses a broken copy: $(grep -m1 . "$work/refused.txt")"
done

# The flags and variables used are the server's own, once its CLI has them all.
help=$(cargo run --quiet --bin tollgate -- serve --help)
has_flag() { grep -qE -- "^ *(-[a-zA-Z], )?$1( |=|\$)" <<<"$help"; }
has_env() { grep -qE -- "\[env: $1(=|\])" <<<"$help"; }
if has_flag --upstream; then
  # The matchers must be able to say no.
  if has_flag --no-such-flag || has_flag --listen-nowhere || has_env TOLLGATE_NO_SUCH_VARIABLE || has_env TOLLGATE_LISTE; then
    echo "self-test FAILED: the flag or variable matcher accepts a made-up name"
    exit 1
  fi
  unknown=0
  while read -r flag; do
    has_flag "$flag" || { echo "UNKNOWN FLAG in the manifests: $flag"; unknown=$((unknown + 1)); }
  done <"$work/extracted/flags.txt"
  while read -r name; do
    has_env "$name" || { echo "UNKNOWN VARIABLE in the manifests or Dockerfile: $name"; unknown=$((unknown + 1)); }
  done < <(cat "$work/extracted/env.txt" <(grep -oE 'TOLLGATE_[A-Z_]+' deploy/Dockerfile) | sort -u)
  [ "$unknown" -eq 0 ] || { echo "$unknown flags or variables unknown to \`tollgate serve\`"; exit 1; }
  echo "ok: the $(wc -l <"$work/extracted/flags.txt") flags and every TOLLGATE_* variable used are in \`tollgate serve --help\`"
else
  echo "NOTE: \`tollgate serve --help\` has no --upstream yet: flags not compared with the server's"
fi

echo "Kubernetes manifests: all checks passed (schemas of Kubernetes $KUBERNETES_VERSIONS)"
