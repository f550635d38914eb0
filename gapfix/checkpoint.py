"""Checkpoints of the reference trainer: written whole, published atomically, read as data.

A checkpoint is a folder `<out>/checkpoints/iterNNN-stepNNNNNNN/` holding

    model/                      save_pretrained: safetensors weights, config, tokenizer
    trainer_state.json          the rest of the trainer's state as JSON (position, a reference
                                to the iteration's rows, configuration, optimizer
                                hyper-parameters, RNG states)
    trainer_state.safetensors   the tensors of that state (optimizer moments, RNG states)

The iteration's rows are not in the checkpoint: they are written once, when the offline
phase ends, as Arrow files under `<out>/iterations/iterNNN/`, and the state refers to
them (`rows_reference`: paths relative to `<out>`, row count, SHA-256 of the files), so a
checkpoint's size does not grow with the dataset; `open_rows` refuses a path leading
outside `<out>` and files whose rows or bytes differ from the reference.

Nothing is unpickled: a checkpoint holds data only, so a crafted file in `--out` cannot
run code. A pickled `trainer_state.pt` (older gapfix) is refused with an error naming it.

Writing: every file goes to `<name>.tmp/`, is fsynced, the folder is renamed to `<name>`,
and only then does `checkpoints/latest` (a file holding the bare name) move to it. A save
that fails midway (disk full, kill) leaves the previous checkpoint the valid one.
Reading: `latest` must name a checkpoint folder directly under `<out>/checkpoints/`; a
path, `..`, an absolute name or a symlink leading elsewhere is refused.
"""
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil

import torch

from gapfix.outdir import fsync_path

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = 2  # 1 was the pickled trainer_state.pt
CHECKPOINT_NAME = re.compile(r"iter\d{3,}-step\d{7,}")
# TrainConfig fields that do not change what is trained: a resume may change them freely (RAC's rows
# are the same for any vLLM tensor-parallel size, and a checkpoint older than these knobs lacks them)
RESUME_FREE_FIELDS = frozenset({"out_dir", "progress", "log_every", "save_every", "keep_checkpoints",
                                "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization"})
_TAGS = ("__tensor__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class NonFiniteTrainingError(ValueError):
    """Training reached a non-finite loss, gradient or weight; nothing non-finite was saved."""


# ---------------------------------------------------------------- state <-> JSON + tensors


def encode_state(state) -> tuple:
    """(JSON-able object, {key: tensor}) for a state made of tensors, None, bool, int,
    float, str, lists, tuples and dicts; anything else raises TypeError naming where."""
    tensors, storages = {}, set()

    def encode(value, where):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensor = value.detach().to("cpu").contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in storages:  # safetensors refuses tensors that share memory
                tensor = tensor.clone()
            storages.add(pointer)
            tensors[key] = tensor
            return {"__tensor__": key}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in value):
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")]
                                  for k, v in value.items()]}
        raise TypeError(f"trainer state {where} is a {type(value).__name__}: checkpoints hold "
                        "only tensors and plain JSON types")

    return encode(state, "state"), tensors


def decode_state(encoded, tensors: dict, source: str):
    """The inverse of encode_state; a malformed structure raises CheckpointError naming `source`."""

    def fail(why):
        raise CheckpointError(f"{source}: malformed trainer state ({why})")

    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, payload), = value.items()
            if tag == "__tensor__":
                if not isinstance(payload, str) or payload not in tensors:
                    fail(f"tensor {payload!r} is not in {STATE_TENSORS}")
                return tensors[payload]
            if tag == "__tuple__":
                if not isinstance(payload, list):
                    fail("a tuple that is not a list")
                return tuple(decode(v) for v in payload)
            if tag == "__items__":
                if not isinstance(payload, list) or not all(
                        isinstance(p, list) and len(p) == 2 for p in payload):
                    fail("a dict whose items are not [key, value] pairs")
                items = [(decode(k), decode(v)) for k, v in payload]
                try:
                    return dict(items)
                except TypeError:  # a list as a key
                    fail("a dict key that is not a plain value")
        return {k: decode(v) for k, v in value.items()}

    return decode(encoded)


# ---------------------------------------------------------------- writing


def _no_space(err: OSError, path: str) -> OSError:
    """Disk full, said in words and naming the file (torch/safetensors say 'iostream error')."""
    return OSError(errno.ENOSPC, f"no space left on device while writing {path}")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "code: 28" in text


