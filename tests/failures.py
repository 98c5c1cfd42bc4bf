"""How a CLI failure looks from outside: exit code 2 and exactly one line on stderr, no traceback."""

from __future__ import annotations

import json
import subprocess


def failure_message(proc: subprocess.CompletedProcess) -> str:
    """The message of a command that failed on purpose. With JSON logs (the default) the line is a JSON
    event ``sorter.failed`` (``jq`` keeps working on merged output); with console logs or when the
    logging flags themselves were wrong it is ``error: <message>``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    if lines[0].startswith("{"):
        event = json.loads(lines[0])
        assert event["event"] == "sorter.failed" and event["level"] == "error", event
        return event["error"]
    assert lines[0].startswith("error: "), lines[0]
    return lines[0].removeprefix("error: ")
