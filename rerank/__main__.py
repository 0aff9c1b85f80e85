"""`rerank` (`pip install .`), or `python -m rerank` in a checkout: the command line of rerank-service.

    python -m rerank up                      # Redis (if REDIS_URL is unset), workers, API on :6006
    python -m rerank api                     # the API alone under gunicorn (the API image's command)
    python -m rerank workers                 # workers only (one per model and GPU), for GPU nodes
    python -m rerank make-model DIR          # a random-weight reranker to try the service offline
    python -m rerank jobs submit in.jsonl --wait -o out.jsonl   # bulk jobs (see `jobs --help`)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.logs import configure_logging
from shared.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    prog = "rerank" if Path(sys.argv[0]).name == "rerank" else "python -m rerank"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start Redis (unless REDIS_URL is set), the workers and the API")
    sub.add_parser("api", help="the API alone under gunicorn on HOST:PORT, against REDIS_URL")
    workers = sub.add_parser("workers", help="start workers only: one per model and GPU, restarted if they die")
    workers.add_argument("--model", action="append", help="only this served model (repeatable)")
    from rerank.random_model import ARCHS, LLM_ARCHS

    make = sub.add_parser("make-model", help="save a random-weight reranker: XLM-R, Qwen3 or Gemma (no download)")
    make.add_argument("out", help="folder to write")
    make.add_argument("--arch", default="tiny", choices=[*ARCHS, *LLM_ARCHS])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--no-weights", action="store_true",
                      help="config and tokenizer only (enough for DEVICE=sim; quick for base/large)")
    from rerank import client

    client.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command in ("up", "workers"):
        from rerank.launch import up

        settings = get_settings()
        configure_logging(settings)
        if args.command == "workers":
            return up(settings, api=False, models=args.model)
        return up(settings)
    if args.command == "api":
        import api

        # The config file travels inside the installed api package, so this runs from any folder.
        conf = Path(api.__file__).with_name("gunicorn.conf.py")
        os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(conf)])
    if args.command == "make-model":
        from rerank.random_model import build_model

        print(build_model(args.out, args.arch, seed=args.seed, weights=not args.no_weights))
        return 0
    if args.command == "jobs":
        return client.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
