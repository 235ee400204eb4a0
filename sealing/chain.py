"""The chain API the sealing handlers need, and the records it returns.

The calls mirror the Lotus full-node methods the v1.11.3 pipeline uses (`ChainHead`,
`StateSectorPreCommitInfo`, `StateWaitMsg`, ...), reduced to what a handler reads. The
embedded implementation is `DevnetChain`, a *simulated* devnet (see `devnet.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar, Protocol

from pydantic import ConfigDict, Field, Strict

from ..validation import RECORD, Count, PositiveCount, validate

#: Seconds per epoch: from a millisecond (a fast simulation) to an hour; finite.
BlockTime = Annotated[float, Strict(), Field(ge=0.001, le=3600, allow_inf_nan=False)]


class ExitCode(enum.IntEnum):
    """Message exit codes that the handlers distinguish (Lotus `exitcode`)."""

    Ok = 0
    SysErrInsufficientFunds = 6
    SysErrOutOfGas = 7
    ErrIllegalArgument = 16
    ErrNotFound = 17
    ErrForbidden = 18


class ChainApiError(Exception):
    """The chain API failed (Lotus's `ErrApi` cases): the handler retries later."""


@dataclass(frozen=True, slots=True)
class ChainParams:
    """Network constants; `devnet()` is 2k-devnet-like, `mainnet()` is real.

    Values as in Lotus v1.11.3's miner-actor policy (`chain/actors/policy/policy.go@v1.11.3`)
    and build parameters (`build/params_2k.go@v1.11.3`, `build/params_mainnet.go@v1.11.3`).
    The field types carry the constraints `check` enforces: `Miner.open` refuses a block
    time of NaN, 0 or 1e-300 rather than computing nonsense epochs from it.
    """

    __pydantic_config__: ClassVar[ConfigDict] = RECORD

    name: Annotated[str, Field(min_length=1)]
    block_time: BlockTime
    pre_commit_challenge_delay: Count
    seal_randomness_lookback: Count = 900
    max_pre_commit_randomness_lookback: PositiveCount = 3780
    max_prove_commit_duration: PositiveCount = 86550
    min_sector_expiration: Count = 518400
    max_sector_expiration_extension: Count = 1555200
    interactive_porep_confidence: Count = 6
    message_confidence: Count = 5
    winning_post_sector_set_lookback: Count = 900
    #: Epochs between sending a message and its inclusion.
    inclusion_delay: Count = 1
    #: The head when the chain is created (so ticket lookbacks have history).
    start_epoch: Count = 2000

    def ticket_window(self) -> int:
        """Epochs from drawing a sealing ticket to the last epoch a precommit may use it."""
        return self.max_pre_commit_randomness_lookback - self.seal_randomness_lookback

    def check(self) -> ChainParams:
        """These parameters, every field checked; `ConfigError` naming the field if not."""
        checked: ChainParams = validate(ChainParams, self, "chain")
        if checked.ticket_window() <= 0:
            raise ValueError(
                "chain: max_pre_commit_randomness_lookback must exceed seal_randomness_lookback"
            )
        return checked

    @classmethod
    def devnet(cls, block_time: float = 1.0) -> ChainParams:
        """2k-devnet-like: PreCommitChallengeDelay 10, short blocks, short confidences."""
        return cls(
            name="devnet",
            block_time=block_time,
            pre_commit_challenge_delay=10,
            interactive_porep_confidence=1,
            message_confidence=1,
            winning_post_sector_set_lookback=10,
        )

    @classmethod
    def mainnet(cls) -> ChainParams:
        """Mainnet values (30 s blocks, PreCommitChallengeDelay 150)."""
        return cls(name="mainnet", block_time=30.0, pre_commit_challenge_delay=150)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where and how a message executed."""

    exit_code: ExitCode
    epoch: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class PreCommitParams:
    """What a precommit declares (Lotus `SectorPreCommitInfo`)."""

    number: int
    seal_proof: int
    sealed_cid: str
    seal_rand_epoch: int
    deal_ids: tuple[int, ...] = ()
    expiration: int = 0
    unsealed_cid: str | None = None


@dataclass(frozen=True, slots=True)
class PreCommitOnChain:
    """A precommit on chain (Lotus `SectorPreCommitOnChainInfo`)."""

    info: PreCommitParams
    precommit_epoch: int
    deposit: int


@dataclass(frozen=True, slots=True)
class SectorOnChain:
    """An active (proven) sector on chain (Lotus `SectorOnChainInfo`)."""

    number: int
    sealed_cid: str
    activation: int
    expiration: int
    deal_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DealProposal:
    """A published storage deal (Lotus `MarketDeal`'s proposal)."""

    deal_id: int
    piece_cid: str
    piece_size: int  # padded
    provider: int
    start_epoch: int
    end_epoch: int
    publish_cid: str = ""
    verified: bool = False


@dataclass(slots=True)
class ProveCommit:
    """One sector's proof in a ProveCommit(Aggregate) message."""

    number: int
    proof: bytes
    seal_proof: int = 0


class ChainAPI(Protocol):
    """What the sealing handlers ask of a chain."""

    params: ChainParams
    miner: int

    def head(self) -> int:
        """The current epoch (Lotus `ChainHead().Height()`)."""
        ...

    def epoch_time(self, epoch: int) -> float:
        """When `epoch` starts, on the engine clock."""
        ...

    def ticket_randomness(self, epoch: int) -> bytes:
        """Sealing ticket randomness at `epoch` (`GetRandomnessFromTickets`)."""
        ...

    def beacon_randomness(self, epoch: int) -> bytes:
        """Interactive seal challenge seed at `epoch` (`GetRandomnessFromBeacon`)."""
        ...

    def sector_allocated(self, number: int) -> bool:
        """True once a sector number was used on chain (`StateMinerSectorAllocated`)."""
        ...

    def precommit_info(self, number: int) -> PreCommitOnChain | None:
        """The precommit on chain, if any (`StateSectorPreCommitInfo`)."""
        ...

    def sector_info(self, number: int) -> SectorOnChain | None:
        """The active sector on chain, if any (`StateSectorGetInfo`)."""
        ...

    def deal(self, deal_id: int) -> DealProposal | None:
        """A published deal (`StateMarketStorageDealProposal`)."""
        ...

    def deal_by_publish_cid(self, publish_cid: str, piece_cid: str) -> DealProposal | None:
        """The deal a publish message created for a piece (Lotus `GetCurrentDealInfo`)."""
        ...

    def precommit_deposit(self, params: PreCommitParams) -> int:
        """The deposit a precommit needs (`StateMinerPreCommitDepositForPower`)."""
        ...

    def send_precommits(self, batch: list[PreCommitParams], deposit: int) -> str:
        """Send PreCommitSector (one) or PreCommitSectorBatch; returns the message CID."""
        ...

    def send_prove_commits(self, proofs: list[ProveCommit], aggregate: bool) -> str:
        """Send ProveCommitSector (one) or ProveCommitAggregate; returns the message CID."""
        ...

    def send_terminate(self, numbers: list[int]) -> str:
        """Send TerminateSectors; returns the message CID."""
        ...

    def find_message(self, method: str, number: int) -> str | None:
        """The latest message of `method` that names sector `number`, if any."""
        ...

    def search_msg(self, cid: str) -> Receipt | None:
        """The receipt if the message executed, else None (`StateSearchMsg`)."""
        ...

    async def wait_msg(self, cid: str, confidence: int) -> Receipt:
        """Wait until the message executed `confidence` epochs ago (`StateWaitMsg`)."""
        ...

    async def wait_epoch(self, epoch: int) -> None:
        """Wait until the head reaches `epoch` (`events.ChainAt`)."""
        ...

    def verify_seal(
        self,
        number: int,
        sealed_cid: str,
        unsealed_cid: str,
        ticket: bytes,
        seed: bytes,
        proof: bytes,
    ) -> bool:
        """Check a PoRep proof (`VerifySeal`)."""
        ...

    def base_fee(self) -> int:
        """The current base fee in attoFIL."""
        ...
