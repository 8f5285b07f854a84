"""The toolsets this service knows: written in Python (the task list, those passed to
`create_app`, those CHATBOT_TOOLSET_IMPORTS names) and from the MCP servers in the settings.
A conversation names the ones its replies may use."""

import importlib
from collections.abc import Iterable, Mapping

from chatbot.config import ConfigError, Settings, check_toolset_name
from chatbot.errors import Unprocessable
from chatbot.tools.base import Tool, Toolset
from chatbot.tools.mcp_client import McpToolSource


def imported_toolsets(paths: Iterable[str]) -> list[Toolset]:
    """The toolsets CHATBOT_TOOLSET_IMPORTS names, each `package.module:NAME`."""
    found = []
    for path in paths:
        module_name, _, attribute = path.partition(":")
        try:
            toolset = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"CHATBOT_TOOLSET_IMPORTS: cannot import {path} ({exc})") from None
        if not isinstance(toolset, Toolset):
            raise ConfigError(f"CHATBOT_TOOLSET_IMPORTS: {path} is not a Toolset")
        found.append(toolset)
    return found


class UnknownToolset(Unprocessable):
    code = "unknown_toolset"


class ToolRegistry:
    def __init__(self, settings: Settings, built_in: Iterable[Toolset]) -> None:
        self._built_in: dict[str, Toolset] = {}
        for toolset in (*built_in, *imported_toolsets(settings.toolset_imports)):
            if toolset.name in self._built_in:
                raise ConfigError(f"two toolsets are named {toolset.name}")
            try:
                check_toolset_name(toolset.name)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            self._built_in[toolset.name] = toolset
        if clash := sorted(set(settings.mcp_servers) & set(self._built_in)):
            raise ConfigError(f"CHATBOT_MCP_SERVERS: {', '.join(clash)} is a built-in toolset")
        self._mcp_names = list(settings.mcp_servers)
        self._allowed = {
            name: set(server.users) for name, server in settings.mcp_servers.items() if server.users
        }
        self._sources: dict[str, McpToolSource] = {}
        self._default = list(settings.toolsets_by_default)
        self._max_rounds = settings.max_tool_rounds
        if unknown := sorted(set(self._default) - set(self.names)):
            raise ConfigError(f"CHATBOT_DEFAULT_TOOLSETS: unknown toolset {', '.join(unknown)}")

    @property
    def names(self) -> list[str]:
        return [*self._built_in, *self._mcp_names]

    def attach(self, sources: Iterable[McpToolSource]) -> None:
        """The connected MCP servers; their tools appear as they are listed."""
        self._sources = {source.name: source for source in sources}

    def available(self, user_id: str) -> list[str]:
        """The toolsets this user's conversations may name."""
        return [name for name in self.names if user_id in self._allowed.get(name, (user_id,))]

    def check(self, names: Iterable[str] | None, user_id: str) -> None:
        if names is None:
            return
        available = self.available(user_id)
        # A toolset kept from this user is unknown to them, not forbidden: its name is no news.
        if unknown := sorted(set(names) - set(available)):
            raise UnknownToolset(
                f"Unknown toolset: {', '.join(unknown)}; you may use "
                f"{', '.join(available) or 'none'}",
                errors=[{"loc": ["body", "toolsets"], "msg": f"unknown: {', '.join(unknown)}"}],
            )

    def toolsets_of(self, chosen: list[str] | None) -> list[str]:
        """The toolsets a conversation uses: those it chose, or (None) the default."""
        return self._default if chosen is None else chosen

    def offered(
        self, chosen: list[str] | None, user_id: str, *, model_takes_tools: bool = True
    ) -> Mapping[str, Tool]:
        """The tools a turn of a conversation that chose `chosen` offers the model for its
        user: none when no round of calls may run, or when the model's server refused them
        (`LLMClient.takes_tools`), so that their definitions are neither sent nor counted."""
        if self._max_rounds == 0 or not model_takes_tools:
            return {}
        available = set(self.available(user_id))
        return self.tools(name for name in self.toolsets_of(chosen) if name in available)

    def tools(self, names: Iterable[str]) -> Mapping[str, Tool]:
        """The tools of these toolsets by name, as they stand now. A toolset that is gone from
        the settings, or an MCP server that is not connected, contributes none."""
        found: dict[str, Tool] = {}
        for name in names:
            toolset = self._built_in.get(name)
            if toolset is None and (source := self._sources.get(name)) is not None:
                toolset = source.toolset
            for tool in toolset.tools if toolset else ():
                found.setdefault(tool.name, tool)
        return found
