"""`python -m engine --model NAME --socket PATH`: a device's shared engine, configured from the
settings (shared/settings.py), serving every feeder (`python -m worker` with ENGINE_SOCKET=PATH)
that connects. The launcher starts one per model and device (rerank/launch.py)."""

from __future__ import annotations

import argparse
import sys

from engine.engine import EngineConfig
from engine.process import serve
from shared.settings import choose_model, get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("--model", help="served model name (needed when MODELS lists several)")
    parser.add_argument("--socket", required=True, help="Unix socket path the feeders connect to")
    args = parser.parse_args(argv)
    settings = get_settings()
    spec = choose_model(settings, args.model)
    sys.exit(serve(EngineConfig.from_settings(settings, spec), args.socket))


if __name__ == "__main__":
    main()