def write_file(path: str, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs it; disk full raises OSError(ENOSPC) naming the file."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _no_space(err, path) from err
        raise


def fsync_tree(folder: str) -> None:
    """fsyncs every file and folder under `folder` (itself included), so that a rename
    that publishes it can never expose a folder whose contents are still in flight."""
    for parent, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(parent, name))
        fsync_path(parent)


def model_fingerprint(model) -> str:
    config = model.config
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "n_embd", "n_layer", "n_head")
    described = {k: getattr(config, k, None) for k in keys}
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    blob = json.dumps([described, shapes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def metrics_size(metrics_path: str | None) -> int:
    """The length of metrics.jsonl now: where a resume from the checkpoint written now rewinds it to."""
    if metrics_path and os.path.isfile(metrics_path):
        return os.path.getsize(metrics_path)
    return 0


def rewind_metrics(metrics_path: str | None, size: int) -> None:
    """Cuts metrics.jsonl back to `size` bytes (its length when the checkpoint being resumed
    was written; 0 for a run that starts over), so that the steps replayed since then are not
    logged twice and a resumed run's log reads like an uninterrupted one's."""
    if not metrics_path or not os.path.isfile(metrics_path):
        return
    from gapfix.outdir import open_file

    if os.path.getsize(metrics_path) > size:
        with open_file(metrics_path, "r+b") as handle:  # never through a link to a file elsewhere
            handle.truncate(size)


def save_checkpoint(out_dir, *, model, tokenizer, optimizer_state, scheduler, position, rows,
                    config, keep=1, model_state=None, metrics_bytes: int = 0) -> str:
    """Writes a checkpoint folder, then publishes it by replacing `latest`.

    rows: rows_reference() of the iteration's rows (None between iterations).
    model_state: the full state dict where the model's own is sharded (FSDP);
    None saves the model's parameters as they are. metrics_bytes: the length of
    metrics.jsonl, to which a resume from this checkpoint rewinds it.

    Until the pointer moves, the previous checkpoint stays the valid one: a save that
    fails midway (disk full) removes its temp folder and raises, naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save as safetensors_bytes

    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"iter{position['iteration']:03d}-step{position['global_step']:07d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    encoded, tensors = encode_state({
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "position": position,
        "rows": rows,
        "config": dataclasses.asdict(config),
        "fingerprint": model_fingerprint(model),
        "metrics_bytes": metrics_bytes,
    })
    try:
        os.makedirs(tmp)
        try:
            model.save_pretrained(os.path.join(tmp, "model"), state_dict=model_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(tmp, "model"))
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk its own way
            if _is_disk_full(err):
                raise _no_space(err, getattr(err, "filename", None) or os.path.join(tmp, "model")) from err
            raise
        write_file(os.path.join(tmp, STATE_TENSORS), safetensors_bytes(tensors))
        write_file(os.path.join(tmp, STATE_JSON),
                   json.dumps({"format": FORMAT, "state": encoded}).encode("utf-8"))
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(root)
        pointer_tmp = os.path.join(root, "latest.tmp")
        write_file(pointer_tmp, name.encode("ascii"))
        os.replace(pointer_tmp, os.path.join(root, "latest"))
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = sorted(d for d in os.listdir(root) if CHECKPOINT_NAME.fullmatch(d))
    for stale in kept[:-keep] if keep > 0 else []:
        if stale != name:
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    return final


# ---------------------------------------------------------------- the iteration's rows


def _files_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def rows_reference(out_dir: str, paths, num_rows: int) -> dict:
    """What a checkpoint stores of the iteration's rows: their files relative to out_dir,
    the row count and a SHA-256 of the files' bytes (computed once, when the rows are written)."""
    relative = []
    for path in paths:
        if not _inside(path, out_dir):
            raise CheckpointError(f"{path}: row file outside {out_dir}")
        relative.append(os.path.relpath(os.path.realpath(path), os.path.realpath(out_dir)))
    for path in paths:  # durable before any checkpoint that refers to them is published
        fsync_path(path)
    for folder in sorted({os.path.dirname(os.path.abspath(path)) for path in paths}):
        fsync_path(folder)
    return {"files": relative, "rows": int(num_rows), "sha256": _files_digest(paths)}


def open_rows(out_dir: str, reference, *, expected_rows=None):
    """The RowTable a checkpoint's rows reference names, checked: every file a relative path
    inside out_dir, the bytes those hashed, the row count that recorded (and expected_rows)."""
    from gapfix.data import DataError
    from gapfix.data.arrow import RowTable

    where = f"{out_dir}: checkpoint's rows reference"
    if not isinstance(reference, dict) or not isinstance(reference.get("files"), list) or \
            not isinstance(reference.get("rows"), int) or not isinstance(reference.get("sha256"), str):
        raise CheckpointError(f"{where} is malformed ({str(reference)[:200]}): start over with --no-resume")
    paths = []
    for name in reference["files"]:
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise CheckpointError(f"{where}: {name!r} is not a path inside {out_dir}")
        path = os.path.join(out_dir, name)
        if not os.path.lexists(path) or not _inside(path, out_dir) or not os.path.isfile(path):
            raise CheckpointError(f"{path}: the checkpoint's row file is missing or not a file inside "
                                  f"{out_dir}")
        paths.append(path)
    if _files_digest(paths) != reference["sha256"]:
        raise CheckpointError(f"{', '.join(paths)}: the row files changed since the checkpoint was written "
                              "(SHA-256 differs); start over with --no-resume")
    try:
        table = RowTable.open(paths, expected_rows=reference["rows"])
    except DataError as err:
        raise CheckpointError(str(err)) from None
    if expected_rows is not None and len(table) != expected_rows:
        raise CheckpointError(f"{', '.join(paths)}: {len(table)} rows, but this run's data and settings "
                              f"yield {expected_rows}; start over with --no-resume")
    return table


def prune_rows(out_dir: str) -> list:
    """Removes the iteration row folders under `<out>/iterations/` that no kept checkpoint refers
    to (run between iterations, when no rows are being built); returns the folders removed. A
    checkpoint that cannot be read keeps every folder (nothing is removed on a doubt)."""
    root, referenced = os.path.join(out_dir, "iterations"), set()
    checkpoints = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    for name in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
        if not CHECKPOINT_NAME.fullmatch(name):
            continue
        try:
            with open(os.path.join(checkpoints, name, STATE_JSON), "rb") as handle:
                rows = json.loads(handle.read().decode("utf-8"))["state"]["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        for file in (rows or {}).get("files", []) if isinstance(rows, dict) else []:
            referenced.add(str(file).replace("\\", "/").split("/")[1] if "/" in str(file) else "")
    removed = []
    for folder in sorted(os.listdir(root)):
        if re.fullmatch(r"iter\d{3,}", folder) and folder not in referenced:
            shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
            removed.append(os.path.join(root, folder))
    return removed


# ---------------------------------------------------------------- reading


def _inside(path: str, folder: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base and not os.path.islink(path)


def latest_checkpoint(out_dir) -> str | None:
    """The folder `<out>/checkpoints/latest` names, or None when there is no pointer.

    The pointer must hold a checkpoint name (iterNNN-stepNNNNNNN) of a real folder directly
    under `<out>/checkpoints/`: anything else (a path, `..`, a symlink) raises CheckpointError."""
    root = os.path.join(out_dir, "checkpoints")
    pointer = os.path.join(root, "latest")
    if not os.path.lexists(pointer):
        return None
    if not _inside(pointer, out_dir) or not os.path.isfile(pointer):
        raise CheckpointError(f"{pointer}: not a regular file inside {out_dir}")
    with open(pointer, "rb") as handle:
        raw = handle.read(257)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: {raw[:80]!r} is not the name of a checkpoint folder "
                              f"(iterNNN-stepNNNNNNN) directly under {root}")
    path = os.path.join(root, name)
    if not _inside(path, out_dir) or not os.path.isdir(path):
        raise CheckpointError(f"{pointer}: {path} is not a checkpoint folder inside {out_dir} "
                              "(missing, or a symlink leading elsewhere)")
    return path


def _checked_file(path: str, checkpoint: str) -> str:
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing from checkpoint {checkpoint}")
    if not _inside(path, checkpoint) or not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file inside checkpoint {checkpoint}")
    return path


def read_trainer_state(path: str) -> dict:
    """The trainer state of checkpoint folder `path`, read as data (JSON + safetensors)."""
    json_path = os.path.join(path, STATE_JSON)
    legacy = os.path.join(path, LEGACY_PICKLE)
    if not os.path.lexists(json_path) and os.path.lexists(legacy):
        raise CheckpointError(
            f"{legacy}: a pickled trainer state (gapfix before checkpoint format {FORMAT}) is never "
            "loaded, since unpickling a file can run code; start over (gapfix train --no-resume, "
            f"train(resume=False)) or delete {path}")
    _checked_file(json_path, path)
    try:
        with open(json_path, "rb") as handle:
            document = json.loads(handle.read().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{json_path}: not a readable trainer state ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or "state" not in document:
        raise CheckpointError(f"{json_path}: not a gapfix trainer state of format {FORMAT}")
    tensor_path = _checked_file(os.path.join(path, STATE_TENSORS), path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{tensor_path}: not a readable safetensors file ({err})") from None
    state = decode_state(document["state"], tensors, json_path)
    required = ("optimizer", "scheduler", "rng", "position", "rows", "config", "fingerprint")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{json_path}: trainer state lacks {', '.join(missing)}")
    _check_state_fields(state, json_path)
    return state


def _check_state_fields(state: dict, json_path: str) -> None:
    """The state's fields are of the types the trainer reads (the position's ranges are checked
    by check_position, against the run's settings)."""
    expected = {"optimizer": dict, "scheduler": dict, "rng": dict, "position": dict, "config": dict,
                "fingerprint": str}
    for key, kind in expected.items():
        if not isinstance(state[key], kind):
            raise CheckpointError(f"{json_path}: field {key} is a {type(state[key]).__name__}, not a "
                                  f"{kind.__name__}; start over with --no-resume")
    if state["rows"] is not None and not isinstance(state["rows"], dict):
        raise CheckpointError(f"{json_path}: field rows is a {type(state['rows']).__name__}, not an object "
                              "or null; start over with --no-resume")
    metrics_bytes = state.get("metrics_bytes", 0)
    if isinstance(metrics_bytes, bool) or not isinstance(metrics_bytes, int) or metrics_bytes < 0:
        raise CheckpointError(f"{json_path}: field metrics_bytes is {metrics_bytes!r}, not a byte count "
                              "(an int >= 0); start over with --no-resume")


POSITION_FIELDS = ("iteration", "step_in_iteration", "global_step")


def check_position(state: dict, checkpoint: str, *, iterations: int, steps: int, exact: bool = True) -> dict:
    """The checkpoint's position ({iteration, step_in_iteration, global_step}), refused
    (CheckpointError naming the file and field) unless it is one this run can be at: ints
    within its --iterations and the steps of an iteration (`steps`), mid-iteration exactly when
    the checkpoint refers to an iteration's rows, and (`exact`, when the settings are those
    it was written with) a global step equal to the steps before it."""
    where = os.path.join(checkpoint, STATE_JSON)
    position = state["position"]
    if set(position) != set(POSITION_FIELDS):
        raise CheckpointError(f"{where}: field position holds {sorted(position)}, not "
                              f"{list(POSITION_FIELDS)}; start over with --no-resume")
    for key in POSITION_FIELDS:
        value = position[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise CheckpointError(f"{where}: field position.{key} is {value!r}, not a step count "
                                  "(an int >= 0); start over with --no-resume")

    def outside(key, low, high, why):
        raise CheckpointError(f"{where}: field position.{key} is {position[key]}, outside [{low}, {high}] "
                              f"({why}); start over with --no-resume")

    mid_iteration = state["rows"] is not None
    last = iterations - 1 if mid_iteration else iterations
    if position["iteration"] > last:
        outside("iteration", 0, last, f"this run has {iterations} iteration(s)")
    if mid_iteration and position["step_in_iteration"] > steps:
        outside("step_in_iteration", 0, steps, f"an iteration of this run has {steps} step(s)")
    if not mid_iteration and position["step_in_iteration"] != 0:
        outside("step_in_iteration", 0, 0, "the checkpoint refers to no iteration's rows, so it was "
                "written between iterations")
    expected = position["iteration"] * steps + position["step_in_iteration"]
    if exact and position["global_step"] != expected:
        outside("global_step", expected, expected, f"{position['iteration']} iteration(s) of {steps} "
                f"step(s) and {position['step_in_iteration']} step(s) into the next")
    if position["global_step"] < position["step_in_iteration"]:
        outside("global_step", position["step_in_iteration"], 2**53 - 1, "at least the steps of this "
                "iteration")
    return dict(position)


def restoring(checkpoint: str, field: str):
    """A context in which restoring the state's `field` (optimizer, scheduler, rng) turns the
    errors a crafted value gives (TypeError, KeyError, ...) into a CheckpointError naming it."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (TypeError, KeyError, ValueError, IndexError, RuntimeError, AttributeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{os.path.join(checkpoint, STATE_JSON)}: field {field} cannot be "
                                  f"restored ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                                  "start over with --no-resume") from None

    return guard()


def check_restored(optimizer, scheduler, checkpoint: str, *, sharded: bool = False) -> None:
    """Refuses (CheckpointError naming the field) a restored optimizer or scheduler state that
    loaded but would fail (or mislead) at the next step: moment tensors whose shape is not their
    parameter's, a step count that is not a number, a schedule position that is not an int."""
    where = os.path.join(checkpoint, STATE_JSON)
    if not sharded:  # under FSDP the state is a sharded copy, checked by torch's own loading
        for group in optimizer.param_groups:
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        if value.dim() and value.shape != param.shape:
                            raise CheckpointError(f"{where}: field optimizer ({key}) has shape {tuple(value.shape)} "
                                                  f"for a parameter of shape {tuple(param.shape)}; start over with "
                                                  "--no-resume")
                    elif isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise CheckpointError(f"{where}: field optimizer ({key}) is {value!r}, not a number; "
                                              "start over with --no-resume")
    last = getattr(scheduler, "last_epoch", 0)
    if isinstance(last, bool) or not isinstance(last, int) or last < 0:
        raise CheckpointError(f"{where}: field scheduler.last_epoch is {last!r}, not a step count; start over "
                              "with --no-resume")
    for lr in getattr(scheduler, "base_lrs", []):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise CheckpointError(f"{where}: field scheduler.base_lrs holds {lr!r}, not a learning rate; "
                                  "start over with --no-resume")


def check_finite_weights(model, *, dist=None, device=None, where: str = "the model") -> None:
    """Refuses (NonFiniteTrainingError) to go on with a model holding a NaN or infinite
    parameter, before it is saved: one reduction over the parameters and one read of its
    result (under torchrun, the ranks' results summed, so that every rank stops alike)."""
    flags = []
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # a sharded parameter's shard
        if local.numel():
            flags.append(torch.isfinite(local.detach()).all())
    bad = torch.zeros((), dtype=torch.float32, device=device) if device is not None else torch.zeros(())
    if flags:
        bad = (~torch.stack([f.to(bad.device) for f in flags]).all()).to(torch.float32)
    if dist is not None and getattr(dist, "world", 1) > 1:
        torch.distributed.all_reduce(bad)
    if float(bad):
        raise NonFiniteTrainingError(f"{where} holds NaN or infinite weights: not saved")


def config_differences(saved: dict, current: dict, *, defaults: dict | None = None,
                       free=RESUME_FREE_FIELDS) -> list:
    """'field: old -> new' for every config field that differs and changes what is trained (every
    field but `free`). A field the saved config lacks (added since) counts as its default there."""
    saved = {**(defaults or {}), **saved}
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if key not in free and saved.get(key) != current.get(key)]


def load_checkpoint(path, model, *, config=None, allow_config_change: bool = False) -> dict:
    """Restores the model weights; returns the trainer state.

    Refuses (CheckpointError) a checkpoint saved from a different model, one that is not
    data only, and, when `config` is given, one saved by a run whose configuration differs
    (naming the fields) unless allow_config_change; then state["config_changes"] lists them.
    """
    state = read_trainer_state(path)
    if state["fingerprint"] != model_fingerprint(model):
        raise CheckpointError(f"checkpoint {path} was saved from another model "
                              f"(fingerprint {state['fingerprint']} != {model_fingerprint(model)})")
    changes = []
    if config is not None:
        changes = config_differences(state["config"], dataclasses.asdict(config),
                                     defaults=dataclasses.asdict(type(config)()))
        if changes and not allow_config_change:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with other settings "
                f"({'; '.join(changes)}): rerun with the same settings, start over "
                "(gapfix train --no-resume), or continue with the new settings "
                "(gapfix train --resume-with-changed-config)")
    state["config_changes"] = changes
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = {}
    model_dir = os.path.join(path, "model")
    if not _inside(model_dir, path) or not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: missing from checkpoint {path}")
    for file in sorted(os.listdir(model_dir)):
        if file.endswith(".safetensors"):
            file_path = _checked_file(os.path.join(model_dir, file), path)
            try:
                weights.update(load_file(file_path))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file_path}: not a readable safetensors file ({err})") from None
    if hasattr(model, "peft_config"):
        # a PEFT model saves its adapter only (PEFT's format, its own key names): load it the
        # PEFT way; the frozen base came from the base model folder
        from peft import set_peft_model_state_dict

        loaded = set_peft_model_state_dict(model, weights)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        missing = [] if weights else trainable[:5]
        unexpected = list(loaded.unexpected_keys)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # tied output weights are saved once; anything else missing is a real mismatch
        missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return state


def _is_tied(model, key):
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight and key.endswith(
        "weight") and "lm_head" in key
