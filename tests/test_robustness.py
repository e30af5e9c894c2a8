"""Noise-robustness evaluation: every corruption (determinism, seeds, rates, UTF-8, identity at p=0, bad input),
image corruptions touching only image bytes, and `omnibyte robustness` end to end on tiny CPU runs."""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_overrides import TINY_MBLM, quick

from omnibyte.cli import main
from omnibyte.config import ConfigError
from omnibyte.registry import SERIALIZERS
from omnibyte.robustness.corruptions import (
    CORRUPTIONS,
    corrupt_image_file,
    corrupt_stream,
    corrupt_text,
    image_positions,
    parse,
    rng_for,
)
from omnibyte.robustness.evaluate import CorruptingSerializer, Plan
from omnibyte.vocab import Modality

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
MULTI = "naïve café 東京 😀 Straße "
RANDOM_TEXT = ("drop:0.3", "repeat:0.3", "swap:0.3", "uppercase:0.3", "random_case")


def _letters(n: int, seed: int = 0) -> str:
    """n lowercase letters, no two neighbours equal (so every swap is visible)."""
    r = random.Random(seed)
    out = [r.choice(string.ascii_lowercase)]
    while len(out) < n:
        ch = r.choice(string.ascii_lowercase)
        if ch != out[-1]:
            out.append(ch)
    return "".join(out)


def _text(spec: str, text: str, seed: int = 0, sid: str = "s0") -> str:
    c = parse(spec)
    return corrupt_text(text, c, rng_for(seed, c, sid))


# --- text -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [*RANDOM_TEXT, "antspeak"])
def test_text_corruptions_are_deterministic_per_seed_and_sample(spec):
    text = _letters(400) + MULTI
    assert _text(spec, text, seed=3, sid="a") == _text(spec, text, seed=3, sid="a")
    if spec != "antspeak":  # antspeak draws nothing
        assert _text(spec, text, seed=3, sid="a") != _text(spec, text, seed=4, sid="a")
        assert _text(spec, text, seed=3, sid="a") != _text(spec, text, seed=3, sid="b")


def test_a_samples_draws_do_not_depend_on_the_order_samples_come_in():
    inner = SERIALIZERS.build({"name": "utf8"})
    plan = Plan("utf8", "text", None, ())
    ser = CorruptingSerializer(inner, parse("drop:0.3"), plan, seed=7)
    samples = [{"id": f"doc{i}", "text": _letters(200, i)} for i in range(5)]
    forward = {s["id"]: ser(s).tokens.tobytes() for s in samples}
    backward = {s["id"]: ser(s).tokens.tobytes() for s in reversed(samples)}
    assert forward == backward
    assert len(set(forward.values())) == 5
    assert samples[0]["text"] == _letters(200, 0)  # the raw sample is not edited in place


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_text_rates_are_within_tolerance_of_p(p):
    n = 40_000
    text = _letters(n)
    tol = 4 * (p * (1 - p) / n) ** 0.5 + 0.002
    dropped = 1 - len(_text(f"drop:{p}", text)) / n
    assert abs(dropped - p) < tol
    added = len(_text(f"repeat:{p}", text)) / n - 1  # a selected character gets 1-3 copies: 2 on average
    assert abs(added / 2 - p) < 2 * tol
    upper = sum(ch.isupper() for ch in _text(f"uppercase:{p}", text)) / n
    assert abs(upper - p) < tol
    swapped = _text(f"swap:{p}", text)
    assert sorted(swapped) == sorted(text) and len(swapped) == n
    moved = sum(a != b for a, b in zip(swapped, text)) / n  # each swap moves two characters
    assert abs(moved / 2 - p / (1 + p)) < tol
    rc = sum(ch.isupper() for ch in _text("random_case", text)) / n
    assert abs(rc - 0.5) < 4 * (0.25 / n) ** 0.5 + 0.002


def test_antspeak_follows_byt5s_definition():
    assert _text("antspeak", "abc def") == " A B C  D E F "


