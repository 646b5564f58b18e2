"""``dsv3lab replicate [--json | --markdown] [--quick] [--only NAME] [--out FILE]``: the report's
numbers next to the lab's, printed as a table and written as ``{"rows": [...]}``."""

from __future__ import annotations

import json
import os
import sys


def cmd_replicate(args) -> int:
    from dsv3lab.atomic import write_json_atomic
    from dsv3lab.replicate import replicate
    from dsv3lab.replicate.table import format_table, markdown_table
    rows = replicate(args.only, quick=args.quick)
    if args.out:
        write_json_atomic(args.out, {"rows": rows})
    if args.json:
        print(json.dumps({"rows": rows}, indent=1, default=str))
        return 0
    if args.markdown:
        print(markdown_table(rows), end="")
        return 0
    print(format_table(rows))
    for r in rows:
        if r["status"] != "match" and r["note"]:
            print(f"  [{r['status']}] {r['id']}: {r['note']}")
    if args.out:
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    from dsv3lab.replicate import CLAIMS
    p = sub.add_parser("replicate", help="the report's numbers next to the lab's: derived, measured, consistency")
    p.add_argument("--json", action="store_true", help='print {"rows": [...]} as JSON')
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/replicate.md)")
    p.add_argument("--quick", action="store_true",
                   help="run the measured rows' experiments now at their smallest scale (CI) instead of "
                        "reading data/results/")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help=f"only this claim group (repeatable): {', '.join(CLAIMS)}")
    p.add_argument("--out", default=os.path.join("results", "replicate.json"),
                   help="where to write the rows (JSON, atomically; '' to skip)")
    p.set_defaults(func=cmd_replicate)
