"""Shared helpers for the model benchmarks: presets, environment record, FLOP counts, JSON lines.

Every benchmark prints one JSON line per measurement (``emit``) with the device, torch version, git commit
and UTC date, so results pasted into RESULTS.md carry their provenance.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omnibyte.model.flops import train_flops_per_step  # noqa: E402,F401  (the benchmarks' MFU count)

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (the MFU denominator)

# The reference's released 360M configuration (MBLM, Egli et al. 2025): 2 stages, seq_lens [1024, 8],
# hidden_dims [1024, 1024], num_layers [25, 21]; Mamba-2 global (d_state 128, d_conv 4, expand 2,
# headdim 64) and Transformer local (16 heads x 64, RoPE). mblm's local feed-forward is a GELU MLP with
# hidden 2 * width (8.4M parameters per layer with attention); our SwiGLU with hidden 1344 matches it.
PRESETS = {
    "mblm360m": dict(stages=[
        dict(length=1024, width=1024, layers=25,
             block=dict(name="mamba2", d_state=128, d_conv=4, expand=2, headdim=64)),
        dict(length=8, width=1024, layers=21,
             block=dict(name="transformer", heads=16, head_dim=64, mlp_hidden=1344)),
    ]),
    # mblm's small CPU config: 8,192 bytes, width 256, 2 + 2 layers, Mamba global (mblm's documented block
    # settings: d_state 128, d_conv 4, expand 2, headdim 64) + Transformer local (4 heads x 64)
    "small": dict(stages=[
        dict(length=1024, width=256, layers=2, block=dict(name="mamba2", d_state=128, d_conv=4, expand=2, headdim=64)),
        dict(length=8, width=256, layers=2, block=dict(name="transformer", heads=4, head_dim=64, mlp_hidden=320)),
    ]),
    # a small random-weight drafter for the speculative-decoding benchmark's machinery runs (same patches as small)
    "tiny": dict(stages=[
        dict(length=1024, width=64, layers=1, block=dict(name="mamba2", d_state=16, d_conv=4, expand=2, headdim=32)),
        dict(length=8, width=64, layers=1, block=dict(name="transformer", heads=2, head_dim=32, mlp_hidden=128)),
    ]),
    # the same with d_state 16 (a Mamba-1-sized state), to show how the ratio depends on it
    "small_s16": dict(stages=[
        dict(length=1024, width=256, layers=2, block=dict(name="mamba2", d_state=16, d_conv=4, expand=2, headdim=64)),
        dict(length=8, width=256, layers=2, block=dict(name="transformer", heads=4, head_dim=64, mlp_hidden=320)),
    ]),
    # the shipped research-size model (configs/pg19_lm.yaml; clevr_vqa_base.yaml has the same model), 15.8M:
    # Mamba-2 global 512 x 6, Transformer local 256 x 4, patches of 8 (train with --batch 16 --length 8192)
    "pg19_lm": dict(stages=[
        dict(length=1024, width=512, layers=6, block=dict(name="mamba2", d_state=128, d_conv=4, expand=2, headdim=64)),
        dict(length=8, width=256, layers=4, block=dict(name="transformer", heads=4)),
    ]),
    # the same model at a CLEVR PNG row (question + ~2.7 KB PNG + answer: the 3,072-byte bucket), batch 16 as
    # clevr_vqa_base.yaml
    "clevr": None,
    # the 3-stage family of the context-length benchmark: widths 1024/512/256, layers 6/4/2, patches x64 x8
    "ctx3": dict(stages=[
        dict(length=1024, width=1024, layers=6,
             block=dict(name="mamba2", d_state=128, d_conv=4, expand=2, headdim=64)),
        dict(length=64, width=512, layers=4, block=dict(name="transformer", heads=8, head_dim=64)),
        dict(length=8, width=256, layers=2, block=dict(name="transformer", heads=4, head_dim=64)),
    ]),
}

# the same presets for mblm 0.4.2 (MBLMModelConfig kwargs + per-stage blocks)
MBLM_PRESETS = {
    "mblm360m": dict(hidden_dims=[1024, 1024], num_layers=[25, 21], seq_lens=[1024, 8],
                     blocks=[dict(kind="mamba", d_state=128, d_conv=4, expand=2, headdim=64),
                             dict(kind="transformer", heads=16, head_dim=64)]),
    "small": dict(hidden_dims=[256, 256], num_layers=[2, 2], seq_lens=[1024, 8],
                  blocks=[dict(kind="mamba", d_state=128, d_conv=4, expand=2, headdim=64),
                          dict(kind="transformer", heads=4, head_dim=64)]),
    "small_s16": dict(hidden_dims=[256, 256], num_layers=[2, 2], seq_lens=[1024, 8],
                      blocks=[dict(kind="mamba", d_state=16, d_conv=4, expand=2, headdim=64),
                              dict(kind="transformer", heads=4, head_dim=64)]),
    "pg19_lm": dict(hidden_dims=[512, 256], num_layers=[6, 4], seq_lens=[1024, 8],
                    blocks=[dict(kind="mamba", d_state=128, d_conv=4, expand=2, headdim=64),
                            dict(kind="transformer", heads=4, head_dim=64)]),
    "clevr": None,
    "ctx3": dict(hidden_dims=[1024, 512, 256], num_layers=[6, 4, 2], seq_lens=[1024, 64, 8],
                 blocks=[dict(kind="mamba", d_state=128, d_conv=4, expand=2, headdim=64),
                         dict(kind="transformer", heads=8, head_dim=64),
                         dict(kind="transformer", heads=4, head_dim=64)]),
}

PRESETS["clevr"] = PRESETS["pg19_lm"]
MBLM_PRESETS["clevr"] = MBLM_PRESETS["pg19_lm"]
# a preset's training shape (batch, bytes per row) when --batch / --length are not given
SHAPES = {"mblm360m": (6, 8192), "pg19_lm": (16, 8192), "clevr": (16, 3072)}


@functools.lru_cache(maxsize=1)
def git_commit() -> str:  # once per process: every emitted row records it
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        lines = out.stdout.split()
        # a copy of the tree inside another checkout (the device's snapshot folder) is not that checkout's HEAD
        if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != Path(ROOT).resolve():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return lines[1] + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def use_device(device: str) -> str:
    """Make ``device`` (e.g. ``cuda:1``) the current CUDA device, so that every call without a device (peak memory
    statistics, synchronisation, capture) is about the one the benchmark runs on, not GPU 0; returns it."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    return device


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _finite(value, path: str, bad: list[str]):
    """``value`` with every NaN / infinite float (nested dicts and lists too) replaced by None; their paths go to
    ``bad``."""
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path or "<row>")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    return value


