"""Progress bars only on a terminal: no carriage-return updates in log files (clevr-synth, VQA evaluation)."""

from __future__ import annotations

import io
import sys

import pytest

from omnibyte.tasks.clevr_synth import generate


class _NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_clevr_synth_bar_stays_off_a_non_terminal(tmp_path, monkeypatch):
    err = _NotATerminal()
    monkeypatch.setattr(sys, "stderr", err)
    generate(tmp_path / "out", images=2, questions_per_image=2, seed=0, size=(32, 24), splits=("train",),
             progress=True, render=False)
    assert "\r" not in err.getvalue()


def test_vqa_eval_bar_stays_off_a_non_terminal(monkeypatch):
    pytest.importorskip("torch")
    from omnibyte.tasks.vqa_eval import evaluate_vqa

    class Model:  # no items: only the bar's creation and closing are exercised
        device, training = "cpu", False

        def eval(self):
            return self

        def train(self, mode: bool = True):
            return self

    err = _NotATerminal()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        evaluate_vqa(Model(), [], split="val", labels=["yes", "no"], mode="generate", progress=True)
    except (ValueError, ZeroDivisionError, KeyError):
        pass  # what an empty split gives is not this test's business
    assert "\r" not in err.getvalue()
