"""Print, check or update the README's config reference table (generated from loha_train/config/schema.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loha_train.config.doc import render_config_table, replace_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="README", type=Path, help="exit 1 if README's table is out of date")
    group.add_argument("--write", metavar="README", type=Path, help="rewrite README's table in place")
    args = parser.parse_args(argv)
    table = render_config_table()
    readme: Path | None = args.check or args.write
    if readme is None:
        print(table)
        return 0
    try:
        text = readme.read_text(encoding="utf-8")
        updated = replace_table(text, table)
    except (OSError, ValueError) as err:
        print(f"{readme}: {err}", file=sys.stderr)
        return 1
    if args.write:
        if updated != text:
            readme.write_text(updated, encoding="utf-8")
        return 0
    if updated != text:
        print(f"{readme}: config table is out of date; run scripts/config_table.py --write {readme}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
