"""The PoRep stand-ins: CommR and the proof are memoised, and the chain's check stays as strict."""

from __future__ import annotations

from sectorfsm.sealing import commp, proofs

COMM_D = commp.unsealed_cid(2048, [(commp.zero_piece_cid(2048), 2048)])
TICKET = b"\x01" * 32
SEED = b"\x02" * 32


def test_memoised_results_are_the_computed_ones() -> None:
    proofs.sealed_cid.cache_clear()
    proofs.porep_proof.cache_clear()
    for n in range(3):
        sealed = proofs.sealed_cid(1000, n, COMM_D, TICKET)
        assert sealed == proofs.sealed_cid.__wrapped__(1000, n, COMM_D, TICKET)
        assert proofs.sealed_cid(1000, n, COMM_D, TICKET) == sealed
        proof = proofs.porep_proof(1000, n, sealed, COMM_D, TICKET, SEED)
        assert proof == proofs.porep_proof.__wrapped__(1000, n, sealed, COMM_D, TICKET, SEED)
        assert len(proof) == proofs.PROOF_BYTES
    assert proofs.sealed_cid.cache_info().hits == 3


def test_a_commr_made_here_is_known_without_decoding_it() -> None:
    # Each sector's CommR is new: its proof and the chain's check decoded it, missing the cache.
    proofs.sealed_cid.cache_clear()
    for n in range(200, 203):
        sealed = proofs.sealed_cid(1000, n, COMM_D, TICKET)
        misses = proofs._decoded.cache_info().misses
        assert proofs.digest_of(sealed) == proofs._decoded.__wrapped__(sealed)
        assert proofs._decoded.cache_info().misses == misses
    assert proofs.digest_of(COMM_D) == proofs._decoded.__wrapped__(COMM_D)


def test_the_check_after_a_memo_hit_still_rejects_what_does_not_match() -> None:
    sealed = proofs.sealed_cid(1000, 7, COMM_D, TICKET)
    proof = proofs.porep_proof(1000, 7, sealed, COMM_D, TICKET, SEED)
    assert proofs.verify_porep(1000, 7, sealed, COMM_D, TICKET, SEED, proof)
    other = b"\x03" * 32
    assert not proofs.verify_porep(1000, 7, sealed, COMM_D, other, SEED, proof)  # ticket
    assert not proofs.verify_porep(1000, 7, sealed, COMM_D, TICKET, other, proof)  # seed
    assert not proofs.verify_porep(1000, 8, sealed, COMM_D, TICKET, SEED, proof)  # sector
    assert not proofs.verify_porep(1001, 7, sealed, COMM_D, TICKET, SEED, proof)  # miner
    bad = bytes([proof[0] ^ 0xFF]) + proof[1:]
    assert not proofs.verify_porep(1000, 7, sealed, COMM_D, TICKET, SEED, bad)
    assert not proofs.verify_porep(1000, 7, "bnot-a-cid", COMM_D, TICKET, SEED, proof)


def test_commitment_cids_round_trip() -> None:
    comm = bytes(range(32))
    assert commp.parse_piece_cid(commp.commitment_to_cid(comm)) == comm
    assert commp.parse_sealed_cid(commp.commitment_to_cid(comm, sealed=True)) == comm
    assert commp.commitment_to_cid(comm).startswith("baga6ea4sea")
    assert commp.commitment_to_cid(comm, sealed=True).startswith("bagboea4b5abc")
