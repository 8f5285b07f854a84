"""The shape of the code, checked: imports run one way, and only the replies package writes a
reply's row. Read from the source with `ast`, so a new module is checked as soon as it exists."""

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tests.support import ROOT

SOURCE = ROOT / "src" / "chatbot"

WEB = {
    "chatbot.app",
    "chatbot.cli",
    "chatbot.__main__",
    "chatbot.deps",
    "chatbot.state",
    "chatbot.health",
    "chatbot.middleware",
    "chatbot.chat.responses",
    "chatbot.tasks.mcp_server",
}
"""Modules at the top, beside every `router` and `deps` module: what serves HTTP (or MCP)."""

ABOVE_REPLIES = {"chat", "streams"}
"""Packages that start turns or serve streams: the replies package never imports them."""
BELOW_REPLIES = {"conversations", "messages", "llm", "tools", "context", "quotas", "tasks"}
"""What replies build on: none of it imports replies, chat or streams."""


@cache
def modules() -> dict[str, set[str]]:
    """Every module of the package and the package's modules it imports."""
    found: dict[str, tuple[Path, set[str]]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        found[name] = (path, imported)
    return {
        name: {other for other in imported if other in found and other != name}
        for name, (_, imported) in found.items()
    }


def is_web(module: str) -> bool:
    return (
        module in WEB
        or module.rsplit(".", 1)[-1] in ("router", "deps")
        or module.startswith("chatbot.web")
    )


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _edges() -> Iterator[tuple[str, str]]:
    for module, imported in modules().items():
        for other in imported:
            yield module, other


def test_nothing_below_the_web_layer_imports_it() -> None:
    wrong = [(module, other) for module, other in _edges() if not is_web(module) and is_web(other)]
    assert not wrong, wrong


def test_replies_sit_between_turns_and_what_they_build_on() -> None:
    wrong = [
        (module, other)
        for module, other in _edges()
        if not is_web(module)
        and (
            (package(module) == "replies" and package(other) in ABOVE_REPLIES)
            or (package(module) in BELOW_REPLIES and package(other) in {"replies", *ABOVE_REPLIES})
        )
    ]
    assert not wrong, wrong


def test_packages_import_each_other_one_way_only() -> None:
    """Below the web layer the packages form no cycle, however long."""
    graph: dict[str, set[str]] = {}
    for module, other in _edges():
        if not is_web(module) and package(module) != package(other):
            graph.setdefault(package(module), set()).add(package(other))

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for following in sorted(graph.get(path[-1], ())):
            if following == start:
                return [*path, start]
            if following not in path and (found := cycle_from(start, [*path, following])):
                return found
        return None

    cycles = [found for start in sorted(graph) if (found := cycle_from(start, [start]))]
    assert not cycles, cycles[0]


def _writes_reply_rows(tree: ast.AST) -> list[int]:
    """Lines that build a statement on the messages table, or an assistant or tool message
    (through the constructor or `detached`)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else None
        first = node.args[0] if node.args else None
        if (
            name in ("update", "insert", "delete")
            and isinstance(first, ast.Name)
            and first.id == "Message"
        ):
            lines.append(node.lineno)
        roles: list[ast.expr] = []
        if name == "Message":
            roles = [keyword.value for keyword in node.keywords if keyword.arg == "role"]
        elif (
            name == "detached"
            and isinstance(first, ast.Name)
            and first.id == "Message"
            and len(node.args) > 1
            and isinstance(values := node.args[1], ast.Dict)
        ):
            roles = [
                value
                for key, value in zip(values.keys, values.values, strict=True)
                if isinstance(key, ast.Constant) and key.value == "role"
            ]
        if any(
            isinstance(role, ast.Attribute) and role.attr in ("ASSISTANT", "TOOL") for role in roles
        ):
            lines.append(node.lineno)
    lines += [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "__table__"
        and isinstance(node.value, ast.Name)
        and node.value.id == "Message"
    ]
    return lines


def test_only_the_replies_package_writes_a_reply_row() -> None:
    writers = {}
    for path in SOURCE.rglob("*.py"):
        if path.relative_to(SOURCE).parts[0] == "replies":
            continue
        if lines := _writes_reply_rows(ast.parse(path.read_text(encoding="utf-8"))):
            writers[str(path.relative_to(SOURCE))] = lines
    assert not writers, writers


def test_the_checks_see_what_they_look_for() -> None:
    """The rules above would pass on an empty tree: make sure they read the real one."""
    graph = modules()
    assert "chatbot.replies.runner" in graph
    assert "chatbot.replies.store" in graph["chatbot.replies.runner"]
    replies = SOURCE / "replies" / "repository.py"
    assert _writes_reply_rows(ast.parse(replies.read_text(encoding="utf-8")))
    built = 'detached(Message, {"id": 1, "role": Role.ASSISTANT})'
    assert _writes_reply_rows(ast.parse(built)) == [1]
    assert _writes_reply_rows(ast.parse(built.replace("ASSISTANT", "USER"))) == []
