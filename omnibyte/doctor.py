"""What this machine offers a run: Python, torch and its CUDA build, CUDA devices, the optional kernels
(Triton, mamba-ssm, causal-conv1d) and the data/tracking packages, and which Mamba-2 path and attention
backend a run would use here (``omnibyte doctor``).

:func:`collect` returns a JSON-able dict; :func:`report_lines` turns it into plain lines. Nothing here raises
for a missing package: it is reported as ``not installed`` or ``unavailable (reason)``.

The Mamba-2 path is decided the way a run decides it: on CUDA by
:func:`omnibyte.model.blocks.mamba2.load_mamba_kernels` itself (its logged reason is kept when it falls back
to the torch twin). The attention rules are those of :mod:`omnibyte.model.blocks.transformer`: SDPA for
sequences longer than ``Attention.short`` positions, the matrix-product path up to it, and FlexAttention
packing for those short sequences when the layers are compiled (``train.compile=true``) on CUDA.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import platform
import sys
import warnings
from typing import Any

#: (report name, import name, distribution name, optional)
PACKAGES: tuple[tuple[str, str, str, bool], ...] = (
    ("triton", "triton", "triton", False),
    ("mamba-ssm", "mamba_ssm", "mamba-ssm", False),
    ("causal-conv1d", "causal_conv1d", "causal-conv1d", False),
    ("pyspng", "pyspng", "pyspng", False),
    ("webdataset", "webdataset", "webdataset", False),
    ("h5py", "h5py", "h5py", False),
    ("wandb", "wandb", "wandb", True),
)
#: packages only looked up, never imported: importing mamba-ssm runs its __init__, which needs the compiled
#: extension (the run loads its Triton kernels without it, see load_mamba_kernels); wandb is slow to import
_NOT_IMPORTED = ("mamba_ssm", "wandb")
#: compiled CUDA extensions of the kernel packages (import names)
_COMPILED = {"mamba_ssm": "selective_scan_cuda", "causal_conv1d": "causal_conv1d_cuda"}


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_status(mod: str, dist: str, optional: bool = False) -> dict[str, Any]:
    """``installed``, ``version``, ``importable`` (None: not tried), ``error`` and, for the kernel packages,
    ``compiled_ext`` (whether its compiled CUDA extension is present)."""
    out: dict[str, Any] = {"installed": _find(mod), "version": None, "importable": None, "error": None,
                           "optional": optional}
    if mod in _COMPILED:
        out["compiled_ext"] = _find(_COMPILED[mod]) if out["installed"] else False
    if not out["installed"]:
        return out
    out["version"] = _version(dist)
    if mod in _NOT_IMPORTED:
        return out
    try:
        m = importlib.import_module(mod)
        out["importable"] = True
        out["version"] = out["version"] or getattr(m, "__version__", None)
    except Exception as e:  # noqa: BLE001 - a broken install is reported, never raised
        out["importable"], out["error"] = False, f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def torch_status() -> dict[str, Any]:
    """torch's version and CUDA build; CUDA availability (with the reason when not) and the devices."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"installed": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                "cuda": {"available": False, "reason": "torch is not importable", "devices": []}}
    cuda: dict[str, Any] = {"available": False, "reason": None, "devices": []}
    with warnings.catch_warnings():  # "CUDA initialization: ... no driver" warnings: the reason says it
        warnings.simplefilter("ignore")
        try:
            available = torch.cuda.is_available()
        except Exception as e:  # noqa: BLE001
            available, cuda["reason"] = False, f"{type(e).__name__}: {e}".splitlines()[0]
    if available:
        cuda["available"] = True
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    elif cuda["reason"] is None:
        cuda["reason"] = ("torch is a CPU-only build" if not torch.version.cuda
                          else "no CUDA device visible: no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda, "cudnn": cudnn,
            "cuda": cuda}


