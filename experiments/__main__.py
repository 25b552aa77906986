"""Command line: ``python -m experiments <name> [--quick] [--override key=value ...] [--list]``
(``--print-config`` prints the resolved config)."""

from __future__ import annotations

import argparse
import json
import sys

from experiments import REGISTRY, get
from jaxattn.train.config import apply_overrides, config_to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", nargs="?", help="experiment name (see --list)")
    parser.add_argument("--list", action="store_true", help="list registered experiments")
    parser.add_argument("--quick", action="store_true", help="the small CPU preset")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field, e.g. optim.learning_rate=3e-3 (repeatable; "
                             "several may follow one --override)", nargs="+")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name in sorted(REGISTRY):
            print(f"{name:12s} {get(name).DESCRIPTION}")
        return 0 if args.list else 2
    module = get(args.name)
    cfg = module.quick_config() if args.quick else module.default_config()
    overrides = [item for group in args.override for item in group]
    try:
        cfg = apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    module.main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
