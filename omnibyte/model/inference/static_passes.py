"""The speculative round loop's backend on the kept GraphStepper (:class:`StaticPasses`) and the loop over it
(:func:`generate_static`, ``generate(..., draft=..., graph_verify=True)``): plain steps as the stepper's graphed
step, verification passes through :class:`~omnibyte.model.inference.graph_verify.StaticVerifier`."""

from __future__ import annotations

import logging

import torch

from ... import vocab
from .graph_verify import StaticVerifier, check_supported, verifier
from .speculative import rounds, verify

log = logging.getLogger("omnibyte.model")


class StaticPasses:
    """The round loop's backend (:func:`~omnibyte.model.inference.speculative.rounds`) on the kept GraphStepper:
    plain steps as the stepper's (graphed) step, verification passes of fixed T = 1 + ``draft_len`` through the
    :class:`StaticVerifier` (shorter drafts padded, their logits ignored), and until the stepper holds Q_0 bytes the
    eager pass on its state. The prefill runs eagerly on ``state`` (the stepper's), as plain decoding's.

    ``aligned`` (``generate(..., graph_verify="aligned")``): patch-aligned passes. A pass that
    crosses a patch boundary runs the local stage twice (once per within-patch segment) and the global step
    between; where the weights' reads are the cost (a large model) each local segment costs about one plain byte's
    step, so a pass of T = 9 over 8-byte patches costs two bytes' steps and a global step, whatever is kept. Aligned,
    each round drafts at most up to the end of the current patch (``room``): every pass is one local segment (after
    a global step where it starts a patch), T = 1 + min(draft_len, room) for its start phase (so still one CUDA
    graph per phase), and a phase with no room takes a plain step. The output is the same either way (the drafts
    are only shorter)."""

    def __init__(self, decoder, state, stepper, ver: StaticVerifier, draft_len: int, aligned: bool = False):
        self.decoder, self.state, self.stepper, self.ver = decoder, state, stepper, ver
        self.aligned = aligned
        self.device = decoder.model.head.weight.device
        self.B, self.draft_len = state.tokens.shape[0], draft_len
        self.toks: dict[int, torch.Tensor] = {}  # per pass length T: pinned host tokens (B, T)
        self.eager = None  # the eager Verification of the last pass, where the stepper held fewer than Q_0 bytes

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.decoder.feed(self.state, prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # the stepper: eager until it holds Q_0 bytes
        return self.stepper.feed(tokens)

    def _convert(self) -> None:  # the eager state into the static buffers once it holds Q_0 bytes
        st = self.stepper
        if not st.ready and st.state.length >= st.Q0:
            st._convert()

    def room(self) -> int | None:
        """Aligned: the drafts that fit before the current patch ends (the next pass's steps all in one patch);
        else None (any number)."""
        self._convert()
        st = self.stepper
        if not (self.aligned and st.ready):
            return None
        return st.Q0 - 1 - (st.n + 1) % st.Q0

    def _length(self, n: int) -> int:
        """The static pass length for ``n`` tokens (the last kept byte and n - 1 drafts)."""
        room = self.room()
        T = 1 + (self.draft_len if room is None else min(self.draft_len, room))
        if n > T:
            raise ValueError(f"StaticPasses.verify: {n} tokens for a pass of {T} (draft_len {self.draft_len}, "
                             f"room {room})")
        return T

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        T = self._length(n)  # (room() first moves the eager state into the static buffers where it is due)
        toks = self.toks.get(T)
        if toks is None:
            toks = self.toks[T] = torch.full((self.B, T), vocab.PAD, dtype=torch.long,
                                             pin_memory=self.device.type == "cuda")
        toks.fill_(vocab.PAD)
        toks[:, :n] = tokens
        if self.stepper.ready:
            self.eager = None
            return self.ver.run(toks)[:, :n]
        self.eager = verify(self.decoder, self.stepper.state, toks[:, :n].to(self.device))
        return self.eager.logits

    def argmax(self) -> torch.Tensor:  # computed inside the static pass
        return self.ver.argmax if self.eager is None else self.eager.logits.argmax(-1)

    def rollback(self, keep: int) -> None:
        if self.eager is None:
            self.ver.rollback(keep)
        else:
            self.eager.rollback(keep)
            self.eager = None
        self._convert()


def generate_static(decoder, prompt, max_new: int, temperature, top_k, top_p, stop_tokens, generator, drafter,
                    draft_len: int, compile_step=False, aligned: bool = False) -> torch.Tensor:
    """The speculative loop (:func:`~omnibyte.model.inference.speculative.rounds`, the eager loop's) on the kept
    GraphStepper through :class:`StaticPasses`: verification passes of fixed T = 1 + ``draft_len`` through
    :class:`StaticVerifier` (``aligned``: patch-aligned, see :class:`StaticPasses`), rounds without drafts as the
    stepper's graphed step. None, before any work, where the
    model has no static verification (the caller then runs the eager passes)."""
    m = decoder.model
    B, device = prompt.shape[0], prompt.device
    state = decoder.new_state(B, device)
    try:
        check_supported(m)
        stepper = decoder.stepper(state, compile_step)  # NotImplementedError: no static step
        ver = verifier(stepper)
    except NotImplementedError as e:
        log.info("speculative decoding: no static verification (%s); eager passes", e)
        return None
    ver.pending = None  # (a pass interrupted by an exception in an earlier call)
    passes = StaticPasses(decoder, state, stepper, ver, draft_len, aligned)
    return rounds(passes, prompt, max_new, temperature, top_k, top_p, stop_tokens, generator, drafter, draft_len)
