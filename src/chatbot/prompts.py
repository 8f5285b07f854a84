"""Prompt profiles: system prompts kept as files, chosen per conversation by name."""

import logging
import re
from pathlib import Path

from chatbot.errors import AppError

logger = logging.getLogger(__name__)

PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
_SUFFIXES = (".md", ".txt")


class UnknownProfile(AppError):
    status = 422
    code = "unknown_prompt_profile"


class PromptProfiles:
    """Every `<name>.md` or `<name>.txt` of a folder, read once at start-up."""

    def __init__(self, profiles: dict[str, str], default: str | None = None) -> None:
        self._profiles = profiles
        self.default = default
        if default is not None:
            self.get(default)

    @classmethod
    def from_directory(cls, directory: str | Path, default: str | None = None) -> "PromptProfiles":
        folder = Path(directory)
        profiles: dict[str, str] = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in _SUFFIXES and PROFILE_NAME.match(path.stem):
                    text = path.read_text(encoding="utf-8").strip()
                    if text and "\x00" not in text:
                        profiles[path.stem] = text
        elif default is not None or directory != "prompts":
            logger.warning("prompt profile folder %s does not exist", folder)
        return cls(profiles, default)

    @property
    def names(self) -> list[str]:
        return sorted(self._profiles)

    def get(self, name: str) -> str:
        try:
            return self._profiles[name]
        except KeyError:
            raise UnknownProfile(
                f"There is no prompt profile named {name!r}",
                errors=[{"loc": ["body", "prompt_profile"], "msg": "unknown profile"}],
            ) from None

    def check(self, name: str | None) -> None:
        if name is not None:
            self.get(name)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._profiles.items())
