"""Piece commitments (CommP), CommD and their CIDs: published vectors, streaming, sources, errors.

Every expected value below comes from a public source named beside it (repository, path, and the
commit it was read at), so a change that breaks Filecoin compatibility fails here.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sectorfsm.sealing import commp
from sectorfsm.sealing.commp import (
    CommPHasher,
    Fr32Padder,
    commitment_to_cid,
    fr32_pad,
    fr32_pad_stream,
    padded_size,
    parse_piece_cid,
    parse_sealed_cid,
    piece_cid,
    unpadded_size,
    unsealed_cid,
    zero_comm,
    zero_piece_cid,
)

GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------- published vectors

# Commitments of all-zero pieces of 128 B << i: the PieceComms table of
# filecoin-project/go-commp-utils zerocomm/zerocomm.go
# at commit 3493ca35aca45adfa69a524a1a9422fff8060f21 (the table dates from 88120efb).
ZERO_COMMS = [
    "3731bb99ac689f66eef5973e4a94da188f4ddcae580724fc6f3fd60dfd488333",  # 128
    "642a607ef886b004bf2c1978463ae1d4693ac0f410eb2d1b7a47fe205e5e750f",  # 256
    "57a2381a28652bf47f6bef7aca679be4aede5871ab5cf3eb2c08114488cb8526",  # 512
    "1f7ac9595510e09ea41c460b176430bb322cd6fb412ec57cb17d989a4310372f",  # 1024
    "fc7e928296e516faade986b28f92d44a4f24b935485223376a799027bc18f833",  # 2048
    "08c47b38ee13bc43f41b915c0eed9911a26086b3ed62401bf9d58b8d19dff624",  # 4096
    "b2e47bfb11facd941f62af5c750f3ea5cc4df517d5c4f16db2b4d77baec1a32f",  # 8192
    "f9226160c8f927bfdcc418cdf203493146008eaefb7d02194d5e548189005108",  # 16384
    "2c1a964bb90b59ebfe0f6da29ad65ae3e417724a8f7c11745a40cac1e5e74011",  # 32768
    "fee378cef16404b199ede0b13e11b624ff9d784fbbed878d83297e795e024f02",  # 65536
    "8e9e2403fa884cf6237f60df25f83ee40dca9ed879eb6f6352d15084f5ad0d3f",  # 131072
    "752d9693fa167524395476e317a98580f00947afb7a30540d625a9291cc12a07",  # 262144
    "7022f60f7ef6adfa17117a52619e30cea82c68075adf1c667786ec506eef2d19",  # 524288
    "d99887b973573a96e11393645236c17b1f4c7034d723c7a99f709bb4da61162b",  # 1048576
    "d0b530dbb0b4f25c5d2f2a28dfee808b53412a02931f18c499f5a254086b1326",  # 2097152
    "84c0421ba0685a01bf795a2344064fe424bd52a9d24377b394ff4c4b4568e811",  # 4194304
    "65f29e5d98d246c38b388cfc06db1f6b021303c5a289000bdce832a9c3ec421c",  # 8388608
    "a2247508285850965b7e334b3127b0c042b1d046dc54402137627cd8799ce13a",  # 16777216
    "dafdab6da9364453c26d33726b9fefe343be8f81649ec009aad3faff50617508",  # 33554432
    "d941d5e0d6314a995c33ffbd4fbe69118d73d4e5fd2cd31f0f7c86ebdd14e706",  # 67108864
    "514c435c3d04d349a5365fbd59ffc713629111785991c1a3c53af22079741a2f",  # 134217728
    "ad06853969d37d34ff08e09f56930a4ad19a89def60cbfee7e1d3381c1e71c37",  # 268435456
    "39560e7b13a93b07a243fd2720ffa7cb3e1d2e505ab3629e79f46313512cda06",  # 536870912
    "ccc3c012f5b05e811a2bbfdd0f6833b84275b47bf229c0052a82484f3c1a5b3d",  # 1073741824
    "7df29b69773199e8f2b40b77919d048509eed768e2c7297b1f1437034fc3c62c",  # 2147483648
    "66ce05a3667552cf45c02bcc4e8392919bdeac35de2ff56271848e9f7b675107",  # 4294967296
    "d8610218425ab5e95b1ca6239d29a2e420d706a96f373e2f9c9a91d759d19b01",  # 8589934592
    "6d364b1ef846441a5a4a68862314acc0a46f016717e53443e839eedf83c2853c",  # 17179869184
    "077e5fde35c50a9303a55009e3498a4ebedff39c42b710b730d8ec7ac7afa63e",  # 34359738368
    "e64005a6bfe3777953b8ad6ef93f0fca1049b2041654f2a411f7702799cece02",  # 68719476736
    "259d3d6b1f4d876d1185e1123af6f5501af0f67cf15b5216255b7b178d12051d",  # 137438953472
    "3f9a4d411da4ef1b36f35ff0a195ae392ab23fee7967b7c41b03d1613fc29239",  # 274877906944
    "fe4ef328c61aa39cfdb2484eaa32a151b1fe3dfd1f96dd8c9711fd86d6c58113",  # 549755813888
    "f55d68900e2d8381eccb8164cb9976f24b2de0dd61a31b97ce6eb23850d5e819",  # 1099511627776
    "aaaa8c4cb40aacee1e02dc65424b2a6c8e99f803b72f7929c4101d7fae6bff32",  # 2199023255552
]

# FRC-0069 "Test Cases": filecoin-project/FIPs FRCs/frc-0069.md
# at commit 0b74ac73dc4c2c17ad07094b6a7ce59ddaeb5e8e.
FRC69_ZERO_32G = "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq"
FRC69_ZERO_64G = "baga6ea4seaqomqafu276g53zko4k23xzh4h4uecjwicbmvhsuqi7o4bhthhm4aq"
FRC69_0123 = b"".join(bytes([i]) * 127 for i in range(4))  # 127 0s, 127 1s, 127 2s, 127 3s
FRC69_0123_CID = "baga6ea4seaqes3nobte6ezpp4wqan2age2s5yxcatzotcvobhgcmv5wi2xh5mbi"
FRC69_0123_PADDED_CID = "baga6ea4seaqn42av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa"

# Payload, padded piece size, CommP: filecoin-project/go-fil-commp-hashhash testdata/0xCC.txt
# (payloads of repeated 0xCC bytes, CommPs by Lotus's ClientCalcCommP, see testdata/gen.sh)
# at commit 4dd194bf1660ce2a05f07ae76cf81e4eaeae109b.
HASHHASH_0XCC = [
    (96, 128, "baga6ea4seaqhwcjhi4krhl3ht6dewnwevkpxbepxy7p7onwgz65t52typbsysby"),
    (126, 128, "baga6ea4seaqapbh46gdnszvb7fcinevsy5bzg3b4higkh7groptswf6zas6jamy"),
    (127, 128, "baga6ea4seaqmfldjtozgne6adk7eve2vdxte7vzlivae7nzsbrawobo546zkijq"),
    (192, 256, "baga6ea4seaqkx7m2s6r4zahtlbwrs5ryvemkclwfp7nijopdd5swpdnxzjf7wkq"),
    (253, 256, "baga6ea4seaql6ldbyafhiecr36xba5tufreyo4km2ts3lfknhl2zogp3aztxijy"),
    (254, 256, "baga6ea4seaqkixbzz75uys2pcjbrbdilgjhmum72qm4xphrwav2iyel5oat4aka"),
    (255, 512, "baga6ea4seaqg7celu5y2iwbi2ra5koygvotxtzr5lj6vzvxi6gfub6mpa6niwpi"),
    (256, 512, "baga6ea4seaqi7c3dnwkqysqh4lpkz5jaxz2d2f5bvo3ttu2hnfmdewhcoji56na"),
    (384, 512, "baga6ea4seaqhexlmnzbarsbdbdahs7e36dkq5vkdwsrttehoakrif5wiqme36lq"),
    (507, 512, "baga6ea4seaqenvh5mcy5cjqwsbubbpczprkk2onwvfjd2743zkqh6ofuzkatwey"),
    (508, 512, "baga6ea4seaqb6ckbupixkhwp7thgb52f4en222boppajkqk7gaomkpof3lh4cei"),
    (509, 1024, "baga6ea4seaqdzbeaexq6gpbqh2tlnbz5mm5neap2kejsketkogzd6x2dx7dzkii"),
    (512, 1024, "baga6ea4seaqojaa522sjqms2wipasjbxnjgytunsgp52tgrfcofj73f7q7ou6hy"),
    (768, 1024, "baga6ea4seaqb6xvxaybzp6vslujjiwvgt23ckrwt7y53eddy5qmc6csnc37lwpi"),
    (1015, 1024, "baga6ea4seaqmgiyjcutwgo6glks2mogixs6mb4sbehto6uzienucfx23wbtkica"),
    (1016, 1024, "baga6ea4seaqjxgfdkdu37aryhg7bqqiwizj5f6ugasftgeocabwnj4cxkgisaoq"),
    (1017, 2048, "baga6ea4seaqf3n5ob5qonkwnxfcbjzftsagbnrjfzualqvzhcylz46b7sgz6wmi"),
    (1024, 2048, "baga6ea4seaqdlpnhgsndrgjeu4p46hahlsr4lybg6du4d56ooppdpxhcofxeuoi"),
]
# The same for zero payloads: testdata/zero.txt of the same repository and commit.
HASHHASH_ZERO = [
    (96, 128, "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"),
    (126, 128, "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"),
    (127, 128, "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"),
    (192, 256, "baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy"),
    (253, 256, "baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy"),
    (254, 256, "baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy"),
    (255, 512, "baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq"),
    (256, 512, "baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq"),
    (384, 512, "baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq"),
    (507, 512, "baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq"),
    (508, 512, "baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq"),
    (509, 1024, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
    (512, 1024, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
    (768, 1024, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
    (1015, 1024, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
    (1016, 1024, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
    (1017, 2048, "baga6ea4seaqpy7usqklokfx2vxuynmupslkeutzexe2uqurdg5vhtebhxqmpqmy"),
    (1024, 2048, "baga6ea4seaqpy7usqklokfx2vxuynmupslkeutzexe2uqurdg5vhtebhxqmpqmy"),
]

# filecoin-project/go-commp-utils commp_test.go TestZeroPadding
# at commit 3493ca35aca45adfa69a524a1a9422fff8060f21 ("value calculated using separate tooling").
CAT = b"i am the biggest cat, what do you think about that"
CAT_CID = "baga6ea4seaqozp3abki6vgdf7ztbipcycmxfyt2o64cpuyvdkczsjxsg7bqmioi"

# A live 32 GiB sector (f01392893, sector 139074) from its deals' pieces:
# filecoin-project/go-commp-utils commd_test.go TestGenerateUnsealedCID
# at commit 3493ca35aca45adfa69a524a1a9422fff8060f21.
SECTOR_139074_COMMD = "baga6ea4seaqiw3gbmstmexb7sqwkc5r23o3i7zcyx5kr76pfobpykes3af62kca"
SECTOR_139074_PIECES = [
    ("baga6ea4seaqknzm22isnhsxt2s4dnw45kfywmhenngqq3nc7jvecakoca6ksyhy", 256 << 20),
    ("baga6ea4seaqnq6o5wuewdpviyoafno4rdpqnokz6ghvg2iyeyfbqxgcwdlj2egi", 1024 << 20),
    ("baga6ea4seaqpixk4ifbkzato3huzycj6ty6gllqwanhdpsvxikawyl5bg2h44mq", 512 << 20),
    ("baga6ea4seaqaxwe5dy6nt3ko5tngtmzvpqxqikw5mdwfjqgaxfwtzenc6bgzajq", 512 << 20),
    ("baga6ea4seaqpy33nbesa4d6ot2ygeuy43y4t7amc4izt52mlotqenwcmn2kyaai", 1024 << 20),
    ("baga6ea4seaqphvv4x2s2v7ykgc3ugs2kkltbdeg7icxstklkrgqvv72m2v3i2aa", 256 << 20),
    ("baga6ea4seaqf5u55znk6jwhdsrhe37emzhmehiyvjxpsww274f6fiy3h4yctady", 512 << 20),
    ("baga6ea4seaqa3qbabsbmvk5er6rhsjzt74beplzgulthamm22jue4zgqcuszofi", 1024 << 20),
    ("baga6ea4seaqiekvf623muj6jpxg6vsqaikyw3r4ob5u7363z7zcaixqvfqsc2ji", 256 << 20),
    ("baga6ea4seaqhsewv65z2d4m5o4vo65vl5o6z4bcegdvgnusvlt7rao44gro36pi", 512 << 20),
]

# A CommR CID (fil-commitment-sealed, poseidon) used throughout filecoin-project/lotus itests.
SEALED_CID = "bagboea4b5abcatlxechwbp7kjpjguna6r6q7ejrhe6mdp3lf34pmswn27pkkiekz"
DAG_PB_CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


def test_zero_comms_match_the_go_commp_utils_table() -> None:
    for i, expected in enumerate(ZERO_COMMS):
        assert zero_comm(128 << i).hex() == expected, 128 << i
    assert zero_piece_cid(32 * GiB) == FRC69_ZERO_32G
    assert zero_piece_cid(64 * GiB) == FRC69_ZERO_64G
    for payload, padded, cid in HASHHASH_ZERO:
        assert zero_piece_cid(padded) == cid
        assert piece_cid(bytes(payload)) == cid


def test_subtree_root_is_the_unit_workers_hash() -> None:
    # Worker processes hash aligned subtrees with it (a larger one than LEAF_BLOCK recurses).
    for i in (0, 3, 12):
        assert commp.subtree_root(bytes(127 << i)).hex() == ZERO_COMMS[i]
    assert commp.fit_unpadded(128) == 254 and commp.default_workers() >= 1


def test_commp_of_published_payloads() -> None:
    assert piece_cid(CAT + bytes(127 - len(CAT))) == CAT_CID
    assert piece_cid(CAT) == CAT_CID  # zero-filled to 127 bytes by default
    assert piece_cid(FRC69_0123) == FRC69_0123_CID
    # FRC-0069: the same data followed by 127*4 zeros, or by 4 or 5 zeros, is one 1 KiB piece.
    for tail in (127 * 4, 4, 5):
        assert piece_cid(FRC69_0123 + bytes(tail)) == FRC69_0123_PADDED_CID
    for payload, padded, cid in HASHHASH_0XCC:
        assert padded_size(commp.fit_unpadded(payload)) == padded
        assert piece_cid(b"\xcc" * payload) == cid, payload


def test_commd_of_a_live_32gib_sector() -> None:
    assert unsealed_cid(32 * GiB, SECTOR_139074_PIECES) == SECTOR_139074_COMMD
    # The Go test fills the sector by hand with an 8 GiB and a 16 GiB zero piece: same CommD.
    filled = [*SECTOR_139074_PIECES, (zero_piece_cid(8 * GiB), 8 * GiB)]
    filled.append((zero_piece_cid(16 * GiB), 16 * GiB))
    assert unsealed_cid(32 * GiB, filled) == SECTOR_139074_COMMD


@pytest.mark.parametrize(
    ("pieces", "layout"),
    [
        # filecoin-project/lotus chain/proofs/proofs_test.go TestGenerateUnsealedCID
        # (commit 9e23542818686931251eb72d4fb4dc473abc34d7): a 2 KiB sector of pieces of
        # byte b filling 1/den of it, and the sector layout Lotus expects (0 = zero filler).
        ([], [(0, 1)]),
        ([(1, 1)], [(1, 1)]),
        ([(1, 2)], [(1, 2), (0, 2)]),
        ([(1, 4)], [(1, 4), (0, 4), (0, 2)]),
        ([(1, 2), (2, 4)], [(1, 2), (2, 4), (0, 4)]),
        ([(1, 4), (2, 2)], [(1, 4), (0, 4), (2, 2)]),
        ([(1, 8), (2, 4)], [(1, 8), (0, 8), (2, 4), (0, 2)]),
        ([(1, 4), (2, 8)], [(1, 4), (2, 8), (0, 8), (0, 2)]),
        (
            [(1, 16), (2, 8), (3, 16), (4, 4), (5, 16)],
            [(1, 16), (0, 16), (2, 8), (3, 16), (0, 16), (0, 8), (4, 4), (5, 16), (0, 16), (0, 8)],
        ),
    ],
)
def test_commd_aligns_and_fills_like_lotus(
    pieces: list[tuple[int, int]], layout: list[tuple[int, int]]
) -> None:
    ups = unpadded_size(2048)

    def barr(b: int, den: int) -> bytes:
        return bytes([b]) * (ups // den)

    infos = [(piece_cid(barr(b, den)), padded_size(ups // den)) for b, den in pieces]
    expected = piece_cid(b"".join(barr(b, den) for b, den in layout))
    assert unsealed_cid(2048, infos) == expected


# --------------------------------------------------------------------------- references


def ref_fr32(data: bytes) -> bytes:
    """Bit by bit: little-endian bits, two zero bits after every 254."""
    bits = [(byte >> i) & 1 for byte in data for i in range(8)]
    out: list[int] = []
    for i in range(0, len(bits), 254):
        out += [*bits[i : i + 254], 0, 0]
    return bytes(sum(out[j + i] << i for i in range(8)) for j in range(0, len(out), 8))


def ref_commp(data: bytes, unpadded: int) -> bytes:
    """The textbook tree: pad everything, hash level by level, one node at a time."""
    level = ref_fr32(data + bytes(unpadded - len(data)))
    while len(level) > 32:
        nodes = []
        for i in range(0, len(level), 64):
            d = bytearray(hashlib.sha256(level[i : i + 64]).digest())
            d[31] &= 0x3F
            nodes.append(bytes(d))
        level = b"".join(nodes)
    return level


@pytest.fixture(params=["numpy", "pure"])
def fr32_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with numpy's fr32 (when installed) and with the pure-Python one."""
    if request.param == "numpy" and commp.numpy_module() is None:
        pytest.skip("numpy is not installed")
    monkeypatch.setattr(commp, "USE_NUMPY", request.param == "numpy")
    return str(request.param)


