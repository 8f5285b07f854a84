"""The benchmark suite's shared results: bench/results/latest.json and latest.md.

Each scenario owns one key of the JSON and one section of the Markdown (between
`<!-- key -->` and `<!-- /key -->`), and replaces only those, so scenarios run one after the
other build one report that the README quotes.
"""

import contextlib
import json
import re
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LATEST_JSON = RESULTS / "latest.json"
LATEST_MARKDOWN = RESULTS / "latest.md"


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 and p99, in the units given; NaN (a failed measurement) is left out."""
    values = [value for value in values if value == value]
    if len(values) < 2:
        return {"p50": None, "p95": None, "p99": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 2), "p95": round(cuts[94], 2), "p99": round(cuts[98], 2)}


def fmt(value: float | None, unit: str = " ms") -> str:
    """A figure of a table or a progress line, to a tenth; "-" where nothing was measured."""
    return "-" if value is None else f"{value:.1f}{unit}"


def publish(
    key: str,
    result: dict[str, Any],
    markdown: str,
    json_path: Path = LATEST_JSON,
    markdown_path: Path = LATEST_MARKDOWN,
) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        merged = json.loads(json_path.read_text())
    merged[key] = result
    temporary = json_path.with_suffix(".tmp")  # ignored by git; replaced in one step
    temporary.write_text(json.dumps(merged, indent=2) + "\n")
    temporary.replace(json_path)

    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    section = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = markdown_path.read_text() if markdown_path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text += ("\n" if text and not text.endswith("\n\n") else "") + section
    markdown_path.write_text(text)
