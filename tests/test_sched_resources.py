"""Resource table, Threads(), per-worker overrides and byte formatting.

Lotus: `storage/sealer/storiface/resources.go@b835fab70` and
`storage/sealer/sched_resources.go@b835fab70`.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from sectorfsm.sched.filetypes import SECTOR_SIZES
from sectorfsm.sched.resources import (
    RESOURCE_TABLE,
    ZERO,
    ResourceConfigError,
    ResourceOverrides,
    Resources,
    describe_bytes,
    parse_overrides,
    resource_spec,
)
from sectorfsm.sched.tasks import TaskType

T = TaskType
G32 = 32 << 30
G64 = 64 << 30

# Every row of Lotus's default `ResourceTable` (storiface/resources.go), as literal bytes:
# (short, size, min_memory, max_memory, base_min_memory, max_parallelism, max_parallelism_gpu,
#  gpu_utilization). MaxConcurrent is 0 in every default entry.
EXPECTED = [
    ("AP", "2K", 2048, 2048, 2048, 1, 0, 0.0),
    ("AP", "8M", 8388608, 8388608, 8388608, 1, 0, 0.0),
    ("AP", "512M", 1073741824, 1073741824, 1073741824, 1, 0, 0.0),
    ("AP", "32G", 4294967296, 4294967296, 1073741824, 1, 0, 0.0),
    ("AP", "64G", 8589934592, 8589934592, 1073741824, 1, 0, 0.0),
    ("PC1", "2K", 2048, 2048, 2048, 1, 0, 0.0),
    ("PC1", "8M", 8388608, 8388608, 8388608, 1, 0, 0.0),
    ("PC1", "512M", 805306368, 1073741824, 1048576, 1, 0, 0.0),
    ("PC1", "32G", 60129542144, 68719476736, 10485760, 1, 0, 0.0),
    ("PC1", "64G", 120259084288, 137438953472, 10485760, 1, 0, 0.0),
    ("PC2", "2K", 2048, 2048, 2048, -1, 0, 0.0),
    ("PC2", "8M", 8388608, 8388608, 8388608, -1, 0, 0.0),
    ("PC2", "512M", 1073741824, 1610612736, 1073741824, -1, 0, 0.0),
    ("PC2", "32G", 16106127360, 16106127360, 1073741824, -1, 6, 1.0),
    ("PC2", "64G", 32212254720, 32212254720, 1073741824, -1, 6, 1.0),
    ("C1", "2K", 2048, 2048, 2048, 0, 0, 0.0),
    ("C1", "8M", 8388608, 8388608, 8388608, 0, 0, 0.0),
    ("C1", "512M", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("C1", "32G", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("C1", "64G", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("C2", "2K", 2048, 2048, 2048, 1, 0, 1.0),
    ("C2", "8M", 8388608, 8388608, 8388608, 1, 0, 1.0),
    ("C2", "512M", 1073741824, 1610612736, 10737418240, 1, 0, 1.0),
    ("C2", "32G", 32212254720, 161061273600, 34359738368, -1, 6, 1.0),
    ("C2", "64G", 64424509440, 204010946560, 68719476736, -1, 6, 1.0),
    ("GET", "2K", 1048576, 1048576, 0, 0, 0, 0.0),
    ("GET", "8M", 1048576, 1048576, 0, 0, 0, 0.0),
    ("GET", "512M", 1048576, 1048576, 0, 0, 0, 0.0),
    ("GET", "32G", 1048576, 1048576, 0, 0, 0, 0.0),
    ("GET", "64G", 1048576, 1048576, 0, 0, 0, 0.0),
    ("RU", "2K", 2048, 2048, 2048, 1, 0, 1.0),
    ("RU", "8M", 8388608, 8388608, 8388608, 1, 0, 1.0),
    ("RU", "512M", 1073741824, 1073741824, 1073741824, 1, 0, 1.0),
    ("RU", "32G", 4294967296, 4294967296, 1073741824, 1, 6, 1.0),
    ("RU", "64G", 8589934592, 8589934592, 1073741824, 1, 6, 1.0),
    ("PR1", "2K", 2048, 2048, 2048, 0, 0, 0.0),
    ("PR1", "8M", 8388608, 8388608, 8388608, 0, 0, 0.0),
    ("PR1", "512M", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("PR1", "32G", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("PR1", "64G", 1073741824, 1073741824, 1073741824, 0, 0, 0.0),
    ("PR2", "2K", 2048, 2048, 2048, 1, 0, 1.0),
    ("PR2", "8M", 8388608, 8388608, 8388608, 1, 0, 1.0),
    ("PR2", "512M", 1073741824, 1610612736, 10737418240, 1, 0, 1.0),
    ("PR2", "32G", 32212254720, 161061273600, 34359738368, -1, 6, 1.0),
    ("PR2", "64G", 64424509440, 204010946560, 68719476736, -1, 6, 1.0),
    ("WDP", "2K", 2048, 2048, 2048, 1, 0, 1.0),
    ("WDP", "8M", 8388608, 8388608, 8388608, 1, 0, 1.0),
    ("WDP", "512M", 1073741824, 1610612736, 10737418240, 1, 0, 1.0),
    ("WDP", "32G", 32212254720, 103079215104, 34359738368, -1, 6, 1.0),
    ("WDP", "64G", 64424509440, 128849018880, 68719476736, -1, 6, 1.0),
    ("WNP", "2K", 2048, 2048, 2048, 1, 0, 1.0),
    ("WNP", "8M", 8388608, 8388608, 8388608, 1, 0, 1.0),
    ("WNP", "512M", 2048, 2048, 10737418240, 1, 0, 1.0),
    ("WNP", "32G", 1073741824, 1073741824, 34359738368, -1, 6, 1.0),
    ("WNP", "64G", 1073741824, 1073741824, 68719476736, -1, 6, 1.0),
]
SHORT = {t.short: t for t in TaskType}
BASE_TYPES = ["AP", "PC1", "PC2", "C1", "C2", "GET", "RU", "PR1", "PR2", "WDP", "WNP"]


def test_expectations_cover_every_row_once() -> None:
    keys = [(short, size) for short, size, *_ in EXPECTED]
    assert len(keys) == len(set(keys)) == 55
    assert {k for k, _ in keys} == set(BASE_TYPES)


@pytest.mark.parametrize("row", EXPECTED, ids=lambda r: f"{r[0]}-{r[1]}")
def test_table_row_matches_reference(row: tuple[str, str, int, int, int, int, int, float]) -> None:
    short, size, min_mem, max_mem, base, mp, mpg, gpu = row
    assert RESOURCE_TABLE[SHORT[short]][SECTOR_SIZES[size]] == Resources(
        min_memory=min_mem,
        max_memory=max_mem,
        gpu_utilization=gpu,
        max_parallelism=mp,
        max_parallelism_gpu=mpg,
        base_min_memory=base,
        max_concurrent=0,
    )


def test_table_has_every_base_type_and_size_and_nothing_else() -> None:
    aliases = {T.UNSEAL, T.REGEN_SECTOR_KEY, T.READ_UNSEALED, T.DATA_CID}
    assert set(RESOURCE_TABLE) == {SHORT[s] for s in BASE_TYPES} | aliases
    for task, sizes in RESOURCE_TABLE.items():
        assert set(sizes) == set(SECTOR_SIZES.values()), task.short


@pytest.mark.parametrize(
    ("alias", "source"),
    [(T.UNSEAL, T.PRE_COMMIT1), (T.REGEN_SECTOR_KEY, T.REPLICA_UPDATE), (T.READ_UNSEALED, T.FETCH)],
)
def test_aliases_copy_their_source(alias: TaskType, source: TaskType) -> None:
    assert dict(RESOURCE_TABLE[alias]) == dict(RESOURCE_TABLE[source])


def test_data_cid_is_addpiece_32g_for_every_size() -> None:
    ap32 = Resources(4 << 30, 4 << 30, 0.0, 1, 0, 1 << 30)
    assert RESOURCE_TABLE[T.ADD_PIECE][G32] == ap32
    for size in SECTOR_SIZES.values():
        assert resource_spec(T.DATA_CID, size) == ap32


@pytest.mark.parametrize(
    "task", [T.FINALIZE, T.FINALIZE_UNSEALED, T.FINALIZE_REPLICA_UPDATE, T.DOWNLOAD_SECTOR]
)
def test_types_without_entry_need_nothing(task: TaskType) -> None:
    assert task not in RESOURCE_TABLE
    for size in SECTOR_SIZES.values():
        assert resource_spec(task, size) is ZERO
    assert Resources(0, 0, 0.0, 0, 0, 0, 0) == ZERO
    assert ZERO.threads(64, 2) == 0


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        RESOURCE_TABLE[T.FINALIZE] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        RESOURCE_TABLE[T.ADD_PIECE][G32] = ZERO  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RESOURCE_TABLE[T.ADD_PIECE][G32].max_concurrent = 3  # type: ignore[misc]


def test_resource_spec_reads_the_table() -> None:
    assert resource_spec(T.PRE_COMMIT1, G32).min_memory == 60129542144
    assert resource_spec(T.COMMIT2, G64).max_memory == 204010946560


@pytest.mark.parametrize("size", [0, 16 << 30, G32 + 1, -1])
def test_resource_spec_rejects_unknown_size(size: int) -> None:
    with pytest.raises(ValueError, match=rf"unknown sector size {size}\b"):
        resource_spec(T.PRE_COMMIT1, size)
    with pytest.raises(ValueError, match=rf"unknown sector size {size}\b"):
        resource_spec(T.FINALIZE, size)


# --- Threads() ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wcpus", "threads"), [(12, 11), (16, 14), (24, 22), (32, 29), (64, 58), (128, 117)]
)
def test_threads_comment_table(wcpus: int, threads: int) -> None:
    # PC2 32G on a worker without GPUs: MaxParallelism -1 = 92% of the cores, rounded down.
    assert resource_spec(T.PRE_COMMIT2, G32).threads(wcpus, 0) == threads


def test_threads_small_workers_get_all_their_cores() -> None:
    pc2 = resource_spec(T.PRE_COMMIT2, G32)
    assert pc2.threads(1, 0) == 1  # 92 // 100 == 0 -> wcpus
    assert pc2.threads(2, 0) == 1
    assert pc2.threads(0, 0) == 0


def test_threads_gpu_branch() -> None:
    for task in (T.PRE_COMMIT2, T.COMMIT2, T.PROVE_REPLICA_UPDATE2, T.GENERATE_WINDOW_POST):
        assert resource_spec(task, G32).threads(64, 1) == 6, task.short
        assert resource_spec(task, G64).threads(64, 4) == 6, task.short
        assert resource_spec(task, G32).threads(64, 0) == 58, task.short
    # RU: 1 thread without a GPU, 6 with one.
    assert resource_spec(T.REPLICA_UPDATE, G32).threads(64, 0) == 1
    assert resource_spec(T.REPLICA_UPDATE, G32).threads(64, 1) == 6
    # MaxParallelismGPU 0 inherits MaxParallelism even on a GPU worker.
    assert resource_spec(T.COMMIT2, 2 << 10).threads(64, 1) == 1
    assert resource_spec(T.PRE_COMMIT2, 2 << 10).threads(64, 1) == 58


def test_threads_gpu_branch_needs_gpu_utilization() -> None:
    cpu_only = Resources(0, 0, 0.0, 3, 9, 0)
    assert cpu_only.threads(64, 2) == 3
    gpu = dataclasses.replace(cpu_only, gpu_utilization=0.5)
    assert gpu.threads(64, 2) == 9
    assert gpu.threads(64, 0) == 3
    all_cores_on_gpu = dataclasses.replace(gpu, max_parallelism_gpu=-1)
    assert all_cores_on_gpu.threads(100, 1) == 92


@pytest.mark.parametrize("task", [T.COMMIT1, T.FETCH, T.PROVE_REPLICA_UPDATE1, T.READ_UNSEALED])
def test_zero_thread_tasks(task: TaskType) -> None:
    for size in SECTOR_SIZES.values():
        spec = resource_spec(task, size)
        assert spec.threads(64, 0) == 0
        assert spec.threads(64, 2) == 0


def test_only_documented_entries_use_gpus() -> None:
    gpu = {
        (t.short, s)
        for t, sizes in RESOURCE_TABLE.items()
        for s, r in sizes.items()
        if r.gpu_utilization
    }
    expected = {("PC2", G32), ("PC2", G64)}
    for short in ("C2", "RU", "GSK", "PR2", "WDP", "WNP"):
        expected |= {(short, s) for s in SECTOR_SIZES.values()}
    assert gpu == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_memory": -1},
        {"max_memory": -1},
        {"base_min_memory": -1},
        {"max_concurrent": -1},
        {"max_parallelism": -2},
        {"max_parallelism_gpu": -2},
        {"gpu_utilization": -0.5},
        {"gpu_utilization": float("nan")},
        {"gpu_utilization": float("inf")},
    ],
)
def test_resources_rejects_nonsense(kwargs: dict[str, float]) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Resources.{field}"):
        Resources(**{**dataclasses.asdict(ZERO), **kwargs})


# --- overrides -----------------------------------------------------------------------------


def test_no_overrides_is_empty() -> None:
    assert dict(parse_overrides({})) == {}
    assert dict(parse_overrides({}, env={})) == {}


def test_sized_override_touches_one_entry() -> None:
    o = parse_overrides({"PC1_32G_MAX_CONCURRENT": "4"})
    assert set(o) == {(T.PRE_COMMIT1, G32)}
    assert o[(T.PRE_COMMIT1, G32)] == dataclasses.replace(
        RESOURCE_TABLE[T.PRE_COMMIT1][G32], max_concurrent=4
    )
    assert resource_spec(T.PRE_COMMIT1, G32, o).max_concurrent == 4
    assert resource_spec(T.PRE_COMMIT1, G64, o).max_concurrent == 0
    # UNS shares PC1's numbers but has its own names.
    assert resource_spec(T.UNSEAL, G32, o).max_concurrent == 0


def test_unsized_override_touches_every_size() -> None:
    o = parse_overrides({"AP_MAX_CONCURRENT": 2})
    assert set(o) == {(T.ADD_PIECE, s) for s in SECTOR_SIZES.values()}
    for size in SECTOR_SIZES.values():
        assert resource_spec(T.ADD_PIECE, size, o) == dataclasses.replace(
            RESOURCE_TABLE[T.ADD_PIECE][size], max_concurrent=2
        )
    assert resource_spec(T.DATA_CID, G32, o).max_concurrent == 0


@pytest.mark.parametrize("sized_first", [True, False])
def test_sized_beats_unsized_whatever_the_order(sized_first: bool) -> None:
    items = [("C2_64G_GPU_UTILIZATION", "0.5"), ("C2_GPU_UTILIZATION", "2")]
    o = parse_overrides(dict(items if sized_first else items[::-1]))
    assert resource_spec(T.COMMIT2, G64, o).gpu_utilization == 0.5
    assert resource_spec(T.COMMIT2, G32, o).gpu_utilization == 2.0
    assert resource_spec(T.COMMIT2, 2 << 10, o).gpu_utilization == 2.0


def test_every_field_can_be_overridden() -> None:
    o = parse_overrides(
        {
            "PC2_32G_MIN_MEMORY": "1",
            "PC2_32G_MAX_MEMORY": "2",
            "PC2_32G_GPU_UTILIZATION": "0.25",
            "PC2_32G_MAX_PARALLELISM": "3",
            "PC2_32G_MAX_PARALLELISM_GPU": "12",
            "PC2_32G_BASE_MIN_MEMORY": "4",
            "PC2_32G_MAX_CONCURRENT": "5",
        }
    )
    assert o == {(T.PRE_COMMIT2, G32): Resources(1, 2, 0.25, 3, 12, 4, 5)}
    assert o[(T.PRE_COMMIT2, G32)].threads(64, 1) == 12


def test_values_may_be_go_style_text_or_toml_numbers() -> None:
    o = parse_overrides(
        {
            "PC2_MAX_PARALLELISM": "-1",
            "PC2_32G_MAX_PARALLELISM_GPU": "+12",
            "C2_GPU_UTILIZATION": 1,  # TOML integer for a float field
            "WDP_GPU_UTILIZATION": " 1e-1 ",
            "GET_32G_MAX_CONCURRENT": 1,
            "PC1_64G_MAX_MEMORY": str((1 << 64) - 1),
        }
    )
    assert o[(T.PRE_COMMIT2, G32)].max_parallelism_gpu == 12
    assert o[(T.PRE_COMMIT2, G64)].max_parallelism == -1
    assert o[(T.COMMIT2, G32)].gpu_utilization == 1.0
    assert o[(T.GENERATE_WINDOW_POST, G32)].gpu_utilization == pytest.approx(0.1)
    assert o[(T.FETCH, G32)].max_concurrent == 1
    assert o[(T.PRE_COMMIT1, G64)].max_memory == (1 << 64) - 1


def test_alias_and_sizeless_types_have_their_own_names() -> None:
    o = parse_overrides({"GSK_MAX_CONCURRENT": 1, "DC_32G_MAX_CONCURRENT": 3, "RD_MIN_MEMORY": 7})
    assert resource_spec(T.REGEN_SECTOR_KEY, G32, o).max_concurrent == 1
    assert resource_spec(T.REPLICA_UPDATE, G32, o).max_concurrent == 0
    # Lotus logs an error for a sized DC name but still applies it to that size only.
    assert resource_spec(T.DATA_CID, G32, o).max_concurrent == 3
    assert resource_spec(T.DATA_CID, G64, o).max_concurrent == 0
    assert resource_spec(T.READ_UNSEALED, G64, o).min_memory == 7
    assert resource_spec(T.FETCH, G64, o).min_memory == 1 << 20


def test_env_names_are_case_insensitive() -> None:
    assert parse_overrides({"pc1_32g_max_concurrent": 4}) == parse_overrides(
        {"PC1_32G_MAX_CONCURRENT": 4}
    )


def test_nested_form() -> None:
    o = parse_overrides(
        {
            "PC1": {"32G": {"max_concurrent": 4}, "max_parallelism": 2},
            "c2": {"64GiB": {"GPU_UTILIZATION": 0.5}, "Max_Concurrent": "1"},
            "GET": {str(G32): {"max_concurrent": 1}},
        }
    )
    flat = parse_overrides(
        {
            "PC1_32G_MAX_CONCURRENT": 4,
            "PC1_MAX_PARALLELISM": 2,
            "C2_64G_GPU_UTILIZATION": 0.5,
            "C2_MAX_CONCURRENT": 1,
            "GET_32G_MAX_CONCURRENT": 1,
        }
    )
    assert o == flat
    assert resource_spec(T.PRE_COMMIT1, G32, o).max_concurrent == 4
    assert resource_spec(T.PRE_COMMIT1, G64, o).max_concurrent == 0
    assert resource_spec(T.PRE_COMMIT1, G64, o).max_parallelism == 2
    assert resource_spec(T.COMMIT2, G64, o).gpu_utilization == 0.5
    assert resource_spec(T.COMMIT2, G32, o).gpu_utilization == 1.0


def test_nested_sized_beats_flat_unsized() -> None:
    o = parse_overrides({"PC1_MAX_CONCURRENT": 2, "PC1": {"32G": {"max_concurrent": 4}}})
    assert resource_spec(T.PRE_COMMIT1, G32, o).max_concurrent == 4
    assert resource_spec(T.PRE_COMMIT1, G64, o).max_concurrent == 2


def test_override_precedence_over_table() -> None:
    mine = Resources(1, 1, 0.0, 1, 0, 0, 1)
    overrides = {(T.PRE_COMMIT1, G32): mine}
    assert resource_spec(T.PRE_COMMIT1, G32, overrides) is mine
    assert resource_spec(T.PRE_COMMIT1, G64, overrides) == RESOURCE_TABLE[T.PRE_COMMIT1][G64]
    assert resource_spec(T.FINALIZE, G32, overrides) is ZERO


def test_overrides_are_read_only() -> None:
    o = parse_overrides({"AP_MAX_CONCURRENT": 2})
    with pytest.raises(TypeError):
        o[(T.ADD_PIECE, G32)] = ZERO  # type: ignore[index]


# --- multicore SDR --------------------------------------------------------------------------

SDR_ON = {"FIL_PROOFS_USE_MULTICORE_SDR": "1"}


def _parallelism(o: ResourceOverrides, task: TaskType, size: int) -> int:
    return resource_spec(task, size, o).max_parallelism


def test_sdr_default_producers() -> None:
    o = parse_overrides({}, env=SDR_ON)
    assert set(o) == {(t, s) for t in (T.PRE_COMMIT1, T.UNSEAL) for s in SECTOR_SIZES.values()}
    for key, res in o.items():
        assert res == dataclasses.replace(RESOURCE_TABLE[key[0]][key[1]], max_parallelism=4)


def test_sdr_explicit_producers() -> None:
    o = parse_overrides({}, env={**SDR_ON, "FIL_PROOFS_MULTICORE_SDR_PRODUCERS": "7"})
    assert _parallelism(o, T.PRE_COMMIT1, G32) == 8
    assert _parallelism(o, T.UNSEAL, 2 << 10) == 8
    assert _parallelism(o, T.PRE_COMMIT2, G32) == -1
    assert _parallelism(o, T.ADD_PIECE, G32) == 1


def test_sdr_only_where_no_value_was_given() -> None:
    o = parse_overrides(
        {"PC1_32G_MAX_PARALLELISM": "2", "UNS_MAX_PARALLELISM": 5, "PC1_MAX_CONCURRENT": 1},
        env=SDR_ON,
    )
    assert _parallelism(o, T.PRE_COMMIT1, G32) == 2
    assert _parallelism(o, T.PRE_COMMIT1, G64) == 4
    assert _parallelism(o, T.UNSEAL, G32) == 5
    assert _parallelism(o, T.UNSEAL, G64) == 5
    assert resource_spec(T.PRE_COMMIT1, G64, o).max_concurrent == 1


@pytest.mark.parametrize(
    "env",
    [
        None,
        {},
        {"FIL_PROOFS_USE_MULTICORE_SDR": "0"},
        {"FIL_PROOFS_USE_MULTICORE_SDR": "true"},  # Lotus compares with "1" exactly
        # Producers are only read with multicore SDR on, so a bad value is ignored (as Lotus).
        {"FIL_PROOFS_MULTICORE_SDR_PRODUCERS": "junk"},
    ],
)
def test_sdr_off_changes_nothing(env: dict[str, str] | None) -> None:
    assert dict(parse_overrides({}, env=env)) == {}
    assert _parallelism(parse_overrides({}, env=env), T.PRE_COMMIT1, G32) == 1


@pytest.mark.parametrize("producers", ["three", "-1", "2.5", ""])
def test_sdr_bad_producers(producers: str) -> None:
    key = "FIL_PROOFS_MULTICORE_SDR_PRODUCERS"
    with pytest.raises(ResourceConfigError, match=re.escape(f"{key}={producers!r}")):
        parse_overrides({}, env={**SDR_ON, key: producers})


# --- malformed input -------------------------------------------------------------------------

BAD = [
    # (values, text the message must start with, what it must say)
    ({"PC1_32G_MAX_CONCURRENT": "four"}, "PC1_32G_MAX_CONCURRENT='four'", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": ""}, "PC1_32G_MAX_CONCURRENT=''", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": "4.0"}, "PC1_32G_MAX_CONCURRENT='4.0'", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": 4.0}, "PC1_32G_MAX_CONCURRENT=4.0", "is not a whole number"),
    (
        {"PC1_32G_MAX_CONCURRENT": "1_000"},
        "PC1_32G_MAX_CONCURRENT='1_000'",
        "is not a whole number",
    ),
    ({"PC1_32G_MAX_CONCURRENT": "0x10"}, "PC1_32G_MAX_CONCURRENT='0x10'", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": None}, "PC1_32G_MAX_CONCURRENT=None", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": [4]}, "PC1_32G_MAX_CONCURRENT=[4]", "is not a whole number"),
    ({"PC1_32G_MAX_CONCURRENT": True}, "PC1_32G_MAX_CONCURRENT=True", "is a boolean"),
    ({"C2_GPU_UTILIZATION": False}, "C2_GPU_UTILIZATION=False", "is a boolean"),
    ({"AP_MAX_CONCURRENT": "-1"}, "AP_MAX_CONCURRENT='-1'", "is negative"),
    ({"AP_MAX_CONCURRENT": -1}, "AP_MAX_CONCURRENT=-1", "is negative"),
    ({"PC1_MIN_MEMORY": "-5"}, "PC1_MIN_MEMORY='-5'", "is negative"),
    ({"PC1_MAX_MEMORY": -5}, "PC1_MAX_MEMORY=-5", "is negative"),
    ({"PC1_BASE_MIN_MEMORY": -5}, "PC1_BASE_MIN_MEMORY=-5", "is negative"),
    ({"PC1_MAX_MEMORY": str(1 << 64)}, f"PC1_MAX_MEMORY='{1 << 64}'", "is too large"),
    ({"PC2_MAX_PARALLELISM": "-2"}, "PC2_MAX_PARALLELISM='-2'", "is below -1"),
    ({"PC2_32G_MAX_PARALLELISM_GPU": -3}, "PC2_32G_MAX_PARALLELISM_GPU=-3", "is below -1"),
    ({"C2_64G_GPU_UTILIZATION": "half"}, "C2_64G_GPU_UTILIZATION='half'", "is not a number"),
    ({"C2_64G_GPU_UTILIZATION": "nan"}, "C2_64G_GPU_UTILIZATION='nan'", "is not a number"),
    ({"C2_64G_GPU_UTILIZATION": "inf"}, "C2_64G_GPU_UTILIZATION='inf'", "is not a number"),
    ({"C2_64G_GPU_UTILIZATION": "1e999"}, "C2_64G_GPU_UTILIZATION='1e999'", "not a finite"),
    ({"C2_64G_GPU_UTILIZATION": float("nan")}, "C2_64G_GPU_UTILIZATION=nan", "not a finite"),
    ({"C2_64G_GPU_UTILIZATION": "-0.5"}, "C2_64G_GPU_UTILIZATION='-0.5'", "is negative"),
    ({"PC3_MAX_CONCURRENT": 1}, "PC3_MAX_CONCURRENT=1", "unknown task type 'PC3'"),
    ({"MAX_CONCURRENT": 1}, "MAX_CONCURRENT=1", "unknown task type 'MAX'"),
    ({"FIN_MAX_CONCURRENT": 1}, "FIN_MAX_CONCURRENT=1", "FIN, which has no resource table entry"),
    ({"FUS_32G_MAX_CONCURRENT": 1}, "FUS_32G_MAX_CONCURRENT=1", "FUS, which has no"),
    ({"DL_MAX_CONCURRENT": 1}, "DL_MAX_CONCURRENT=1", "DL, which has no"),
    ({"FRU_MAX_CONCURRENT": 1}, "FRU_MAX_CONCURRENT=1", "FRU, which has no"),
    ({"PC1_16G_MAX_CONCURRENT": 1}, "PC1_16G_MAX_CONCURRENT=1", "unknown sector size '16G'"),
    ({"PC1_32GIB_MAX_CONCURRENT": 1}, "PC1_32GIB_MAX_CONCURRENT=1", "unknown sector size"),
    ({"PC1_MAX_CONCURENT": 1}, "PC1_MAX_CONCURENT=1", "unknown field 'MAX_CONCURENT'"),
    ({"PC1_32G_THREADS": 1}, "PC1_32G_THREADS=1", "unknown field 'THREADS'"),
    ({"PC1_32G": 1}, "PC1_32G=1", "names no field"),
    ({"PC1": 1}, "PC1=1", "names no field"),
    (
        {"PC1_MAX_CONCURRENT": 1, "pc1_max_concurrent": 2},
        "pc1_max_concurrent=2",
        "already given by PC1_MAX_CONCURRENT",
    ),
    (
        {"PC1_32G_MAX_CONCURRENT": 1, "PC1": {"32G": {"max_concurrent": 2}}},
        "PC1.32G.max_concurrent=2",
        "already given by PC1_32G_MAX_CONCURRENT",
    ),
    ({"PC1": {"32G": {"max_concurrent": "four"}}}, "PC1.32G.max_concurrent='four'", "whole number"),
    ({"PC1": {"max_parallelism": 1.5}}, "PC1.max_parallelism=1.5", "is not a whole number"),
    (
        {"PC1": {"16G": {"max_concurrent": 1}}},
        "PC1.16G={'max_concurrent': 1}",
        "unknown sector size",
    ),
    ({"PC1": {"32G": {"threads": 1}}}, "PC1.32G.threads=1", "unknown field 'threads'"),
    ({"PC1": {"max-concurrent": 1}}, "PC1.max-concurrent=1", "unknown field"),
    ({"PC1": {"32G": 4}}, "PC1.32G=4", "should be a table of fields"),
    ({"PC1": {"32G": {"max_concurrent": {"x": 1}}}}, "PC1.32G.max_concurrent=", "not a table"),
    ({"PC9": {"max_concurrent": 1}}, "PC9={'max_concurrent': 1}", "unknown task type 'PC9'"),
    ({"FIN": {"max_concurrent": 1}}, "FIN={'max_concurrent': 1}", "FIN, which has no"),
]


@pytest.mark.parametrize(("values", "prefix", "problem"), BAD, ids=lambda v: str(v)[:40])
def test_malformed_overrides_name_key_and_value(
    values: dict[str, object], prefix: str, problem: str
) -> None:
    with pytest.raises(ResourceConfigError) as info:
        parse_overrides(values, env=SDR_ON)
    message = str(info.value)
    assert message.startswith(prefix), message
    assert problem in message, message
    assert isinstance(info.value, ValueError)


def test_exact_message_for_the_documented_example() -> None:
    with pytest.raises(ResourceConfigError) as info:
        parse_overrides({"PC1_32G_MAX_CONCURRENT": "four"})
    assert str(info.value) == "PC1_32G_MAX_CONCURRENT='four' is not a whole number"


def test_unsized_value_is_checked_even_if_every_size_is_overridden() -> None:
    values: dict[str, object] = {f"AP_{s}_MAX_CONCURRENT": 1 for s in SECTOR_SIZES}
    values["AP_MAX_CONCURRENT"] = "x"
    with pytest.raises(ResourceConfigError, match=re.escape("AP_MAX_CONCURRENT='x'")):
        parse_overrides(values)


# --- describe_bytes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (60129542144, "56 GiB"),
        (10485760, "10 MiB"),
        (1610612736, "1.5 GiB"),
        (2048, "2 KiB"),
        (805306368, "768 MiB"),
        (204010946560, "190 GiB"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        ((30 << 30) + (300 << 20), "30.29 GiB"),
        ((1 << 30) - 1, "1 GiB"),  # 1023.999... MiB rounds up into the next unit
        (3 << 40, "3 TiB"),
        (-(3 << 29), "-1.5 GiB"),
    ],
)
def test_describe_bytes(n: int, text: str) -> None:
    assert describe_bytes(n) == text
