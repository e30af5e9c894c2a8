"""What one static verification pass costs against one plain decode step (issue 17 item 2), on random weights.

    python benchmarks/verify_pass.py [--preset mblm360m] [--T 5,9] [--segments torch,kernels] [--reps 64]

Speculative decoding pays off when a round -- one verification pass of T = 1 + draft length tokens, its host
sync and rollback -- costs less than the plain steps of the bytes it keeps. That ratio depends on the weights only
through the bytes kept, so it can be measured without a trained model or a drafter: the kept GraphStepper
(graphed, compiled as ``generate(use_graphs=True, compile_step=True)``) steps plain bytes, then its
:class:`~omnibyte.model.inference.graph_verify.StaticVerifier` runs passes of each T from every start phase (the
argmax read on the host, ``rollback(1)``: the phases rotate), each pass captured before the timing. Plain steps
are timed back to back with no host read between them, so their cost is a lower bound and the byte counts below
are on the safe side.

One JSON line per (segments, T): milliseconds per plain step and per round, and the bytes a round must keep for the
speculative decoder to match plain decoding (``break_even_bytes``: their ratio) and to double it (``bytes_for_2x``;
a pass keeps at most T). ``--segments``: the passes' within-patch segments through the torch
ops (compiled with the stepper) or through the decode kernels (``StaticVerifier.kernel_segments``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import build_omnibyte, device_name, emit, now, sync


def _time_steps(gs, tok, n: int, dev: str) -> float:
    sync(dev)
    t0 = now()
    for _ in range(n):
        gs.feed(tok)
    sync(dev)
    return (now() - t0) / n


def _time_rounds(ver, toks, Q0: int, reps: int) -> float:
    """Median over start phases of the seconds per round (pass, argmax to the host, rollback(1))."""
    per_phase: dict[int, list[float]] = {}
    for i in range(reps + Q0):  # the first Q0 rounds capture each phase's graph: untimed
        phase = (ver.st.n + 1) % Q0
        t0 = now()
        ver.run(toks)
        ver.argmax.cpu()  # the round loop reads the argmax every round (a sync)
        ver.rollback(1)
        if i >= Q0:
            per_phase.setdefault(phase, []).append(now() - t0)
    return statistics.median(statistics.median(v) for v in per_phase.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mblm360m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=1024, help="prompt bytes fed before the timings")
    p.add_argument("--T", default="5,9", help="pass lengths (1 + draft length), comma-separated")
    p.add_argument("--segments", default="torch,kernels", help="torch and/or kernels (see above)")
    p.add_argument("--reps", type=int, default=64, help="timed rounds per (segments, T); plain steps: the same")
    p.add_argument("--compile", type=int, default=None, help="compile the stepper's steps and the passes "
                   "(default: on CUDA)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    Ts = [int(t) for t in args.T.split(",")]
    modes = args.segments.split(",")
    if any(m not in ("torch", "kernels") for m in modes) or min(Ts) < 2 or args.reps < 1:
        p.error("--segments: torch and/or kernels; --T: lengths >= 2; --reps >= 1")
    from omnibyte.model.inference.graph_verify import StaticVerifier, verifier

    dev = args.device
    compile_step = dev.startswith("cuda") if args.compile is None else bool(args.compile)
    torch.manual_seed(0)
    model = build_omnibyte(args.preset).to(dev).to(getattr(torch, args.dtype)).eval()
    prompt = torch.randint(0, 256, (1, args.context), device=dev)
    with torch.no_grad():
        state = model.decoder.new_state(1, torch.device(dev))
        model.decoder.feed(state, prompt)
        gs = model.decoder.stepper(state, compile_step)
        Q0 = gs.Q0
        tok = prompt[:, -1:]
        _time_steps(gs, tok, 2 * Q0 + 1, dev)  # every phase's step captured / compiled
        step_s = _time_steps(gs, tok, args.reps, dev)
        for mode in modes:
            StaticVerifier.kernel_segments = mode == "kernels"
            ver = verifier(gs)
            if mode == "kernels" and not ver.kernels:
                print(f"verify_pass: no decode kernels on {dev}: the kernels row is skipped")
                continue
            for T in Ts:
                toks = torch.randint(0, 256, (1, T)).pin_memory() if dev.startswith("cuda") else \
                    torch.randint(0, 256, (1, T))
                round_s = _time_rounds(ver, toks, Q0, args.reps)
                emit(dict(bench="verify_pass", preset=args.preset, device=device_name(dev), dtype=args.dtype,
                          context=args.context, T=T, segments=mode, compiled=compile_step,
                          graphs=gs.use_graphs, step_kernels=gs.kernels, reps=args.reps,
                          step_ms=round(step_s * 1e3, 4), round_ms=round(round_s * 1e3, 4),
                          break_even_bytes=round(round_s / step_s, 2),
                          bytes_for_2x=round(2 * round_s / step_s, 2), captures=ver.captures), args.out)


if __name__ == "__main__":
    main()
