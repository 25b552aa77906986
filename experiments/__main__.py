"""Command line: ``python -m experiments <name> [--quick | --medium] [--override key=value ...]
[--list]`` (``--medium``: a longer CPU preset, where an experiment defines ``medium_config``)
(``--print-config`` prints the resolved config).

Results go to a fresh run directory ``runs/<name>/<timestamp>/`` (git-ignored) unless
``--results-dir DIR`` names another; ``--publish`` writes to the experiment's committed results
folder (``experiments/<name>/results/``) instead, to refresh what the READMEs show."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from experiments import REGISTRY, get
from jaxattn.train.config import apply_overrides, config_to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", nargs="?", help="experiment name (see --list)")
    parser.add_argument("--list", action="store_true", help="list registered experiments")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the small CPU preset")
    preset.add_argument("--medium", action="store_true",
                        help="a longer CPU preset, for experiments that define one")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field, e.g. optim.learning_rate=3e-3 (repeatable; "
                             "several may follow one --override)", nargs="+")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--results-dir", metavar="DIR",
                       help="write results here (default: runs/<name>/<timestamp>/)")
    where.add_argument("--publish", action="store_true",
                       help="write into the committed experiments/<name>/results/")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name in sorted(REGISTRY):
            print(f"{name:12s} {get(name).DESCRIPTION}")
        return 0 if args.list else 2
    module = get(args.name)
    if args.medium and not hasattr(module, "medium_config"):
        print(f"error: experiment {args.name!r} has no --medium preset", file=sys.stderr)
        return 2
    cfg = (module.quick_config() if args.quick else
           module.medium_config() if args.medium else module.default_config())
    overrides = [item for group in args.override for item in group]
    try:
        cfg = apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = _with_results_dir(cfg, args)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    module.main(cfg)
    return 0


def _with_results_dir(cfg, args):
    """``cfg`` with ``sweep.output_dir`` set from ``--results-dir`` / ``--publish`` / the default
    run directory (experiments without a ``sweep.output_dir`` are returned unchanged)."""
    sweep = getattr(cfg, "sweep", None)
    if args.publish or sweep is None or not hasattr(sweep, "output_dir"):
        return cfg
    out = args.results_dir or str(
        pathlib.Path("runs") / args.name / time.strftime("%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, sweep=dataclasses.replace(sweep, output_dir=out))


if __name__ == "__main__":
    sys.exit(main())