@pytest.mark.parametrize("spec", [*RANDOM_TEXT, "antspeak", "drop:1", "repeat:1", "swap:1", "uppercase:1"])
def test_text_stays_valid_utf8_at_the_codepoint_level(spec):
    text = MULTI * 50
    allowed = set(text) | set(text.upper()) | set(text.lower()) | {" "}
    for seed in range(5):
        out = _text(spec, text, seed=seed)
        assert out.encode("utf-8").decode("utf-8") == out
        assert set(out) <= allowed  # whole characters only: nothing cut out of a multi-byte character
        stream = SERIALIZERS.build({"name": "utf8"})({"id": "x", "text": out})
        assert stream.data_bytes().decode("utf-8") == out


@pytest.mark.parametrize("spec", ["drop:0", "repeat:0", "swap:0", "uppercase:0"])
def test_p_zero_is_identity(spec):
    text = _letters(500) + MULTI
    assert _text(spec, text) == text


@pytest.mark.parametrize("spec", ["bogus", "drop", "drop:1.5", "drop:-0.1", "drop:nan", "swap:x", "antspeak:0.1",
                                  "random_case:1", "jpeg:0", "jpeg:99", "jpeg:30.5", "noise:-1", "noise:inf",
                                  "image_flip:2", "image_drop"])
def test_bad_names_and_values_are_clear_errors(spec):
    with pytest.raises(ConfigError, match="corruption"):
        parse(spec)


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        parse("typo:0.1")
    for name in CORRUPTIONS:
        assert name in str(e.value)


# --- images -----------------------------------------------------------------------------------------------


def _png(mode: str = "RGBA", size=(24, 16)) -> bytes:
    rng = np.random.default_rng(0)
    channels = {"RGBA": 4, "RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _qa_stream():
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "png", "method": "passthrough"}})
    return ser({"id": "q1", "image": _png(), "question": "Is there a red cube?", "answer": "yes"})


@pytest.mark.parametrize("spec", ["image_flip:0.3", "image_swap:0.3", "image_drop:0.3"])
def test_image_byte_corruptions_touch_only_image_bytes(spec):
    stream = _qa_stream()
    c = parse(spec)
    out = corrupt_stream(stream, c, rng_for(0, c, "q1"))
    img = (stream.modality == Modality.IMAGE) & (stream.tokens < 256)
    img_out = (out.modality == Modality.IMAGE) & (out.tokens < 256)
    # everything that is not an image byte comes through unchanged, in order, with its loss weight
    assert np.array_equal(stream.tokens[~img], out.tokens[~img_out])
    assert np.array_equal(stream.loss_mask[~img], out.loss_mask[~img_out])
    assert np.array_equal(stream.modality[~img], out.modality[~img_out])
    before, after = stream.tokens[img], out.tokens[img_out]
    n = len(before)
    tol = 4 * (0.3 * 0.7 / n) ** 0.5 + 0.01
    if c.name == "image_flip":
        diff = before ^ after
        assert all(bin(int(d)).count("1") <= 1 for d in diff)  # one bit per corrupted byte
        assert abs(np.count_nonzero(diff) / n - 0.3) < tol
    elif c.name == "image_swap":
        assert sorted(before.tolist()) == sorted(after.tolist())
        assert np.count_nonzero(before != after) > 0
    else:
        assert abs(1 - len(after) / n - 0.3) < tol
    again = corrupt_stream(stream, c, rng_for(0, c, "q1"))
    assert np.array_equal(again.tokens, out.tokens)
    assert not np.array_equal(corrupt_stream(stream, c, rng_for(1, c, "q1")).tokens, out.tokens)


@pytest.mark.parametrize("spec", ["image_flip:0", "image_swap:0", "image_drop:0"])
def test_image_byte_corruptions_at_p_zero_are_identity(spec):
    stream = _qa_stream()
    c = parse(spec)
    out = corrupt_stream(stream, c, rng_for(0, c, "q1"))
    assert np.array_equal(out.tokens, stream.tokens) and np.array_equal(out.loss_mask, stream.loss_mask)
    assert len(image_positions(stream)) > 100


