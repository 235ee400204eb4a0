"""Deterministic stand-ins for the PoRep outputs, shared by sealers and `DevnetChain`.

These are NOT real proofs of replication. CommR is derived from CommD, the ticket and the
sector id; the proof is a hash bound to CommR, CommD, the ticket, the seed and the sector id.
What they give: a sealer that used a wrong ticket or seed, or sealed the wrong data, produces
a proof the chain rejects, so Lotus's invalid-proof paths are exercised for real.
"""

from __future__ import annotations

import base64
import functools
import hashlib

from .commp import commitment_to_cid

PROOF_BYTES = 192  # the size of a Groth16 PoRep proof


def _h(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def digest_of(cid: str) -> bytes:
    """The 32-byte commitment inside a base32 commitment CID (sealed or unsealed)."""
    # A CommR made here is known without decoding its CID (each sector's is new: a decode
    # at its proof, and at the chain's check, missed the cache below).
    return _MADE.get(cid) or _decoded(cid)


#: CommR CIDs `sealed_cid` made lately -> their digest (oldest dropped past `_MEMO`).
_MADE: dict[str, bytes] = {}


# Every CC sector of a size has the same CommD, and a sector's CIDs are decoded again at each
# proof and each check (7 us a decode, 0.1 us a cache hit: ~7 decodes per sector sealed).
@functools.lru_cache(maxsize=4096)
def _decoded(cid: str) -> bytes:
    """`digest_of` by decoding the CID."""
    if not cid.startswith("b") or len(cid) < 50:
        raise ValueError(f"not a commitment CID: {cid!r}")
    body = cid[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    if len(raw) < 36:
        raise ValueError(f"not a commitment CID: {cid!r}")
    return raw[-32:]


def _id(miner: int, number: int) -> bytes:
    return miner.to_bytes(8, "big") + number.to_bytes(8, "big")


# CommR and the proof are pure functions of their inputs, each computed by the sealer and again
# by the chain when it verifies them (CommR twice: PreCommit2, then the proof's check): a
# bounded memo serves the check the sealer's result. It covers the sectors between their
# sealer's call and the chain's check (bench/cluster-100w.toml's ~2,300 a day hit as often
# with 2,048 entries as with 4,096); older ones are recomputed.
_MEMO = 2048


@functools.lru_cache(maxsize=_MEMO)
def sealed_cid(miner: int, number: int, unsealed_cid: str, ticket: bytes) -> str:
    """CommR for a sector: deterministic in CommD, the ticket and the sector id."""
    comm = bytearray(_h(b"sectorfsm/commr/v1", _id(miner, number), digest_of(unsealed_cid), ticket))
    comm[31] &= 0x3F  # a field element, like a real CommR
    digest = bytes(comm)
    cid = commitment_to_cid(digest, sealed=True)
    if len(_MADE) >= _MEMO:
        del _MADE[next(iter(_MADE))]
    _MADE[cid] = digest
    return cid


@functools.lru_cache(maxsize=_MEMO)
def porep_proof(
    miner: int, number: int, sealed: str, unsealed: str, ticket: bytes, seed: bytes
) -> bytes:
    """The commit proof: bound to CommR, CommD, the ticket, the seed and the sector id."""
    base = _h(
        b"sectorfsm/porep/v1",
        _id(miner, number),
        digest_of(sealed),
        digest_of(unsealed),
        ticket,
        seed,
    )
    out = b""
    counter = 0
    while len(out) < PROOF_BYTES:
        out += _h(base, counter.to_bytes(4, "big"))
        counter += 1
    return out[:PROOF_BYTES]


def verify_porep(
    miner: int, number: int, sealed: str, unsealed: str, ticket: bytes, seed: bytes, proof: bytes
) -> bool:
    """True when CommR matches CommD and the ticket, and `proof` binds them to the seed."""
    try:
        if sealed != sealed_cid(miner, number, unsealed, ticket):
            return False  # sealed with another ticket, or from other data
        return proof == porep_proof(miner, number, sealed, unsealed, ticket, seed)
    except ValueError:
        return False  # a malformed CID cannot have a valid proof
