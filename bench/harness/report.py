"""The benchmark suite's figures and shared results: bench/results/latest.json and latest.md.

Each scenario owns one key of the JSON and one section of the Markdown (between
`<!-- key -->` and `<!-- /key -->`), and replaces only those, so scenarios run one after the
other build one report that the README quotes.
"""

import contextlib
import datetime
import json
import re
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"
LATEST_JSON = RESULTS / "latest.json"
LATEST_MARKDOWN = RESULTS / "latest.md"


def percentiles(
    values: list[float], digits: int = 2, with_max: bool = False
) -> dict[str, float | None]:
    """p50, p95 and p99 (and the maximum, `with_max`), in the units given, to `digits`
    decimals; NaN (a failed measurement) is left out. Percentiles need two values or more."""
    values = [value for value in values if value == value]
    top = {"max": round(max(values), digits) if values else None} if with_max else {}
    if len(values) < 2:
        return {"p50": None, "p95": None, "p99": None, **top}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], digits),
        "p95": round(cuts[94], digits),
        "p99": round(cuts[98], digits),
        **top,
    }


def fmt(value: float | None, unit: str = " ms") -> str:
    """A figure of a table or a progress line, to a tenth; "-" where nothing was measured."""
    return "-" if value is None else f"{value:.1f}{unit}"


def machine_note(machine: dict[str, float], cores: int | None) -> str:
    """How busy the machine was over a stretch (a `MachineLoad` report), in words: the noise
    around a figure."""
    return (
        f"{machine['cores_busy']:g} of {cores} cores busy, {machine['client_cores']:g} of them "
        f"the client, {machine['cores_stolen_by_host']:g} stolen by the host"
    )


def met_lines(targets_met: dict[str, bool]) -> list[str]:
    """The Markdown list of a result's targets, each met or not."""
    return [f"- {name}: {'met' if met else 'NOT met'}" for name, met in targets_met.items()]


def measured_at() -> str:
    """Now, in UTC to the second: when a result was measured."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: Path, result: dict[str, Any]) -> None:
    """`result` as indented JSON in `path`, replaced in one step (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")  # bench/results/*.tmp is ignored by git
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)


def publish(
    key: str,
    result: dict[str, Any],
    markdown: str,
    json_path: Path = LATEST_JSON,
    markdown_path: Path = LATEST_MARKDOWN,
) -> None:
    """`result` under `key` in the JSON, `markdown` in the section `key` of the Markdown; the
    other scenarios' parts are kept."""
    merged: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        merged = json.loads(json_path.read_text())
    merged[key] = result
    write_json(json_path, merged)

    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    section = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = markdown_path.read_text() if markdown_path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text += ("\n" if text and not text.endswith("\n\n") else "") + section
    markdown_path.write_text(text)
