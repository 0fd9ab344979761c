# Sourced by scripts/serve and scripts/test: make .venv on first run and keep it
# in step with pyproject.toml (re-installs when pyproject.toml changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gifting needs Python >= 3.11")'
if [ ! -x .venv/bin/python ]; then
  echo "scripts: creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  echo "scripts: installing gifting and its test tools into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' >&2
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
