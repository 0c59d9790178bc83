"""Print a results file of bench.run as Markdown tables: ``python3 -m bench.report FILE``."""

import json
import sys
from pathlib import Path


def format_value(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(report: dict) -> str:
    lines = []
    for result in report["results"]:
        if "error" in result:
            lines.append(f"### {result['benchmark']}\n\nFailed: `{result['error']}`\n")
            continue
        load_start = result["load_start"][0]
        load_end = result["load_end"][0]
        lines.append(f"### {result['benchmark']}\n")
        lines.append(f"Load average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end.\n")
        lines.append("| row | unit | n | median | p90 | p99 | ratio | peer |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for row in result["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
            lines.append(
                f"| {row['label']} | {row['unit']} | {row['n']} | {format_value(row['median'])}"
                f" | {format_value(row['p90'])} | {format_value(row['p99'])} | {ratio}"
                f" | {row['compare_to'] or ''} |"
            )
        lines.append("")
        for note in result["notes"]:
            lines.append(f"- {note}")
        if "berth_start_phases_ms" in result:
            lines.append("")
            lines.append("| berth start phase | median ms |")
            lines.append("| --- | ---: |")
            for phase, value in result["berth_start_phases_ms"].items():
                lines.append(f"| {phase} | {value} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    print(markdown(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
