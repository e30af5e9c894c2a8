"""mamba-ssm's real Triton kernels against the twin on CPU, through Triton's interpreter (tests/interpreted_kernels.py,
in a fresh process with TRITON_INTERPRET=1): dense and modality-aware Mamba-2 mixers, without a cache (forward
and gradients), a prefill into a cache and single steps, and the same input in segments (as inputs past the
kernels' int32 offsets run: mamba2.INDEX_LIMIT lowered). Exact fp32 dots there, so tolerances are tight. Needs
mamba-ssm's Python files (README: the install line without a CUDA compile) and einops; skipped without them.
It found the modality-aware step path's crash (mamba-ssm's selective_state_update needs a dt_bias)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # ~15 s: the interpreter runs every kernel program in Python
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mamba_ssm", "einops", "triton")),
                    reason="needs mamba-ssm's Python files, einops and triton")
def test_real_kernels_match_the_twin_in_the_triton_interpreter():
    script = Path(__file__).with_name("interpreted_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = {r["case"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert set(cases) == {"dense", "aware"}
    for r in cases.values():
        assert r["forward"] < 1e-5 and r["cached"] < 1e-5 and r["grad_rel"] < 1e-4, r
        seg = r["segmented"]  # past the kernels' int32 offsets: segments carrying conv history and scan state
        assert seg["forward"] < 1e-5 and seg["grad_rel"] < 1e-4 and seg["cache"] < 1e-5, r
