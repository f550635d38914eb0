"""RAC's mixed rows are written by every rank, each its contiguous share of mix_with_sft's order:
the shards' union is byte for byte the one file of mix_with_sft over the whole lists (what rank 0
alone wrote before), at any world size, hard and soft rows alike. Ranks are simulated in one
process here (tests/test_offline_sharding.py runs two real ones under torchrun)."""
import random

import pyarrow as pa
import pytest

from gapfix.data import Example, sft_row
from gapfix.data.arrow import RowTable, shard_range, write_rows
from gapfix.methods.base import OfflineContext, row_seed
from gapfix.methods.rac import RAC, mix_with_sft
from gapfix.trainer import TrainConfig


def _examples(count=29, seed=0):
    rng = random.Random(seed)
    return [Example([1] + [rng.randrange(4, 50) for _ in range(rng.randrange(1, 6))],
                    [rng.randrange(4, 50) for _ in range(rng.randrange(1, 7))] + [2]) for _ in range(count)]


def _rac_rows(count, soft, seed=1):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randrange(3, 12)
        row = {"input_ids": [rng.randrange(4, 50) for _ in range(length)],
               "labels": [-100] + [rng.randrange(4, 50) for _ in range(length - 1)]}
        if soft:
            row["target_ids"] = [[rng.randrange(4, 50), -100] for _ in range(length)]
            row["target_weights"] = [[1.0, 0.0] for _ in range(length)]
        rows.append(row)
    return rows


def _context(folder, rank, world, examples, config):
    return OfflineContext(model=None, tokenizer=None, examples=examples, config=config, iteration=2,
                          device="cpu", rank=rank, world=world, folder=str(folder), log=lambda record: None,
                          trained_rows=lambda n: list(range(n)), barrier=lambda: None,
                          all_reduce=lambda values: list(values))


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("ratio", [1.0, 2.5, 0.0])
def test_mixed_shards_union_is_the_single_file_of_every_world_size(tmp_path, soft, ratio):
    examples, rac_rows = _examples(), _rac_rows(13, soft)
    config = TrainConfig(method="rac", rac_sft_ratio=ratio, seed=5)
    mixed = mix_with_sft(rac_rows, [sft_row(ex) for ex in examples], ratio,
                         seed=row_seed(config.seed, 2, "mix", 0, 0))
    reference = write_rows(tmp_path / "reference.arrow", mixed)
    with open(reference, "rb") as handle:
        expected = handle.read()
    for world in (1, 2, 3, 40):  # 40: more ranks than rows, some shards empty
        folder = tmp_path / f"world{world}"
        folder.mkdir()
        for rank in range(world):  # each rank's RAC shard, as build_shard writes it
            share = shard_range(len(rac_rows), rank, world)
            with _context(folder, rank, world, examples, config).writer(share.start, stem="rac") as writer:
                writer.write(rac_rows[share.start:share.stop])
        paths = [RAC().finish(_context(folder, rank, world, examples, config)) for rank in range(world)]
        assert all(p == paths[0] for p in paths) and len(paths[0]) == world
        canonical = RowTable.open(paths[0], expected_rows=len(mixed)).write_to(folder / "canonical.arrow")
        with open(canonical, "rb") as handle:
            assert handle.read() == expected, world
        for rank, path in enumerate(paths[0]):  # rank r wrote rows shard_range(len(mixed), r, world)
            assert path.endswith(f"mix-{rank:05d}-of-{world:05d}.arrow")
            assert pa.ipc.open_file(path).read_all().num_rows == len(shard_range(len(mixed), rank, world))
