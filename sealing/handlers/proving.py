"""Proving, fault, termination and removal handlers.

Lotus: `extern/storage-sealing/states_proving.go@v1.11.3`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...fsm import Context
from ..chain import ChainApiError, ExitCode
from ..events import (
    SectorFaultedFinal,
    SectorRemove,
    SectorRemoved,
    SectorRemoveFailed,
    SectorTerminated,
    SectorTerminateFailed,
    SectorTerminating,
)
from ..info import SectorInfo

if TYPE_CHECKING:
    from ..pipeline import Sealing


async def handle_faulty(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Nothing to do: faults are the PoSt scheduler's business (as in Lotus)."""


async def handle_fault_reported(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait for the fault declaration to land."""
    if info.fault_report_msg is None:
        return  # reached by update-state: there is no message to wait for
    receipt = await s.chain.wait_msg(info.fault_report_msg, s.chain.params.message_confidence)
    if receipt.exit_code is not ExitCode.Ok:
        raise RuntimeError(f"declaring sector fault failed (exit {receipt.exit_code.name})")
    ctx.send(SectorFaultedFinal())


async def handle_terminating(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Send TerminateSectors (once: a message already sent is reused after a crash)."""
    chain = s.chain
    try:
        on_chain = chain.sector_info(info.number)
        pci = chain.precommit_info(info.number) if on_chain is None else None
    except ChainApiError as exc:
        ctx.send(SectorTerminateFailed(f"getting sector info: {exc}"))
        return
    if on_chain is None:
        if pci is not None:
            ctx.send(
                SectorTerminateFailed(
                    "sector was precommitted but not proven, remove instead of terminating"
                )
            )
        else:
            ctx.send(SectorRemove())
        return
    found = chain.find_message("TerminateSectors", info.number)
    if found is not None:
        receipt = chain.search_msg(found)
        if receipt is None or receipt.exit_code is ExitCode.Ok:
            ctx.send(SectorTerminating(found))
            return
    try:
        msg = chain.send_terminate([info.number])
    except ChainApiError as exc:
        ctx.send(SectorTerminateFailed(f"queueing termination: {exc}"))
        return
    ctx.send(SectorTerminating(msg))


async def handle_terminate_wait(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait for the termination message (none: already terminated, as in Lotus HEAD)."""
    chain = s.chain
    if info.terminate_message is None:
        ctx.send(SectorTerminated(chain.head()))
        return
    try:
        receipt = await chain.wait_msg(info.terminate_message, chain.params.message_confidence)
    except ChainApiError as exc:
        ctx.send(SectorTerminateFailed(f"waiting for terminate message: {exc}"))
        return
    if receipt.exit_code is not ExitCode.Ok:
        ctx.send(SectorTerminateFailed(f"terminate message failed: exit {receipt.exit_code.name}"))
        return
    ctx.send(SectorTerminated(receipt.epoch))


async def handle_terminate_finality(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait until the termination is past the winning-PoSt lookback, then remove the data."""
    chain = s.chain
    # Lotus's handleTerminateFinality computes this wait with an inverted sign
    # (`extern/storage-sealing/states_proving.go@v1.11.3`); this waits exactly.
    await chain.wait_epoch(info.terminated_at + chain.params.winning_post_sector_set_lookback)
    ctx.send(SectorRemove())


async def handle_removing(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Delete the sector's files."""
    try:
        await s.sealer.remove(s.ref(info))
    except Exception as exc:
        ctx.send(SectorRemoveFailed(f"removing sector: {exc}"))
        return
    ctx.send(SectorRemoved())