def mamba_path(cuda_available: bool) -> dict[str, Any]:
    """Which Mamba-2 path a run would take here: ``torch twin``, ``triton unfused`` or ``triton fused``."""
    if not cuda_available:
        return {"path": "torch twin", "reason": "no CUDA; the Triton kernels run on CUDA only"}
    try:
        from .model.blocks.mamba2 import load_mamba_kernels
    except Exception as e:  # noqa: BLE001
        return {"path": "torch twin", "reason": f"omnibyte's Mamba-2 block does not import: {type(e).__name__}: {e}"}
    reasons: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(record.getMessage())

    logger = logging.getLogger("omnibyte.model")
    handler, level = _Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        K = load_mamba_kernels()
    except Exception as e:  # noqa: BLE001
        K, reasons = None, [f"{type(e).__name__}: {e}"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if K is None:
        why = reasons[-1].removeprefix("mamba2: ") if reasons else "the kernels did not load"
        return {"path": "torch twin", "reason": why}
    if K.fused:
        return {"path": "triton fused", "reason": "mamba_split_conv1d_scan_combined with causal-conv1d's compiled "
                "extension (training / eval forward); prefill with a cache: triton unfused; decode: "
                "selective_state_update"}
    conv = "causal-conv1d" if K.causal_conv1d_fn is not None else "a compiled torch causal conv"
    return {"path": "triton unfused", "reason": f"{conv} + mamba_chunk_scan_combined + Triton gated RMSNorm; "
            "not fused: causal-conv1d's compiled extension is missing; decode: selective_state_update"}


def attention_backend(cuda: dict[str, Any]) -> dict[str, Any]:
    """The Transformer stages' attention here: SDPA (long sequences), the matrix-product path (short ones)
    and whether FlexAttention would pack the short ones (compiled layers on CUDA)."""
    try:
        import torch

        from .model.blocks.transformer import Attention
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    short = int(Attention.short)
    out: dict[str, Any] = {"short_max": short,
                           "long": f"SDPA (scaled_dot_product_attention) for sequences over {short} positions",
                           "short": f"matrix-product attention for sequences of at most {short} positions"}
    if cuda.get("available"):
        kernels = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                         ("cuDNN", getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)()),
                                         ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                         ("math", torch.backends.cuda.math_sdp_enabled())) if on]
        out["sdpa_kernels"] = kernels
        out["long"] += f" (CUDA kernels enabled: {', '.join(kernels) or 'none'}; torch picks per call)"
    else:
        out["long"] += " (CPU kernels)"
    if Attention.short_impl != "flex":
        out["flex"] = {"used": False, "reason": f"Attention.short_impl={Attention.short_impl!r}"}
    elif not cuda.get("available"):
        out["flex"] = {"used": False, "reason": "no CUDA"}
    elif importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        out["flex"] = {"used": False, "reason": f"torch {torch.__version__} has no FlexAttention"}
    else:
        out["flex"] = {"used": "with train.compile=true",
                       "reason": "compiled layers pack short sequences into FlexAttention rows"}
    return out


def collect() -> dict[str, Any]:
    """Everything :func:`report_lines` prints, as a JSON-able dict."""
    from . import __version__

    t = torch_status()
    cuda = t.pop("cuda")
    return {
        "omnibyte": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": t,
        "cuda": cuda,
        "packages": {name: package_status(mod, dist, opt) for name, mod, dist, opt in PACKAGES},
        "mamba2": mamba_path(cuda["available"]),
        "attention": attention_backend(cuda),
    }


def _package_line(name: str, s: dict[str, Any]) -> str:
    opt = " (optional)" if s.get("optional") else ""
    if not s["installed"]:
        return f"{name}{opt}: not installed"
    v = s.get("version") or "version unknown"
    if s.get("importable") is False:
        ext = ", no compiled CUDA extension" if s.get("compiled_ext") is False else ""
        return f"{name}{opt}: {v}{ext}, unavailable ({s['error']})"
    extra = ""
    if "compiled_ext" in s:
        extra = (", compiled CUDA extension present" if s["compiled_ext"] else
                 ", no compiled CUDA extension" + (" (runs load its Triton kernels without it)"
                                                   if name == "mamba-ssm" else ""))
    return f"{name}{opt}: {v}{extra}"


def report_lines(r: dict[str, Any]) -> list[str]:
    """Plain readable lines of a :func:`collect` report."""
    t, cuda = r["torch"], r["cuda"]
    lines = [f"omnibyte {r['omnibyte']}", f"python: {r['python']['version']} ({r['python']['executable']})",
             f"platform: {r['platform']}"]
    if t.get("installed"):
        build = f"CUDA {t['cuda_build']} build" if t.get("cuda_build") else "CPU-only build"
        cudnn = f", cuDNN {t['cudnn']}" if t.get("cudnn") else ""
        lines.append(f"torch: {t['version']} ({build}{cudnn})")
    else:
        lines.append(f"torch: unavailable ({t.get('error')})")
    if cuda["available"]:
        lines.append(f"CUDA: available, {len(cuda['devices'])} device(s)")
        lines += [f"  cuda:{d['index']}: {d['name']} (compute capability {d['capability']}, {d['memory_gib']} GiB)"
                  for d in cuda["devices"]]
    else:
        lines.append(f"CUDA: unavailable ({cuda['reason']})")
    lines += [_package_line(name, s) for name, s in r["packages"].items()]
    m = r["mamba2"]
    lines.append(f"Mamba-2 path: {m['path']} ({m['reason']})")
    a = r["attention"]
    if "error" in a:
        lines.append(f"attention: unavailable ({a['error']})")
    else:
        f = a["flex"]
        flex = (f"FlexAttention for them {f['used']} ({f['reason']})" if f["used"]
                else f"FlexAttention not used ({f['reason']})")
        lines += [f"attention (Transformer stages): {a['long']}", f"  {a['short']}; {flex}"]
    return lines


__all__ = ["collect", "report_lines", "package_status", "torch_status", "mamba_path", "attention_backend"]
