"""usage_report [--date YYYY-MM-DD] [--format table|csv|json] [--group-by user|model|key]

One UTC day of the ledger (default today), grouped by user unless told otherwise.
"""

from __future__ import annotations

import csv
import json
from argparse import ArgumentParser
from typing import Any

from quotas.management.base import TollgateCommand
from quotas.selectors import usage_rows

COLUMNS = ("requests", "cached", "prompt_tokens", "completion_tokens", "cost_usd")
NO_GROUP = {"user": "(deleted user)", "key": "(no key)", "model": "(none)"}


class Command(TollgateCommand):
    help = "Usage of one UTC day from the ledger: requests, cache hits, tokens and cost."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--date", default=None, help="The UTC day, YYYY-MM-DD (default: today)."
        )
        self.add_format_argument(parser)
        parser.add_argument(
            "--group-by", choices=("user", "model", "key"), default="user", dest="group_by"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        day = self.parse_day(options["date"])
        group_by: str = options["group_by"]
        report = usage_rows(user_id=None, start=day, end=day, group_by=group_by)
        fmt = options["format"]
        if fmt == "json":
            self.stdout.write(
                json.dumps({"date": day.isoformat(), "group_by": group_by, **report}, indent=2)
            )
            return
        rows = [
            [row["group"] if row["group"] is not None else NO_GROUP[group_by]]
            + [str(row[column]) for column in COLUMNS]
            for row in report["rows"]
        ]
        header = [group_by, *COLUMNS]
        if fmt == "csv":
            writer = csv.writer(self.stdout, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
            return
        total = ["TOTAL", *(str(report["totals"][column]) for column in COLUMNS)]
        widths = [max(len(line[i]) for line in (header, *rows, total)) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first, *numbers = cells
            return "  ".join(
                [first.ljust(widths[0])]
                + [cell.rjust(width) for cell, width in zip(numbers, widths[1:], strict=True)]
            ).rstrip()

        self.stdout.write(f"Usage on {day.isoformat()} (UTC), by {group_by}")
        self.stdout.write(line(header))
        self.stdout.write("  ".join("-" * width for width in widths))
        for row in rows:
            self.stdout.write(line(row))
        if not rows:
            self.stdout.write("(no requests)")
        self.stdout.write(line(total))
