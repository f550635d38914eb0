"""Supervised fine-tuning as a method: one row per example (prompt + reference answer), no model pass."""
from gapfix.methods.base import Method, OfflineContext, register

CHUNK_EXAMPLES = 1024  # examples read (one Arrow gather) and written per chunk


def write_sft_shard(ctx: OfflineContext) -> int:
    """Writes this rank's contiguous share of the SFT rows; returns its row count."""
    from gapfix.data import sft_row
    from gapfix.data.arrow import shard_range

    share = shard_range(len(ctx.examples), ctx.rank, ctx.world)
    with ctx.writer(share.start) as writer:
        for start in range(share.start, share.stop, CHUNK_EXAMPLES):
            chunk = range(start, min(start + CHUNK_EXAMPLES, share.stop))
            writer.write([sft_row(example) for example in ctx.gather(chunk)])
    return len(share)


@register
class SFT(Method):
    name = "sft"
    runs_model = False

    def build_shard(self, ctx: OfflineContext) -> dict:
        write_sft_shard(ctx)
        return {}