def emit(record: dict, out: str | None = None) -> None:
    """Print (and append to ``out``) one JSON line, strict JSON. A NaN or infinity (not JSON; e.g. the loss of a
    step whose kernels read garbage, which max_context reports as ``bad_values``) is written as null and its
    field named in ``nonfinite`` (and on stderr), so the row is kept and says what it lacks; a ratio over zero
    belongs in a row as null in the first place, never as a made-up figure."""
    bad: list[str] = []
    record = _finite(dict(record), "", bad)
    if bad:
        record["nonfinite"] = bad
        print(f"benchmark row {record.get('bench')}: non-finite {', '.join(bad)} written as null", file=sys.stderr)
    record.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    # OMNIBYTE_COMMIT when set (the device copy: its .git can be stale -- device rows of f23c7a5 said 242ac0d-dirty --
    # and a snapshot folder inside another checkout is not that checkout's HEAD), else git's answer (-dirty for a
    # modified tree) where the benchmarks' tree is a checkout's root
    record.setdefault("commit", os.environ.get("OMNIBYTE_COMMIT") or git_commit())
    record.setdefault("torch", torch.__version__)
    line = json.dumps(record, allow_nan=False)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def now() -> float:
    return time.perf_counter()


def build_omnibyte(preset: str, **over):
    from omnibyte import build_model

    cfg = dict(PRESETS[preset])
    cfg.update(over)
    return build_model(cfg)


def build_mblm(preset: str, vocab: int = 257, pad: int = 256, checkpoint_chunks=None):
    """mblm 0.4.2 on the same configuration. Its Mamba-2 mixers are switched to the unfused path
    (``use_mem_eff_path=False``): the fused path needs causal-conv1d's compiled extension, absent here."""
    from mblm import MBLM, MambaBlock, MBLMModelConfig, TransformerBlock

    p = MBLM_PRESETS[preset]
    blocks = []
    for b in p["blocks"]:
        if b["kind"] == "mamba":
            blocks.append(MambaBlock(d_state=b["d_state"], d_conv=b["d_conv"], expand=b["expand"],
                                     headdim=b["headdim"], pos_emb_type=None))
        else:
            blocks.append(TransformerBlock(attn_head_dims=b["head_dim"], attn_num_heads=b["heads"],
                                           attn_use_rot_embs=True, use_flash_attn=True, pos_emb_type=None))
    cfg = MBLMModelConfig(num_tokens=vocab, pad_token_id=pad, hidden_dims=p["hidden_dims"],
                          num_layers=p["num_layers"], seq_lens=p["seq_lens"], block=blocks,
                          train_checkpoint_chunks=checkpoint_chunks)
    model = MBLM(cfg)
    for mod in model.modules():
        if hasattr(mod, "use_mem_eff_path"):
            mod.use_mem_eff_path = False
    return model


def stub_selective_scan_cuda() -> None:
    """mblm imports ``mamba_ssm`` whose __init__ needs the compiled ``selective_scan_cuda`` (Mamba-1 only).
    For the side-by-side run we give that import an empty module so mblm gets its Mamba-2 path (which
    never calls it) instead of silently falling back to the pure-PyTorch Mamba-1 package."""
    import types

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