def test_image_file_corruptions_write_an_exif_turned_photo_as_displayed():
    """A JPEG tagged 'rotate 90' is written back turned and untagged, as the serializers read the clean file."""
    ex = Image.Exif()
    ex[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, "JPEG", exif=ex.tobytes())
    for spec in ("jpeg:50", "noise:5", "blank"):
        c = parse(spec)
        out = Image.open(io.BytesIO(corrupt_image_file(buf.getvalue(), c, rng_for(0, c, "s"))))
        assert out.size == (16, 24) and 0x0112 not in out.getexif(), spec


def test_image_file_corruptions_keep_the_files_format_size_and_alpha():
    png = _png("RGBA")
    for spec in ("jpeg:20", "noise:10", "noise:0", "blank"):
        c = parse(spec)
        out = corrupt_image_file(png, c, rng_for(0, c, "s"))
        img = Image.open(io.BytesIO(out))
        assert img.format == "PNG" and img.size == (24, 16) and img.mode == "RGBA"
        assert np.array_equal(np.asarray(img)[..., 3], np.asarray(Image.open(io.BytesIO(png)))[..., 3])
        assert out == corrupt_image_file(png, c, rng_for(0, c, "s"))
    c = parse("noise:0")
    same = np.asarray(Image.open(io.BytesIO(corrupt_image_file(png, c, rng_for(0, c, "s")))))
    assert np.array_equal(same, np.asarray(Image.open(io.BytesIO(png))))  # sigma 0: the pixels unchanged
    c = parse("noise:10")
    noisy = [np.asarray(Image.open(io.BytesIO(corrupt_image_file(png, c, rng_for(s, c, "s"))))) for s in (0, 1)]
    assert not np.array_equal(noisy[0], noisy[1])
    assert 5 < np.abs(noisy[0][..., :3].astype(int) - same[..., :3]).mean() < 12
    jpg = io.BytesIO()
    Image.open(io.BytesIO(_png("RGB"))).save(jpg, format="JPEG", quality=90)
    c = parse("jpeg:10")
    out = corrupt_image_file(jpg.getvalue(), c, rng_for(0, c, "s"))
    assert Image.open(io.BytesIO(out)).format == "JPEG" and len(out) < len(jpg.getvalue())


def test_blank_leaves_one_colour_the_images_mean_and_the_pixel_stream_its_length():
    png = _png("RGB")
    c = parse("blank")
    assert c.value is None and c.layer == "image_file"
    orig = np.asarray(Image.open(io.BytesIO(png))).astype(float)
    out = np.asarray(Image.open(io.BytesIO(corrupt_image_file(png, c, rng_for(0, c, "s")))))
    assert out.shape == orig.shape and len(np.unique(out.reshape(-1, 3), axis=0)) == 1
    assert np.array_equal(out[0, 0], np.rint(orig.reshape(-1, 3).mean(0)).astype(np.uint8))
    grey = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(grey, format="PNG")
    g = np.asarray(Image.open(io.BytesIO(corrupt_image_file(grey.getvalue(), c, rng_for(0, c, "s")))))
    assert g.ndim == 2 and len(np.unique(g)) == 1
    pixels = SERIALIZERS.build({"name": "pixels", "size": [12, 8]})
    clean = pixels({"id": "s", "image": png})
    blind = CorruptingSerializer(pixels, c, Plan("pixels", None, "image", ()), 0)({"id": "s", "image": png})
    assert len(blind.tokens) == len(clean.tokens) and not np.array_equal(blind.tokens, clean.tokens)
    with pytest.raises(ConfigError, match="blank takes no value"):
        parse("blank:0.5")


def test_a_16_bit_image_is_refused_not_clamped_to_8_bits():
    from omnibyte.errors import DataError

    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 16, dtype=np.uint16).reshape(16, 24) * 170).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    for spec in ("noise:0", "jpeg:50"):
        c = parse(spec)
        with pytest.raises(DataError, match="'s7'.*image mode I"):
            corrupt_image_file(buf.getvalue(), c, rng_for(0, c, "s7"), "s7")


