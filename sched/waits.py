"""Words for a task held back because a worker that holds its files should free up first."""

from __future__ import annotations


def local_wait_refusal(wait: tuple[float, str] | None, fetch_s: float) -> str | None:
    """The refusal when waiting for the holder (`wait`: seconds, name) beats fetching here."""
    if wait is None or wait[0] >= fetch_s:
        return None
    return (
        f"waiting for {wait[1]}, which holds the sector's files and should free "
        f"up in ~{minutes(wait[0])} (fetching here would take {minutes(fetch_s)})"
    )


def minutes(seconds: float) -> str:
    """`12 min` from a minute up, `40 s` below."""
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
