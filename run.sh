#!/usr/bin/env bash
# The one command: install what is missing, then start Redis (unless REDIS_URL is set), one worker
# per served model and the API on 0.0.0.0:6006. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh requirements/local.txt
exec .venv/bin/python -m rerank up "$@"
