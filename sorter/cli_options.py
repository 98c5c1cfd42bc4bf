"""What the command lines share: options spelt once, the one way to print ``--json``, the help examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option(help="YAML settings file: broker address and client (SASL/TLS) settings")
]
BootstrapOpt = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: settings)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line", metavar="")]
BrokerWaitOpt = Annotated[float, typer.Option(help="seconds to wait for the broker before giving up")]


def print_json(obj: object) -> None:
    """``--json``: one JSON object as the last line of stdout (everything for people goes to stderr)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def example(command: str) -> str:
    """The epilog of a command's ``--help``."""
    return f"Example: [bold]{command}[/]"
