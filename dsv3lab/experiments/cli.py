"""``dsv3lab experiment NAME [--quick] [--seeds 0,1,2]``: re-run one experiment, record its JSON."""

from __future__ import annotations

import json


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError("--seeds is empty")
    return seeds


def add_commands(sub) -> None:
    from dsv3lab.experiments import DEFAULT_SEEDS, REGISTRY
    p = sub.add_parser("experiment", help="run one of the report's experiments at lab scale; "
                       "records data/results/NAME.json")
    p.add_argument("name", choices=sorted(REGISTRY) + ["list"], help="experiment, or 'list'")
    p.add_argument("--quick", action="store_true",
                   help="the smallest scale (CI); printed, not recorded unless --record")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="comma-separated seeds, the same for every arm (default %(default)s)")
    p.add_argument("--record", action="store_true", help="write the result even with --quick")
    p.add_argument("--out", default=None, help="results directory (default data/results)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experiment)


def _cmd_experiment(args) -> int:
    from dsv3lab import experiments as X
    if args.name == "list":            # every registered experiment; one that cannot be imported says why
        missing = X.unavailable()
        for name in X.names():
            print(f"{name:14s} " + (f"unavailable: {missing[name]}" if name in missing else X.module(name).TITLE))
        return 0
    record = True if args.record else None
    try:
        X.module(args.name)
    except X.ExperimentUnavailable as e:
        raise ValueError(str(e)) from None    # the command's error line, not a traceback
    res = X.run(args.name, quick=args.quick, seeds=_seeds(args.seeds), record=record, out_dir=args.out,
                progress=not args.no_progress)
    if args.json:
        print(json.dumps(res, indent=1, sort_keys=True))
        return 0
    print(f"{res['name']}: {res['title']}\n  scale: {res['scale']}\n  seeds: {res['seeds']}, "
          f"{res['wall_s']:.0f} s, commit {(res['commit'] or '?')[:10]}{' (dirty)' if res['dirty'] else ''}")
    from dsv3lab.viz.tables import text_table
    g6, g2 = (lambda v: f"{v:.6g}"), (lambda v: f"± {v:.2g}")
    print(text_table([dict(metric=k, mean=m["mean"], std=m["std"], min=m["min"], max=m["max"])
                      for k, m in sorted(res["metrics"].items())],
                     formats=dict(mean=g6, std=g2, min=g6, max=g6)))
    if record or not args.quick:
        print(f"  recorded: {X.result_path(args.name, args.out)}")
    return 0
