"""BASH inside transformers Trainer / TRL SFTTrainer: BashTrainer and BashSFTTrainer.

    trainer = BashTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                          data_collator=collator, bash_config=BashConfig(beta=0.3))
    trainer.train()

The offline pass of Cen et al.: at the start of every prediction window (an epoch,
or `refresh` optimizer steps) the model, frozen as it is then, predicts every token
of every training row in one teacher-forced pass (gapfix.methods.bash.
predict_alternatives); during the window each answer input token (labels != -100)
is replaced by that prediction with probability beta, inside the model's input
embedding gather (a forward hook that calls gapfix.mix_embedding on the ids the
model embeds), so the replacement happens within the model's own forward (DDP
sees an ordinary forward) and the labels stay the reference.

How predictions find their positions in a batch: the training rows get a row-index
column; the wrapped collator collates the rows a second time with input_ids
replaced by (negative) flat token indices, so whatever the collator does (left or
right padding, TRL's padding-free flattening) the same positions carry the indices.
Each index is checked against the real batch's token there: a collator that
changes tokens is refused, never trained on silently.

Prediction is split across ranks: fixed chunks of rows, chunk c on rank
c % world_size (gapfix.methods.bash.predict_rows, as the reference trainer runs it);
one all-reduce shares the result. Seeds follow the reference trainer's rule, with the
prediction window as the iteration: a row's sampled predictions are seeded by (seed,
window, row) (prediction_seeds), its mixing mask by (seed, window, step in the window,
row) (mixing_seeds), never by the rank or the micro-batch.
The predictions of the current window are saved in Trainer's checkpoints
(gapfix_bash.safetensors + gapfix_bash.json), so a resumed run trains exactly as
an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from transformers import Trainer

from gapfix.hf._common import (
    all_reduce_sum,
    checked_config,
    checkpoint_dir,
    load_side_state,
    rank_and_world,
    refuse_fsdp,
    replaced_embeddings,
    require_dataset,
    resolved_config,
    save_side_state,
    sft_trainer_class,
)
from gapfix.methods.bash import BashConfig

if TYPE_CHECKING:  # annotations only
    import datasets

__all__ = ["BashTrainer"]

ROW_COLUMN = "gapfix_row"
INDEX_KEY = "gapfix_token_index"
ROWS_KEY = "gapfix_rows"  # per batch row: the training rows it holds (a tuple; several where packed)
STATE_FILE = "gapfix_bash.json"
TENSOR_FILE = "gapfix_bash.safetensors"
_INDEX_BASE = 1000  # token index i is collated as -(i + 1000): below any pad or ignore value


class _Rows:
    """The training rows' tokens, flat: tokens[offsets[r]:offsets[r + 1]] is row r. `answer`
    marks the positions predicted (labels != -100 where the rows carry labels, else all but
    position 0); `position_ids` restart per packed example where the rows carry seq_lengths."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        if "input_ids" not in dataset.column_names:
            raise ValueError("train_dataset must be tokenized (an input_ids column); "
                             f"it has {dataset.column_names}")
        ids = dataset["input_ids"]
        labels = dataset["labels"] if "labels" in dataset.column_names else None
        seq_lengths = dataset["seq_lengths"] if "seq_lengths" in dataset.column_names else None
        lengths = [len(row) for row in ids]
        if not ids or min(lengths) < 1:
            raise ValueError("train_dataset has no rows or an empty input_ids row")
        self.offsets = torch.tensor([0] + lengths).cumsum(0)
        self.tokens = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                                                   count=sum(lengths)))
        if labels is not None:
            flat = np.fromiter(itertools.chain.from_iterable(labels), dtype=np.int64)
            answer = torch.from_numpy(flat != -100)
            if answer.shape != self.tokens.shape:
                raise ValueError("train_dataset: a labels row differs in length from its input_ids row")
        else:
            answer = torch.ones_like(self.tokens, dtype=torch.bool)
        answer[self.offsets[:-1]] = False  # the first token of a row has no prefix to predict it from
        self.answer = answer
        self.packed = seq_lengths is not None
        if self.packed:
            positions = []
            for row, lens in zip(ids, seq_lengths):
                if sum(lens) != len(row):
                    raise ValueError("train_dataset: seq_lengths do not add up to the row's length")
                positions += [p for n in lens for p in range(n)]
            self.positions = torch.tensor(positions, dtype=torch.long)
            self.answer &= self.positions != 0  # nor has an example's first token inside a pack
        self.digest = hashlib.blake2b(self.tokens.numpy().tobytes(), digest_size=16).hexdigest()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def span(self, row: int) -> tuple[int, int]:
        return int(self.offsets[row]), int(self.offsets[row + 1])

    def rows_of(self, index: torch.Tensor) -> list[tuple[int, ...]]:
        """The training rows whose tokens each batch row holds, in order (index: flat token
        indices, -1 where none)."""
        held = []
        for line in index:
            known = line[line >= 0]
            rows = torch.searchsorted(self.offsets, known, right=True) - 1
            held.append(tuple(torch.unique_consecutive(rows).tolist()))
        return held


