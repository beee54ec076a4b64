"""Run ccm for a benchmark the way `ccm serve` does (same logging, same uvicorn config).

    python -m tests.benchmarks.server_proc --port P (--database-url URL | --memory) [--log-level L]

Prints one JSON line `{"pid": ...}` when listening. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tests.benchmarks.common import API_KEY, raise_nofile_limit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--memory", action="store_true", help="database.enabled: false")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--cleanup-interval", default=None, help="run the in-server cleanup job")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value override")
    args = parser.parse_args()
    raise_nofile_limit()

    from ccm.config import Settings
    from ccm.logs import configure_logging
    from ccm.server.app import create_app
    from ccm.server.serve import run_server
    from ccm.store.engine import make_engine

    overrides: dict[str, object] = {
        "server.port": args.port,
        "server.api_key": API_KEY,
        "cleanup.enabled": args.cleanup_interval is not None,
        "logging.level": args.log_level,
    }
    if args.cleanup_interval is not None:
        overrides["cleanup.interval"] = args.cleanup_interval
    if args.memory:
        overrides["database.enabled"] = False
    elif args.database_url:
        overrides["database.url"] = args.database_url
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = value
    settings = Settings().with_overrides(overrides)
    configure_logging(settings.logging.level, settings.logging.format)
    if not args.memory:
        make_engine(settings.database_url).dispose()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    run_server(create_app(settings, api_key=API_KEY), settings)
    sys.exit(0)


if __name__ == "__main__":
    main()