def test_fr32_matches_the_bit_level_definition(fr32_path: str) -> None:
    rng = random.Random(7)
    for blocks in (1, 2, 3, 64, 65, 200):
        data = rng.randbytes(127 * blocks)
        assert fr32_pad(data) == ref_fr32(data), blocks
    # The two inserted bits are zero, so all-ones data shows them at bits 254, 255 of each 32.
    padded = fr32_pad(b"\xff" * 127)
    assert padded == (b"\xff" * 31 + b"\x3f") * 4


def test_commp_matches_the_textbook_tree(fr32_path: str) -> None:
    rng = random.Random(11)
    for length in (0, 1, 126, 127, 128, 1000, 4064, 4065, 127 * 600 + 3):
        data = rng.randbytes(length)
        unpadded = commp.fit_unpadded(length)
        expected = commitment_to_cid(ref_commp(data, unpadded))
        assert piece_cid(data) == expected, length
        # Small chunks: many subtrees, a partial tail, zero subtrees to fill.
        with CommPHasher(chunk=127 * 4) as h:
            h.update(data)
            assert h.cid() == expected, length


# --------------------------------------------------------------------------- streaming


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=127 * 40), cuts=st.lists(st.integers(0, 127 * 40), max_size=8))
def test_fr32_stream_equals_one_shot(data: bytes, cuts: list[int]) -> None:
    data = data[: len(data) - len(data) % 127]
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert b"".join(fr32_pad_stream(chunks)) == fr32_pad(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=127 * 70),
    cuts=st.lists(st.integers(0, 127 * 70), max_size=8),
    chunk_log=st.integers(0, 6),
    extra_levels=st.integers(0, 3),
)
def test_commp_stream_equals_one_shot(
    data: bytes, cuts: list[int], chunk_log: int, extra_levels: int
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    size = commp.fit_unpadded(len(data)) << extra_levels
    with CommPHasher(chunk=127 << chunk_log) as h:
        for a, b in itertools.pairwise(bounds):
            h.update(data[a:b])
        assert h.length == len(data)
        streamed = h.cid(size)
    assert streamed == piece_cid(data, size)
    if extra_levels == 0:
        assert streamed == piece_cid(data)


def test_fr32_stream_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 127 bytes, got 128"):
        fr32_pad(bytes(128))
    with pytest.raises(ValueError, match="not a multiple of 127 bytes"):
        list(fr32_pad_stream([bytes(100), bytes(100)]))
    padder = Fr32Padder()
    assert padder.update(bytes(100)) == b""
    assert padder.update(bytes(27)) == bytes(128)
    padder.finish()


def test_hasher_finishes_once() -> None:
    h = CommPHasher()
    h.update(b"abc")
    h.digest()
    with pytest.raises(ValueError, match="already finished"):
        h.update(b"more")
    with pytest.raises(ValueError, match="already finished"):
        h.digest()


# --------------------------------------------------------------------------- sources and sizes


def test_bytes_paths_and_files_agree(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(300_000)
    path = tmp_path / "piece.bin"
    path.write_bytes(data)
    expected = piece_cid(data)
    assert piece_cid(bytearray(data)) == expected
    assert piece_cid(memoryview(data)) == expected
    assert piece_cid(str(path)) == expected
    assert piece_cid(path) == expected
    with open(path, "rb") as f:
        assert piece_cid(f) == expected
    with open(path, "rb", buffering=0) as raw:
        assert piece_cid(raw) == expected
    assert piece_cid(io.BytesIO(data)) == expected
    # A declared size zero-fills to it, whatever the source.
    size = 127 << 13
    padded = commitment_to_cid(ref_commp(data[:1000], 127 * 8))
    assert piece_cid(data[:1000], 127 * 8) == padded
    assert piece_cid(path, size) == piece_cid(data + bytes(size - len(data)))
    with open(path, "rb") as f:
        assert piece_cid(f, size) == piece_cid(path, size)


def test_a_text_file_or_other_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello")
    with open(path) as f, pytest.raises(TypeError, match="binary mode"):
        piece_cid(f)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes, a path or a binary file"):
        piece_cid(12345)  # type: ignore[arg-type]


def test_piece_sizes() -> None:
    for unpadded, padded in [
        (127, 128),
        (254, 256),
        (2032, 2048),
        (34359738368 // 128 * 127, 32 * GiB),
    ]:
        assert padded_size(unpadded) == padded
        assert unpadded_size(padded) == unpadded
    for bad, why in [
        (0, "minimum is 127"),
        (126, "minimum is 127"),
        (128, "multiple of 127"),
        (127 * 3, "not a power of two"),
        (-127, "minimum"),
    ]:
        with pytest.raises(ValueError, match=f"unpadded piece size {bad}: .*{why}"):
            padded_size(bad)
    for bad, why in [
        (0, "minimum is 128"),
        (64, "minimum is 128"),
        (127, "minimum is 128"),
        (192, "not a power of two"),
        (2**40 + 2**39, "not a power of two"),
    ]:
        with pytest.raises(ValueError, match=f"padded piece size {bad}: {why}"):
            unpadded_size(bad)
    with pytest.raises(TypeError):
        padded_size(127.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        unpadded_size(True)
    with pytest.raises(ValueError, match="padded piece size 1000"):
        zero_piece_cid(1000)
    assert len(zero_comm(1 << 63)) == 32
    with pytest.raises(ValueError, match="more than 2"):
        zero_comm(1 << 64)


def test_declared_size_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unpadded piece size 128: not a multiple of 127"):
        piece_cid(b"x", 128)
    with pytest.raises(ValueError, match=r"piece data is 300 bytes, more than .* size 254"):
        piece_cid(bytes(300), 254)
    with pytest.raises(ValueError, match="piece data is 300 bytes"):
        piece_cid(io.BytesIO(bytes(300)), 254)  # size unknown up front: found at the end
    path = tmp_path / "p"
    path.write_bytes(bytes(300))
    with pytest.raises(ValueError, match="piece data is 300 bytes"):
        piece_cid(path, 254)


# --------------------------------------------------------------------------- CIDs


def test_cid_round_trips_and_codecs() -> None:
    comm = parse_piece_cid(CAT_CID)
    assert len(comm) == 32
    assert commitment_to_cid(comm) == CAT_CID
    assert parse_piece_cid(CAT_CID.upper()) == comm  # multibase 'B': base32 upper-case
    sealed = parse_sealed_cid(SEALED_CID)
    assert commitment_to_cid(sealed, sealed=True) == SEALED_CID
    assert commitment_to_cid(bytes(32), sealed=True).startswith("bagboea4b5abc")
    with pytest.raises(ValueError, match="a commitment is 32 bytes, got 31"):
        commitment_to_cid(bytes(31))


@pytest.mark.parametrize(
    ("cid", "message"),
    [
        (SEALED_CID, r"codec 0xf102 \(fil-commitment-sealed\), expected 0xf101"),
        (DAG_PB_CID, r"codec 0x70 \(dag-pb\), expected 0xf101"),
        ("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "CIDv0"),
        ("zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA", "multibase 'b'"),
        ("b!!!!", "bad base32"),
        (CAT_CID[:-8], "digest is 27 bytes"),
        (CAT_CID + "aaaaaaaa", "digest is 37 bytes"),
        ("", "multibase"),
    ],
)
def test_wrong_cids_are_refused(cid: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_piece_cid(cid)


def test_sealed_parser_refuses_piece_cids() -> None:
    with pytest.raises(ValueError, match=r"codec 0xf101 \(fil-commitment-unsealed\)"):
        parse_sealed_cid(CAT_CID)


def test_commd_errors() -> None:
    p2k = zero_piece_cid(2048)
    with pytest.raises(ValueError, match="padded piece size 2049"):
        unsealed_cid(2049, [])
    with pytest.raises(ValueError, match=r"piece 1 .*padded piece size 100"):
        unsealed_cid(2048, [(p2k, 1024), (p2k, 100)])
    with pytest.raises(ValueError, match=r"piece 0 .*larger than the sector"):
        unsealed_cid(2048, [(p2k, 4096)])
    with pytest.raises(ValueError, match=r"piece 0: .*codec 0xf102"):
        unsealed_cid(2048, [(SEALED_CID, 1024)])
    # 512 + (512 of alignment padding) + 1024 + 128 > 2048.
    with pytest.raises(ValueError, match=r"pieces need 2176 bytes .* sector size 2048"):
        unsealed_cid(2048, [(p2k, 512), (p2k, 1024), (p2k, 128)])
    assert unsealed_cid(2048, []) == zero_piece_cid(2048)
    assert unsealed_cid(2048, [(p2k, 2048)]) == p2k


# --------------------------------------------------------------------------- memory, workers


def test_a_file_is_hashed_in_constant_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    block = random.Random(5).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(8):
            f.write(block[i:] + block[:i])
    piece_cid(bytes(127 * 64))  # first-use allocations (caches, numpy) out of the measure
    tracemalloc.start()
    try:
        cid = piece_cid(path, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB // 4, f"peak {peak} bytes for an 8 MiB file"
    assert cid.startswith("baga6ea4seaq")


def test_worker_processes_give_the_same_commitment(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(127 * (1 << 13) * 5 + 1000)  # 5 chunks of 1 MiB, a tail
    path = tmp_path / "p.bin"
    path.write_bytes(data)
    expected = piece_cid(data, workers=1)
    chunk = 127 << 13
    # Data through shared memory, and file ranges read by the workers themselves.
    with CommPHasher(workers=2, chunk=chunk) as h:
        for i in range(0, len(data), 300_000):
            h.update(data[i : i + 300_000])
        assert h.cid() == expected
    with CommPHasher(workers=2, chunk=chunk) as h:
        h._update_from_file(str(path), len(data))
        assert h.cid() == expected
    assert piece_cid(path, workers=2) == expected


def test_a_failing_worker_is_an_error_not_a_wrong_answer(tmp_path: Path) -> None:
    from sectorfsm.sealing.commp_workers import Workers

    pool = Workers(1, 127 * 8)
    try:
        pool.submit_file(str(tmp_path / "missing"), 0)
        with pytest.raises(RuntimeError, match="worker process exited with code 1"):
            pool.result()
    finally:
        pool.close()