class _IndexingCollator:
    """Wraps a data collator: the batch gains INDEX_KEY (B, T) long, the flat token index of
    each position (-1 where the position holds no token of a training row)."""

    def __init__(self, inner: Callable[[list[dict]], dict], rows: _Rows) -> None:
        self.inner = inner
        self.rows = rows

    def __call__(self, features: list[dict]) -> dict:
        if not features or ROW_COLUMN not in features[0]:
            return self.inner(features)  # evaluation rows: no mixing
        plain = [{k: v for k, v in f.items() if k != ROW_COLUMN} for f in features]
        batch = self.inner(plain)
        encoded = []
        for feature, row in zip(plain, (int(f[ROW_COLUMN]) for f in features)):
            start, stop = self.rows.span(row)
            if len(feature["input_ids"]) != stop - start:
                raise ValueError(f"train_dataset row {row} changed length since the trainer was built")
            encoded.append({**feature, "input_ids": [-(i + _INDEX_BASE) for i in range(start, stop)]})
        coded = self.inner(encoded)["input_ids"]
        ids = batch["input_ids"]
        if coded.shape != ids.shape:
            raise ValueError("data_collator: its output shape depends on token values; BASH cannot place "
                             "predictions in its batches")
        index = torch.where(coded <= -_INDEX_BASE, -coded - _INDEX_BASE, -1)
        known = index >= 0
        if bool((self.rows.tokens[index[known]] != ids[known]).any()):
            raise ValueError("data_collator changes token ids; BASH cannot place predictions in its batches")
        _check_batch_labels(batch)
        batch[INDEX_KEY] = index
        batch[ROWS_KEY] = self.rows.rows_of(index)
        return batch


def _check_batch_labels(batch: dict) -> None:
    """BASH mixes the answer tokens, those with labels: a batch needs labels in the Hugging Face
    convention (aligned with input_ids; gapfix.data.check_labels refuses shifted ones)."""
    from gapfix.data import check_labels

    if "labels" not in batch:
        raise ValueError("BASH needs labels: the data collator's batches have no 'labels' (BASH replaces the "
                         f"answer tokens, those with labels != -100); batch keys: {sorted(batch)}")
    check_labels(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), where="BASH batch labels")


