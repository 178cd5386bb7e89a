#!/usr/bin/env bash
# Proves tests/vectors/tokens.json comes from the reference: regenerates it with OpenAI's
# tiktoken (from PyPI, pinned, in a private venv) and fails if the committed file differs.
# The BPE files come from the tiktoken-rs crate (so cargo must have fetched the dependencies);
# tiktoken itself never touches the network.
set -euo pipefail
cd "$(dirname "$0")/.."

TIKTOKEN_VERSION=0.14.0
venv=${VECTORS_VENV:-target/vectors-venv}
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('tiktoken') != '$TIKTOKEN_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "tiktoken==$TIKTOKEN_VERSION"
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$venv/bin/python" scripts/make_token_vectors.py --out "$out"
if ! cmp -s "$out" tests/vectors/tokens.json; then
  echo "tests/vectors/tokens.json differs from what scripts/make_token_vectors.py makes with tiktoken $TIKTOKEN_VERSION:"
  diff <(python3 -m json.tool tests/vectors/tokens.json) <(python3 -m json.tool "$out") | head -40 || true
  echo "regenerate it: $venv/bin/python scripts/make_token_vectors.py"
  exit 1
fi
echo "tests/vectors/tokens.json matches tiktoken $TIKTOKEN_VERSION"
