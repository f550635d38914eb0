"""Registers, spills and shared memory of every Triton kernel at the configurations the
launchers use on an H100 (sm_90), without a GPU: each kernel is lowered ahead of time
(triton.compile with an sm_90 target, as tests/test_cross_entropy.py's lowering test does)
and ptxas's own report of that compilation is parsed.

    python bench/kernel_report.py                 # table on stdout
    python bench/kernel_report.py --json out.json # and the rows as JSON
    python bench/kernel_report.py --ops rac_labels # one op's kernels

The compiled kernel's n_regs / n_spills attributes are filled only when the binary is loaded
on a GPU (CompiledKernel._init_handles); here the numbers come from `ptxas -v` of the same
compilation (triton.knobs.nvidia.dump_ptxas_log), which is where the driver's numbers come
from. ptxas is the CUDA toolkit's when CUDA_HOME/bin/ptxas (or /usr/local/cuda) exists
(TRITON_PTXAS_PATH otherwise Triton's bundled one); the version is printed.

Signatures are built from each kernel's argument names: pointers by the table below,
integers i32, float scalars fp32. A kernel that gains an argument this script does not know
fails loudly with its name (add it to POINTERS or SCALARS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # a real lowering, never the interpreter

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# pointer arguments: "act" = the activations' dtype, "dw" = the dW accumulator's, else fixed
POINTERS = {
    # cross_entropy
    "x_ptr": "act",
    "w_ptr": "act",
    "b_ptr": "act",
    "logits_ptr": "act",
    "dlogits_ptr": "act",
    "ids_ptr": "i64",
    "slot_w_ptr": "fp32",
    "lse_ptr": "fp32",
    "coef_p_ptr": "fp32",
    "coef_t_ptr": "fp32",
    "coef_s_ptr": "fp32",
    "row_scale_ptr": "fp32",
    "dx_ptr": "fp32",
    "dw_ptr": "dw",
    "db_ptr": "fp32",
    "part_max_ptr": "fp32",
    "part_sum_ptr": "fp32",
    "part_target_ptr": "fp32",
    "part_logit_sum_ptr": "fp32",
    "target_ptr": "fp32",
    "logit_sum_ptr": "fp32",
    # mix_embedding
    "weight_ptr": "act",
    "alt_ptr": "i64",
    "probs_ptr": "fp32",
    "mask_ptr": "u8",
    "eligible_ptr": "u8",
    "out_ptr": "act",
    "mixed_ptr": "u8",
    "grad_ptr": "act",
    "grad_weight_ptr": "dw",
    "sorted_rows_ptr": "i64",
    "order_ptr": "i64",
    "coef_ptr": "fp32",
    "seeds_ptr": "i64",
    # rac_labels
    "ref_ptr": "i32",
    "ref_lens_ptr": "i64",
    "index_ptr": "i32",
    "weights_ptr": "fp32",
}
SCALARS = {
    "softcap": "fp32",
    "filter_eps": "fp32",
    "seed": "i64",
    "threshold": "i64",
    "stride_row": "i64",
    "stride_grad": "i64",
}
INT_ARGS = {
    "N",
    "V",
    "H",
    "D",
    "E",
    "T",
    "K",
    "ref_width",
    "eos_id",
    "ignore_index",
    "v_per_split",
    "padding_idx",
    "ROW_LEN",
}


def _signature(fn, constexprs: dict, act: str, dw: str) -> dict:
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            if name not in constexprs:
                raise SystemExit(f"{fn.__name__}: constexpr {name} has no value in this report's configs")
            signature[name] = "constexpr"
        elif name in POINTERS:
            kind = POINTERS[name]
            signature[name] = "*" + {"act": act, "dw": dw}.get(kind, kind)
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        elif name in INT_ARGS or name.startswith(("n_", "stride")):
            signature[name] = "i32"
        else:
            raise SystemExit(f"{fn.__name__}: argument {name!r} is unknown to bench/kernel_report.py")
    return signature


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def lower(fn, constexprs: dict, options: dict, act: str, dw: str = "fp32") -> dict:
    """Compiles for sm_90 and returns registers, spill bytes, shared memory and warps."""
    constexprs = dict(constexprs)
    signature = _signature(fn, constexprs, act, dw)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET, options=options
        )
    text = log.getvalue()
    regs = _PTXAS_LINE.search(text)
    spill = _SPILL_LINE.search(text)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack_bytes": int(spill.group(1)) if spill else None,
        "spill_store_bytes": int(spill.group(2)) if spill else None,
        "spill_load_bytes": int(spill.group(3)) if spill else None,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
    }


def _launch_options(cfg: dict) -> tuple[dict, dict]:
    cfg = dict(cfg)
    return cfg, {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}


def cross_entropy_cases():
    from gapfix.kernels import cross_entropy as K

    n, v, h = 8192, 256_000, 2304  # the tile configs do not depend on the shape today
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        act = TRITON_DTYPE[dtype]
        precision = "ieee" if dtype == torch.float32 else "tf32"
        for variant, slots, extra in (("plain", 1, False), ("softcap+smooth+bias+4 slots", 4, True)):
            flags = {
                "NUM_SLOTS": slots,
                "HAS_BIAS": extra,
                "SOFTCAP": extra,
                "SMOOTH": extra,
                "DOT_PRECISION": precision,
                "DOT_FP32": False,
            }
            cfg, opts = _launch_options(K.linear_config(dtype, n, v, h, True))
            yield (
                "linear_ce_forward_kernel",
                f"{act} {variant}",
                K.linear_ce_forward_kernel,
                dict(flags, **cfg),
                opts,
                act,
                "fp32",
                cfg,
            )
            cfg, opts = _launch_options(K.linear_config(dtype, n, v, h, True, backward=True))
            needs = [("dx+dW", True, True)] + (
                [("dx only (frozen head)", True, False), ("dW only", False, True)] if not extra else []
            )
            dws = ["fp32"] + ([act] if dtype != torch.float32 and not extra else [])
            for need_name, need_dx, need_dw in needs:
                for dw in dws:
                    if dw != "fp32" and not need_dw:
                        continue
                    bwd = dict(flags, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=extra, FILTER=extra, **cfg)
                    yield (
                        "linear_ce_backward_kernel",
                        f"{act} {variant}, {need_name}, dW {dw}",
                        K.linear_ce_backward_kernel,
                        bwd,
                        opts,
                        act,
                        dw,
                        cfg,
                    )
        for variant, slots, extra in (("plain", 1, False), ("softcap+smooth+4 slots", 4, True)):
            flags = {"NUM_SLOTS": slots, "SOFTCAP": extra, "SMOOTH": extra, "BLOCK_V": K.row_block(v)}
            for kernel in (K.ce_forward_kernel, K.ce_backward_kernel):
                yield (
                    kernel.__name__,
                    f"{act} {variant}",
                    kernel,
                    flags,
                    {"num_warps": K.ROW_WARPS},
                    act,
                    "fp32",
                    {"BLOCK_V": flags["BLOCK_V"]},
                )


def mix_embedding_cases():
    from gapfix.kernels import mix_embedding as M

    n, d = 16384, 4096
    block_n, block_d = M.launch_config(n, d)
    for dtype in (torch.bfloat16, torch.float32):
        act = TRITON_DTYPE[dtype]
        for soft, k in ((False, 1), (True, 4)):
            flags = {
                "K": k,
                "SOFT": soft,
                "HAS_MASK": False,
                "HAS_ELIGIBLE": True,
                "ROW_SEEDS": False,
                "BLOCK_N": block_n,
                "BLOCK_D": block_d,
            }
            yield (
                "mix_embedding_fwd_kernel",
                f"{act} {'soft K=4' if soft else 'hard'}",
                M.mix_embedding_fwd_kernel,
                flags,
                {"num_warps": 4},
                act,
                act,
                flags,
            )
    for soft, k in ((False, 1), (True, 4)):
        flags = {"K": k, "SOFT": soft, "BLOCK_N": block_n, "BLOCK_D": block_d}
        yield (
            "mix_embedding_bwd_atomic_kernel",
            f"fp32 {'soft K=4' if soft else 'hard'}",
            M.mix_embedding_bwd_atomic_kernel,
            flags,
            {"num_warps": 4},
            "fp32",
            "fp32",
            flags,
        )
    flags = {"K": 1, "HAS_COEF": False, "CHUNK": M.SORTED_CHUNK, "BLOCK_D": M.sorted_block_d(d)}
    yield (
        "mix_embedding_bwd_sorted_kernel",
        "bf16 hard",
        M.mix_embedding_bwd_sorted_kernel,
        flags,
        {"num_warps": 4},
        "bf16",
        "bf16",
        flags,
    )


def rac_labels_cases():
    from gapfix.kernels.rac_labels import rac_labels_kernel

    for soft, block_k, has_lens in ((False, 1, True), (True, 4, True), (True, 8, True)):
        flags = {
            "HAS_REF_LENS": has_lens,
            "SOFT": soft,
            "BLOCK_ROWS": 512 if not soft else 2048 // block_k**2,
            "BLOCK_K": block_k,
        }
        yield (
            "rac_labels_kernel",
            f"{'soft' if soft else 'hard'} K<={block_k}",
            rac_labels_kernel,
            flags,
            {},
            "i32",
            "fp32",
            flags,
        )


def _ptxas() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "ptxas")
    return os.environ.get("TRITON_PTXAS_PATH") or (candidate if os.path.exists(candidate) else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    families = {
        "cross_entropy": cross_entropy_cases,
        "mix_embedding": mix_embedding_cases,
        "rac_labels": rac_labels_cases,
    }
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=list(families),
        default=list(families),
        help="which ops' kernels (default: all)",
    )
    args = parser.parse_args(argv)
    ptxas = _ptxas()
    if ptxas:
        os.environ["TRITON_PTXAS_PATH"] = ptxas
    rows = []
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache  # compile, never read an earlier result: ptxas must run
        knobs.nvidia.dump_ptxas_log = True
        if ptxas:
            knobs.nvidia.ptxas = ptxas
        version = (
            subprocess.run([ptxas or "ptxas", "--version"], capture_output=True, text=True, check=False)
            .stdout.strip()
            .splitlines()
        )
        print(
            f"triton {triton.__version__}, sm_90, ptxas {ptxas or '(Triton bundled)'}: "
            f"{version[-1] if version else '?'}"
        )
        header = f"{'kernel':<34} {'config':<52} {'tiles':<34} warps stages regs spill(st/ld) smem KiB"
        print(header)
        for cases in (families[op]() for op in args.ops):
            for name, variant, fn, constexprs, opts, act, dw, tiles in cases:
                got = lower(fn, constexprs, opts, act, dw)
                tile_text = " ".join(
                    f"{k.removeprefix('BLOCK_')}={v}"
                    for k, v in tiles.items()
                    if k.startswith(("BLOCK", "GROUP"))
                )
                rows.append(dict(kernel=name, config=variant, tiles=tile_text, **got))
                spill = f"{got['spill_store_bytes']}/{got['spill_load_bytes']}"
                print(
                    f"{name:<34} {variant:<52} {tile_text:<34} {got['num_warps']:>5} {got['num_stages']:>6} "
                    f"{got['regs']!s:>4} {spill:>12} {got['shared_bytes'] / 1024:8.1f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
