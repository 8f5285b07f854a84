"""The LiteLLM proxy, the peer the benchmarks measure against, as its documentation says to run
it offline: from a venv of its own (bench/.venv-peers, `make bench-env`, never a dependency of
the project), its bundled model cost map instead of a download, its access log off as ours is.
"""

import json
import os
import subprocess
from pathlib import Path

from .upstream import ReplyShape

PEERS_VENV = Path(__file__).resolve().parents[1] / ".venv-peers"


def litellm_executable(peers_venv: Path) -> Path:
    """The proxy's command; SystemExit with what to run when the venv is not there."""
    litellm = peers_venv / "bin" / "litellm"
    if not litellm.exists():
        raise SystemExit(f"{litellm} is missing: run `make bench-env` first")
    return litellm


def litellm_options(
    workdir: Path, port: int, upstream_port: int, shapes: list[ReplyShape]
) -> list[str]:
    """Its config (JSON is YAML): each model name to the upstream's model of that name."""
    config = workdir / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": shape.model,
                        "litellm_params": {
                            "model": f"openai/{shape.model}",
                            "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                            "api_key": "bench",
                        },
                    }
                    for shape in shapes
                ]
            },
            indent=2,
        )
    )
    logging_config = workdir / "litellm-logging.json"
    logging_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"stderr": {"class": "logging.StreamHandler"}},
                "loggers": {
                    name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
                },
            }
        )
    )
    return [
        f"--config={config}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--log_config={logging_config}",
    ]


def litellm_env(master_key: str) -> dict[str, str]:
    """This environment without what would configure ours or LiteLLM otherwise, offline."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CHATBOT_", "OPENAI_", "DATABASE_", "REDIS_", "LITELLM_"))
    }
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=master_key)
    return env


def litellm_version(peers_venv: Path) -> str:
    return subprocess.run(  # noqa: S603
        [
            peers_venv / "bin" / "python",
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