def test_image_corruptions_are_drawn_per_image_file_so_questions_about_one_image_agree():
    qa = SERIALIZERS.build({"name": "qa", "image": {"name": "png"}})
    png = _png("RGB")

    def sample(sid, filename, question):
        return {"id": sid, "image": png, "image_filename": filename, "question": question, "answer": "yes"}

    for spec in ("noise:10", "image_flip:0.05"):
        ser = CorruptingSerializer(qa, parse(spec), Plan("qa", "question", "image", ()), 0)

        def image_bytes(s, ser=ser):
            st = ser(s)
            return st.tokens[st.modality == int(Modality.IMAGE)].tolist()

        a, b = sample("q/1", "img_7.png", "Is it red?"), sample("q/2", "img_7.png", "How many cubes?")
        other = sample("q/3", "img_8.png", "Is it red?")
        assert image_bytes(a) == image_bytes(b), spec  # one image, one corruption
        assert image_bytes(a) != image_bytes(other), spec  # another file: its own draws
    text = CorruptingSerializer(qa, parse("random_case"), Plan("qa", "question", "image", ()), 0)
    q = "is the big sphere the same colour as the small cube"
    assert text(sample("q/1", "img_7.png", q)).tokens.tolist() != text(sample("q/2", "img_7.png", q)).tokens.tolist()


# --- which corruptions apply to a run ----------------------------------------------------------------------


def _unloaded_run(config: str, *overrides: str, run_dir: Path | None = None, mblm: bool = True):
    """A run's real components from its config, with the model untrained (random weights)."""
    from omnibyte.run import Run, build_components, resolve_data_config
    from omnibyte.runconfig import load_run_config

    cfg = resolve_data_config(load_run_config(config, [*overrides, *(TINY_MBLM[:2] if mblm else [])]))
    task, serializer, model = build_components(cfg)
    return Run(run_dir or Path("runs") / cfg.run_name, cfg, task, serializer, model.eval(), Path("none"), 0, "none",
               {})


def test_the_plan_follows_the_runs_serializer_and_refuses_what_does_not_apply():
    from omnibyte.robustness.evaluate import DEFAULT_IMAGE, DEFAULT_TEXT, plan_for

    text = _unloaded_run("debug_tiny")
    plan = plan_for(text)
    assert plan.text_field == "text" and plan.image_field is None
    assert [c.label for c in plan.corruptions] == list(DEFAULT_TEXT)
    for spec in ("jpeg:30", "noise:4", "image_flip:0.01"):
        with pytest.raises(ConfigError, match=f"{spec}.*corruptions for this run: drop, repeat"):
            plan_for(text, [spec])
    with pytest.raises(ConfigError, match="given twice"):
        plan_for(text, ["drop:0.1", "drop:0.1"])
    with pytest.raises(ConfigError, match="data.source=h5"):
        plan_for(_unloaded_run("debug_tiny", "data.source=h5", "data.path=x"))
    vqa = plan_for(_unloaded_run("clevr_vqa_png", f"task.root={FIXTURE}"))
    assert (vqa.text_field, vqa.image_field) == ("question", "image")
    assert [c.label for c in vqa.corruptions] == [*DEFAULT_TEXT, *DEFAULT_IMAGE]
    cnn = _unloaded_run("clevr_cnn_lstm", f"task.root={FIXTURE}", mblm=False)  # decodes images: no byte-level corruption
    assert not any(c.name.startswith("image_") for c in plan_for(cnn).corruptions)
    with pytest.raises(ConfigError, match="image_flip:0.01.*not a byte model"):
        plan_for(cnn, ["jpeg:10", "image_flip:0.01"])


