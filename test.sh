#!/usr/bin/env bash
# The one test command: install what is missing, then run the whole suite against real parts
# (its own Redis, real Celery worker processes, gunicorn). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh requirements/dev.txt
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # Debian's docker-compose checks the compose file (no Docker engine needed); best effort.
  { apt-get install -y -q docker-compose || { apt-get update -q && apt-get install -y -q docker-compose; }; } \
    >/dev/null 2>&1 || echo "docker-compose could not be installed; the compose check will be skipped" >&2
fi
# Test folders (model folders, logs, job storage) and every temporary file live in one folder, removed at the end
# whatever the outcome; KEEP_TEST_TMP=1 keeps it to read a failed test's logs.
tmp=$(mktemp -d -t rerank-tests-XXXXXX)
if [ "${KEEP_TEST_TMP:-0}" = 1 ]; then echo "test folders kept in $tmp" >&2; else trap 'rm -rf "$tmp"' EXIT; fi
mkdir "$tmp/tmp"
TMPDIR="$tmp/tmp" .venv/bin/python -m pytest --basetemp "$tmp/pytest" "$@"
