"""The staleness rule (DESIGN.md invariant 1) as pure functions."""

from __future__ import annotations


def may_admit(groups_admitted: int, current_version: int, max_staleness: int | None, groups_per_step: int,
              in_flight: int = 0, keep_rate: float = 1.0) -> bool:
    """True while another prompt group may be admitted for generation.

    Admission stops once the expected occupancy reaches (current_version + max_staleness + 1) * groups_per_step:
    the groups needed by every training step that may still use data from version `current_version`.
    `groups_admitted` counts the admitted groups not dropped; of them the `in_flight` ones (not yet delivered)
    count `keep_rate` each, the fraction of recent groups that arrived and were kept: when most groups are dropped
    on arrival (zero variance), one round admits enough of them to fill the step, instead of a round for each
    shrinking remainder. keep_rate 1: every admitted group counts whole.
    max_staleness None = unbounded; 0 = synchronous (exactly the next step's groups, in expectation).
    """
    if max_staleness is None:
        return True
    expected = groups_admitted - in_flight + keep_rate * in_flight
    return expected < (current_version + max_staleness + 1) * groups_per_step


def is_too_stale(oldest_token_version: int, training_step: int, max_staleness: int | None) -> bool:
    """True if a trajectory whose oldest token came from `oldest_token_version` may not be used by
    training step `training_step` (which produces version training_step + 1)."""
    if max_staleness is None:
        return False
    return oldest_token_version < training_step - max_staleness


def staleness_label(max_staleness: int | None) -> str:
    """How a bound is shown: '4', or 'unbounded' for None."""
    return "unbounded" if max_staleness is None else str(max_staleness)


def parse_staleness(text: str) -> int | None:
    """A bound given on a command line: '4' -> 4; 'unbounded' (or 'null') -> None; anything else is a ValueError
    that names it."""
    if text in ("unbounded", "null"):
        return None
    if not text.isdigit():
        raise ValueError(f"max_staleness {text!r}: expected an integer >= 0 or 'unbounded'")
    return int(text)