def test_the_table_rows_are_evaluate_runs_results_on_corrupted_copies(tmp_path):
    from omnibyte.robustness.evaluate import run_robustness
    from omnibyte.robustness.report import table_lines
    from omnibyte.run import evaluate_run

    run = _unloaded_run("debug_tiny", run_dir=tmp_path)
    res = run_robustness(run, corruptions=["uppercase:0.3", "antspeak"], limit=4, progress=False)
    rows = res["rows"]
    assert [r["corruption"] for r in rows] == ["clean", "uppercase:0.3", "antspeak"]
    direct = evaluate_run(run, max_samples=4, per_token=False, progress=False, out_dir=tmp_path / "direct")
    assert rows[0]["bpb"] == direct["bpb"]
    assert rows[1]["bpb"] != rows[0]["bpb"] and rows[1]["delta_bpb"] == rows[1]["bpb"] - rows[0]["bpb"]
    assert json.loads(Path(res["results_file"]).read_text())["rows"] == rows
    assert Path(res["results_file"]) == tmp_path / "eval" / "robustness_validation_0_seed0_n4.json"
    with pytest.raises(ConfigError, match="would replace it"):  # another set under the same key: refused
        run_robustness(run, corruptions=["drop:0.3"], limit=4, progress=False)
    assert json.loads(Path(res["results_file"]).read_text())["rows"] == rows  # kept
    assert any(line.startswith("antspeak") for line in table_lines(res))
    again = run_robustness(run, corruptions=["uppercase:0.3"], limit=4, progress=False, out=tmp_path / "b.json")
    assert again["rows"][1]["bpb"] == rows[1]["bpb"]  # same seed, same corrupted copy
    with pytest.raises(ConfigError, match="pass another --out"):  # --out FILE of another set: not replaced
        run_robustness(run, corruptions=["drop:0.3"], limit=4, progress=False, out=tmp_path / "b.json")
    other = run_robustness(run, corruptions=["uppercase:0.3"], limit=4, seed=1, progress=False,
                           out=tmp_path / "c.json")
    assert other["rows"][1]["bpb"] != rows[1]["bpb"]


