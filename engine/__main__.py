"""`python -m engine --socket PATH (--model NAME | --config JSON [--single])`: an engine process.

With `--model`, a device's shared engine configured from the settings (shared/settings.py),
serving every feeder (`python -m worker` with ENGINE_SOCKET=PATH) that connects: the launcher
starts one per model and device (rerank/launch.py). With `--config` (an EngineConfig as JSON) and
`--single`, a worker's own engine, serving that worker alone (engine.process.EngineProcess).
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.engine import EngineConfig
from engine.process import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="Unix socket path the feeders connect to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="served model name, configured from the settings")
    source.add_argument("--config", help="an EngineConfig as JSON")
    parser.add_argument("--single", action="store_true", help="serve one feeder, end when it leaves")
    args = parser.parse_args(argv)
    if args.config is not None:
        config = EngineConfig(**json.loads(args.config))
    else:
        from shared.settings import choose_model, get_settings

        settings = get_settings()
        config = EngineConfig.from_settings(settings, choose_model(settings, args.model))
    sys.exit(serve(config, args.socket, single=args.single))


if __name__ == "__main__":
    main()