class _BashMixin:
    """BASH on top of a Trainer class (transformers.Trainer or trl.SFTTrainer)."""

    def __init__(self, *args: Any, bash_config: BashConfig | None = None,
                 resume_with_changed_config: bool = False, **kwargs: Any) -> None:
        if bash_config is not None:
            checked_config("bash_config", bash_config, BashConfig)
        from gapfix.hf.trl_head import serve_trl_head

        with serve_trl_head():  # under trl.SFTTrainer, TRL's fused head runs on gapfix's kernel
            super().__init__(*args, **kwargs)
        self.bash_config = resolved_config(self, "bash_config", bash_config, BashConfig)
        if self.bash_config.rows is not None:
            raise ValueError("bash_config.rows is the reference trainer's (gapfix train --bash-rows); under "
                             "Trainer every row is predicted once per window (see refresh)")
        self.resume_with_changed_config = resume_with_changed_config
        if ROW_COLUMN in require_dataset(self, "BASH predicts every row once per window").column_names:
            raise ValueError(f"train_dataset already has a {ROW_COLUMN!r} column")
        self._bash_rows = _Rows(self.train_dataset)
        _check_top_k(self.model, self.bash_config)
        self.train_dataset = self.train_dataset.add_column(ROW_COLUMN, list(range(len(self._bash_rows))))
        self.data_collator = _IndexingCollator(self.data_collator, self._bash_rows)
        self._bash_window = None  # the window whose predictions are held
        self._bash_alt_ids = None  # flat (N,) or (N, K)
        self._bash_alt_probs = None  # flat (N, K) in topk mode
        self._bash_counts = None  # (mixed, changed, eligible) since the last log

    # -- columns ----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]

    # -- the prediction windows -------------------------------------------------------------------
    def _bash_period(self) -> int:
        if self.bash_config.refresh is not None:
            return self.bash_config.refresh
        loader = getattr(self.callback_handler, "train_dataloader", None)
        if loader is None:
            raise ValueError("BASH: the training dataloader has no length; set BashConfig(refresh=N)")
        return max(1, math.ceil(len(loader) / self.args.gradient_accumulation_steps))

    def _bash_chunks(self) -> list[range]:
        """The prediction chunks of rows (a pack is predicted alone, unpadded)."""
        rows, size = self._bash_rows, 1 if self._bash_rows.packed else self.bash_config.prediction_batch_size
        return [range(start, min(len(rows), start + size)) for start in range(0, len(rows), size)]

    def _bash_refresh(self, window: int) -> None:
        """Predictions of the model as it is now, for every row; this rank computes its chunks."""
        from gapfix.methods.bash import predict_rows, prediction_seeds

        refuse_fsdp(self, "the BASH prediction pass")
        cfg, rows = self.bash_config, self._bash_rows
        rank, world = rank_and_world(self)
        device = self.args.device
        topk = cfg.mode == "topk"
        shape = (len(rows.tokens), cfg.top_k) if topk else (len(rows.tokens),)
        alt_ids = torch.zeros(shape, dtype=torch.long, device=device)
        alt_probs = torch.zeros(shape, dtype=torch.float32, device=device) if topk else None
        for members in self._bash_chunks()[rank::world]:
            spans = [rows.span(r) for r in members]
            positions = rows.positions[spans[0][0]:spans[0][1]][None] if rows.packed else None
            alts = predict_rows(self.model, [rows.tokens[a:b] for a, b in spans], [rows.answer[a:b] for a, b in spans],
                                cfg, prediction_seeds(self.args.seed, window, members), device=device,
                                position_ids=positions)
            for i, (start, stop) in enumerate(spans):
                alt_ids[start:stop] = alts.alt_ids[i, :stop - start]
                if topk:
                    alt_probs[start:stop] = alts.alt_probs[i, :stop - start]
        all_reduce_sum(self, alt_ids)
        if topk:
            all_reduce_sum(self, alt_probs)
        self._bash_alt_ids, self._bash_alt_probs, self._bash_window = alt_ids, alt_probs, window

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        window = self.state.global_step // self._bash_period()
        if window != self._bash_window:
            self._bash_refresh(window)
        return super().training_step(model, inputs, num_items_in_batch)

    def _bash_seeds(self, held: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        """The mixing seed of each batch row (gapfix.methods.bash.mixing_seeds, the window as the
        iteration): a row alone is seeded by its index, a packed row by the tuple of them."""
        from gapfix.methods.bash import mixing_seeds

        period = self._bash_period()
        window, step = divmod(self.state.global_step, period)
        return mixing_seeds(self.args.seed, window, step, [r[0] if len(r) == 1 else r for r in held]).to(device)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        index, held = inputs.pop(INDEX_KEY, None), inputs.pop(ROWS_KEY, None)
        if index is None or not model.training or self._bash_alt_ids is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        known = index >= 0
        flat = index.clamp_min(0).to(self._bash_alt_ids.device)
        eligible = known & (labels != -100) & self._bash_rows.answer.to(flat.device)[flat]
        if "attention_mask" in inputs:
            eligible &= inputs["attention_mask"] != 0
        alt_ids = self._bash_alt_ids[flat]
        alt_probs = None if self._bash_alt_probs is None else self._bash_alt_probs[flat]
        if alt_probs is None:
            alt_ids = torch.where(known, alt_ids, input_ids)
        with self._bash_mixing(alt_ids, alt_probs, eligible, self._bash_seeds(held, input_ids.device)):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _bash_mixing(self, alt_ids: torch.Tensor, alt_probs: torch.Tensor | None, eligible: torch.Tensor,
                     seed: torch.Tensor) -> contextlib.AbstractContextManager:
        """While active, the model's input embedding returns the mixed embeddings of its ids."""
        from gapfix.methods.bash import changed_inputs, mixed_inputs_embeds

        counts = self._bash_counts
        if counts is None:
            counts = self._bash_counts = torch.zeros(3, dtype=torch.float64, device=eligible.device)

        def mix(module: torch.nn.Module, ids: torch.Tensor | None) -> torch.Tensor:
            if not isinstance(ids, torch.Tensor) or ids.shape != alt_ids.shape[:ids.dim()]:
                raise ValueError("BASH: the model embedded ids of another shape than the batch's input_ids "
                                 "(pass input_ids, not inputs_embeds, to a BashTrainer)")
            embeds, mixed = mixed_inputs_embeds(module, ids, alt_ids, beta=self.bash_config.beta, seed=seed,
                                                eligible=eligible, alt_probs=alt_probs)
            counts[0] += mixed.sum()
            counts[1] += changed_inputs(ids, alt_ids, alt_probs, mixed).sum()
            counts[2] += eligible.sum()
            return embeds

        return replaced_embeddings(self.model, mix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._bash_counts is not None:
            counts = all_reduce_sum(self, self._bash_counts.clone())
            if counts[2] > 0:
                logs["bash_mixed_fraction"] = float(counts[0] / counts[2])
                logs["bash_changed_fraction"] = float(counts[1] / counts[2])
            self._bash_counts.zero_()
        return super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._bash_alt_ids is None or not self.args.should_save:
            return
        tensors = {"alt_ids": self._bash_alt_ids}
        if self._bash_alt_probs is not None:
            tensors["alt_probs"] = self._bash_alt_probs
        save_side_state(checkpoint_dir(self, trial), STATE_FILE, {
            "window": self._bash_window, "period": self._bash_period(), "tokens": len(self._bash_rows.tokens),
            "digest": self._bash_rows.digest, "config": self.bash_config.to_dict()}, TENSOR_FILE, tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = load_side_state(Path(resume_from_checkpoint), STATE_FILE, self.bash_config, "bash_config",
                                 self.resume_with_changed_config, tensor_file=TENSOR_FILE,
                                 missing="BASH predictions: they are recomputed with the resumed weights")
        if loaded is None:
            return
        state, tensors, changed = loaded
        path = Path(resume_from_checkpoint) / STATE_FILE
        if state.get("digest") != self._bash_rows.digest or state.get("tokens") != len(self._bash_rows.tokens):
            raise ValueError(f"{path}: line 1: the predictions were made for another train_dataset")
        expected = (len(self._bash_rows.tokens),) + ((self.bash_config.top_k,)
                                                      if self.bash_config.mode == "topk" else ())
        if changed:  # predictions of other settings: the window is predicted again with the new ones
            return
        if tuple(tensors.get("alt_ids", torch.empty(0)).shape) != expected:
            raise ValueError(f"{Path(resume_from_checkpoint) / TENSOR_FILE}: alt_ids must have shape {expected}")
        device = self.args.device
        self._bash_alt_ids = tensors["alt_ids"].to(device)
        self._bash_alt_probs = tensors["alt_probs"].to(device) if "alt_probs" in tensors else None
        self._bash_window = int(state["window"])


def _check_top_k(model: torch.nn.Module, config: BashConfig) -> None:
    """topk mode keeps top_k ids and probabilities per token: top_k must not exceed the vocabulary."""
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if config.mode == "topk" and isinstance(vocab, int) and config.top_k > vocab:
        raise ValueError(f"bash_config.top_k {config.top_k} exceeds the model's vocabulary of {vocab} tokens")


class BashTrainer(_BashMixin, Trainer):
    """transformers.Trainer with BASH: BashTrainer(..., bash_config=BashConfig(beta=0.3))."""


def __getattr__(name: str) -> type:
    if name == "BashSFTTrainer":  # built on first use, so that importing this module never imports trl
        doc = "trl.SFTTrainer with BASH: BashSFTTrainer(..., bash_config=BashConfig(beta=0.3))."
        cls = globals()[name] = sft_trainer_class(name, _BashMixin, __name__, doc)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