def test_vqa_rows_score_corrupted_questions_and_image_bytes(tmp_path):
    from omnibyte.robustness.evaluate import headline, run_robustness
    from omnibyte.robustness.report import UNTRAINED_NOTE, table_lines

    run = _unloaded_run("clevr_vqa_png", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                        "model.stages.0.length=128", "data.seq_len=1024", *TINY_MBLM[2:], run_dir=tmp_path)
    res = run_robustness(run, corruptions=["random_case", "image_flip:0.05"], limit=2, progress=False)
    rows = {r["corruption"]: r for r in res["rows"]}
    assert all(r["num_questions"] == 2 and 0 <= r["accuracy"] <= 1 and r["image_bytes"] > 0 for r in rows.values())
    assert rows["random_case"]["image_bpb"] == rows["clean"]["image_bpb"]  # the question changed, not the image
    assert rows["random_case"]["bpb"] != rows["clean"]["bpb"]  # ... and the answer's context did
    assert rows["image_flip:0.05"]["image_bpb"] != rows["clean"]["image_bpb"]
    assert rows["image_flip:0.05"]["image_bytes"] == rows["clean"]["image_bytes"]
    # the CLEVR configs train on the answer only: their image bits measure nothing the run learned, so the
    # readable table leaves them out and says why (the JSON keeps them); a run trained on every byte shows them
    assert rows["clean"]["image_loss_weight"] == 0
    assert "image_bpb" not in headline(list(rows.values()))
    assert UNTRAINED_NOTE in table_lines(res) and "image_bpb" not in table_lines(res)[1]
    full = _unloaded_run("clevr_vqa_png", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                         "serializer.loss=all", "model.stages.0.length=128", "data.seq_len=1024", *TINY_MBLM[2:],
                         run_dir=tmp_path / "all")
    res_all = run_robustness(full, corruptions=["image_flip:0.05"], limit=2, progress=False)
    assert res_all["rows"][0]["image_loss_weight"] == res_all["rows"][0]["image_bytes"] > 0
    assert "image_bpb" in headline(res_all["rows"]) and UNTRAINED_NOTE not in table_lines(res_all)
    # the predictions file of a question corruption shows the question the model read, beside the clean one
    detail = Path(res["rows"][0]["detail"]).parent.parent
    assert detail == tmp_path / "eval" / "robustness" / "val_0_seed0_n2"  # its own folder: seed and sample count
    recs = [json.loads(x) for x in (detail / "random_case" / "vqa_val_0_predictions.jsonl").read_text().splitlines()]
    clean = [json.loads(x) for x in (detail / "clean" / "vqa_val_0_predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("question_clean" not in r for r in clean)
    for r, c in zip(recs, clean):
        assert r["question_clean"] == c["question"] and r["question"] != c["question"]
        assert r["question"].lower() == c["question"].lower()  # random_case: the same letters


def test_a_corruption_that_pushes_streams_past_seq_len_says_its_bpb_misses_their_tails(tmp_path):
    """Eval crops a stream longer than data.seq_len; antspeak doubles a question, so at a seq_len that holds
    every clean stream the corrupted rows are cropped (or skipped): the row counts them and carries a warning."""
    from omnibyte.robustness.evaluate import run_robustness
    from omnibyte.robustness.report import table_lines

    base = ("clevr_vqa_png", f"task.root={FIXTURE}", "serializer.image.size=[16,12]", "model.stages.0.length=128",
            *TINY_MBLM[2:])
    probe = _unloaded_run(*base, "data.seq_len=1024")
    longest = max(len(probe.serializer(s)) for s in probe.task.samples("val"))
    run = _unloaded_run(*base, f"data.seq_len={longest}", run_dir=tmp_path)
    res = run_robustness(run, corruptions=["antspeak"], limit=2, progress=False)
    clean, ant = res["rows"]
    assert "bpb_rows" not in clean and ant["bpb_rows"]["overlong_cropped"] > 0
    assert "bpb pass: eval streams over data.seq_len" in ant["warning"]
    assert any(line.startswith("WARNING antspeak") for line in table_lines(res))
    # data.overlong=skip drops them from the bpb passes instead: also not the clean row's bytes, also said
    # (a seq_len that keeps one corrupted stream of the two: an eval pass with no rows at all is an error)
    from omnibyte.robustness.evaluate import plan_for

    four = list(probe.task.samples("val"))[:4]
    ser = CorruptingSerializer(probe.serializer, parse("antspeak"), plan_for(probe, ["antspeak"]), 0)
    fit, bent = max(len(probe.serializer(s)) for s in four), sorted(len(ser(s)) for s in four)
    assert bent[0] <= fit < bent[-1]
    run = _unloaded_run(*base, f"data.seq_len={fit}", "data.overlong=skip", run_dir=tmp_path / "skip")
    clean, ant = run_robustness(run, corruptions=["antspeak"], limit=4, progress=False)["rows"]
    assert ant["bpb_rows"]["overlong_skipped"] > 0 and ant["image_rows"]["overlong_skipped"] > 0
    assert "bpb pass" in ant["warning"] and "image_bpb pass" in ant["warning"]


def test_a_text_corruption_of_undecodable_text_names_the_sample():
    from omnibyte.errors import DataError

    ser = CorruptingSerializer(SERIALIZERS.build({"name": "utf8"}), parse("drop:0.1"), Plan("utf8", "text", None, ()), 0)
    with pytest.raises(DataError, match="'pg19/validation/7'.*not decoded text"):
        ser({"id": "pg19/validation/7", "text": b"\xff\xfe bad"})


# --- end to end (slow: each trains a tiny run, then scores it several times) -------------------------------------------------------------------------------------------

QUICK = quick(2)


def _books(root: Path) -> Path:
    r = random.Random(0)
    words = "the old sea ship wind night river café naïve 東京 light dark said went over".split()
    for split, n in (("train", 2), ("validation", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            lines = [" ".join(r.choice(words) for _ in range(10)) + "." for _ in range(12)]
            (root / split / f"{10 + i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return root


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.slow
def test_robustness_on_a_pg19_run_matches_eval_and_refuses_image_corruptions(tmp_path, capsys):
    runs, root = tmp_path / "runs", _books(tmp_path / "pg")
    assert main(["train", "pg19_lm", f"task.root={root}", *TINY_MBLM, *QUICK, "data.seq_len=128",
                 f"out_dir={runs}", "--quiet"]) == 0
    run = runs / "pg19_lm"
    capsys.readouterr()
    assert main(["robustness", str(run), "--corruptions", "jpeg:30"]) == 2
    err = capsys.readouterr().err
    assert "jpeg:30" in err and "drop" in err and "antspeak" in err
    out_file = tmp_path / "rob.json"
    assert main(["robustness", str(run), "--corruptions", "drop:0.3", "antspeak", "--out", str(out_file),
                 "--plot", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "antspeak" in table and "word_ppl" in table
    res = json.loads(out_file.read_text())
    assert [r["corruption"] for r in res["rows"]] == ["clean", "drop:0.3", "antspeak"]
    assert out_file.with_suffix(".png").is_file()
    assert main(["eval", str(run)]) == 0
    ev = _json_out(capsys)
    clean, drop, ant = res["rows"]
    assert clean["bpb"] == ev["bpb"] and clean["text_bpb"] == ev["task"]["bpb"]
    assert clean["word_ppl"] == ev["task"]["word_ppl"] and clean["clean_words"] == ev["task"]["num_words"]
    assert drop["num_bytes"] < clean["num_bytes"] < ant["num_bytes"]  # text_bpb is over the corrupted bytes
    for r in (drop, ant):  # every row's word perplexity is spread over the clean text's words
        assert r["word_ppl"] == pytest.approx(np.exp(r["total_nats"] / clean["clean_words"]))
        assert r["delta_text_bpb"] == pytest.approx(r["text_bpb"] - clean["text_bpb"])
        # ... and beside it the bits per CLEAN byte: the same normaliser in every row, named in the table (word_ppl
        # fell under drop because fewer bytes were scored, which read as robustness)
        assert r["clean_byte_bpb"] == pytest.approx(r["total_nats"] / (clean["num_bytes"] * np.log(2)))
    assert clean["clean_byte_bpb"] == pytest.approx(clean["text_bpb"]) and clean["clean_bytes"] == clean["num_bytes"]
    assert "clean_byte_bpb" in table and f"nats / {clean['num_bytes']} bytes of the clean text" in table


@pytest.mark.slow
def test_robustness_on_a_vqa_run_scores_corrupted_questions_and_images(tmp_path, capsys):
    runs = tmp_path / "runs"
    common = [f"task.root={FIXTURE}", "serializer.image.size=[16,12]", "model.stages.0.length=128",
              "data.seq_len=1024"]
    assert main(["train", "clevr_vqa_png", *common, *TINY_MBLM, *QUICK, f"out_dir={runs}", "--quiet"]) == 0
    run = runs / "clevr_vqa_png"
    assert main(["robustness", str(run), "--limit", "2", "--corruptions", "uppercase:0.3", "image_flip:0.05",
                 "noise:16", "--quiet"]) == 0
    res = json.loads(next((run / "eval").glob("robustness_val_2_seed0_n*.json")).read_text())
    rows = {r["corruption"]: r for r in res["rows"]}
    assert list(rows) == ["clean", "uppercase:0.3", "image_flip:0.05", "noise:16"]
    for r in rows.values():
        assert r["num_questions"] == 2 and 0 <= r["accuracy"] <= 1 and r["image_bytes"] > 0
    assert rows["uppercase:0.3"]["image_bpb"] == rows["clean"]["image_bpb"]  # the question only
    assert rows["image_flip:0.05"]["image_bpb"] != rows["clean"]["image_bpb"]
    for label in ("uppercase:0.3", "image_flip:0.05", "noise:16"):  # paired question by question with clean
        d = rows[label]["paired"]["all"]
        assert d["n"] == 2 and d["mean"] == pytest.approx(rows[label]["accuracy"] - rows["clean"]["accuracy"])
    table = capsys.readouterr().out
    assert "paired stderr" in table and "noise:16" in table.split("paired stderr")[1]
    assert main(["eval", str(run), "eval.max_samples=2"]) == 0
    ev = _json_out(capsys)
    assert rows["clean"]["accuracy"] == ev["task"]["accuracy"] and rows["clean"]["bpb"] == ev["bpb"]
