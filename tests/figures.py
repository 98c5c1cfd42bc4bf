"""Figures the fault-injection tests measure (items, commands, duplicates, lost, dead letters), printed
in pytest's terminal summary (``tests/conftest.py``) so CI logs show them without ``-s``.

A module of its own: pytest imports ``conftest.py`` under its own name, so a list kept there would
not be the one the tests append to.
"""

FIGURES: list[str] = []


def report(test: str, **figures) -> None:
    FIGURES.append(f"{test}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
