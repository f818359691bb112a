#!/usr/bin/env bash
# The two commands of the README:  ./run.sh demo [args]  (main job)  and  ./run.sh test [pytest args].
# Each sets up .venv first (idempotent): torch 2.13.0 (CPU) is installed only when the venv has no torch,
# so a GPU user's own torch is kept; then nanosae itself, editable, with test extras for `test`.
set -euo pipefail
# the CLI prints the commands to run next the way this user can type them (`bash run.sh` → ./run.sh)
case "$0" in */*) export NANOSAE_COMMAND="$0" ;; *) export NANOSAE_COMMAND="./$0" ;; esac
cd "$(dirname "$0")"
VENV=${NANOSAE_VENV:-.venv}
PYTHON=${PYTHON:-python3}

quiet_pip() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v -E "is ignored|^$" || true; }; }

setup() {  # $1 = extras ("" or "[test]")
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch ${NANOSAE_TORCH:-2.13.0} (CPU build where available)"
    quiet_pip "torch==${NANOSAE_TORCH:-2.13.0}"
  fi
  local stamp="$VENV/.nanosae-setup$1-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
  if [ ! -e "$stamp" ]; then
    echo "setup: installing nanosae$1 into $VENV"
    quiet_pip -e ".$1"
    touch "$stamp"
  fi
}

browser() {  # Debian chromium for the browser tests (Playwright drives it via executable_path)
  command -v chromium >/dev/null && return
  echo "setup: installing Debian chromium"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq chromium >/dev/null
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  test)
    setup "[test]"; browser
    "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *)
    setup ""
    exec "$VENV/bin/nanosae" "$cmd" "$@" ;;
esac
