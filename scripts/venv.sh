#!/usr/bin/env bash
# Make .venv hold what a requirements file lists; reinstall only when that file set changes.
# Usage: scripts/venv.sh requirements/dev.txt
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:?requirements file}"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python 3.10+ needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.installed-$(basename "$req" .txt)"
digest="$(cat requirements/*.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "installing $req into .venv (first run takes a few minutes)" >&2
  # Installed without compiling, then compiled on every core at once (pip compiles one file at a
  # time: half of a fresh install on 2 cores). Compiled up front either way: where
  # PYTHONDONTWRITEBYTECODE is set, as on these VMs, nothing imported later would ever be cached,
  # and every process would compile torch and transformers from source again.
  .venv/bin/python -m pip install -q --no-compile --disable-pip-version-check -r "$req" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true
  .venv/bin/python -m pip check >/dev/null 2>&1 || .venv/bin/python -m pip check >&2 || true
  .venv/bin/python -c 'import celery, flask, torch, transformers' 2>/dev/null \
    || { echo "installation of $req failed" >&2; exit 1; }
  echo "$digest" > "$stamp"
fi
