"""``clevr_cnn_lstm``: the CNN+LSTM VQA baseline of Johnson et al. (2017), on omnibyte's own batches.

It reads the same ``qa`` streams as the byte models, so it trains and evaluates with the same engine,
data and split under the same budget:

* the stream is parsed by its markers: the first ``SOM_IMAGE .. EOM`` segment holds the image (decoded by
  the image serializer named in ``image:``, which must equal the run's ``serializer.image``: ``pixels``
  recommended, since ``png``/``jpeg`` bytes cost a Pillow decode per sample per step), the first
  ``SOM_QUESTION .. EOM`` segment the question, and ``SOM_ANSWER .. EOS`` the answer (the label);
* a torchvision ResNet trunk trained from scratch (``weights=None``: nothing is downloaded; Johnson et al.
  used frozen ImageNet ResNet-101 conv4 features instead), its first ``trunk_stages`` stages, global
  average pooled;
* an LSTM over the question's words (hashed into ``word_buckets`` ids with CRC-32, so no vocabulary pass
  over the data is needed) or bytes, its last hidden state;
* both concatenated into an MLP classifying over the closed answer set ``answers`` (a run fills it from
  the task's answer vocabulary, :attr:`tasks.clevr.ClevrVQA.answer_vocab`; building the model with it empty
  is an error).

It implements the model contract (:class:`omnibyte.model.api.StreamModel`) as a classifier:

* ``stream_meta.per_token_losses`` is False (no :meth:`nll`);
* :meth:`batch_loss` is the answer classification cross-entropy as a :class:`omnibyte.loss.LossOutput`
  (its "nats" are per answer, so its ``bpb`` is bits per answer, not per byte); a sample whose answer is
  outside ``answers`` gets weight 0;
* :meth:`score` gives each candidate continuation of a prompt the log-softmax of its class: a candidate is
  an answer's UTF-8 bytes then EOS; any other token list (an answer outside ``answers``, a partial answer)
  gets ``-inf``; :meth:`score_batch` does the same for many prompts in one forward;
* :meth:`generate` answers with the argmax class's bytes then EOS (temperature > 0 samples a class from
  the softmax, with ``generator``).

So VQA evaluation ranks and generates with it exactly as with a byte model.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omnibyte import vocab
from omnibyte.config import Node, poly
from omnibyte.model.api import StreamMeta, StreamModel
from omnibyte.model.inference.sampling import as_batch
from omnibyte.registry import MODELS
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from .vqa_eval import answer_candidates

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class CNNLSTMConfig(Node):
    name: str = "clevr_cnn_lstm"
    image: Node = poly("serializers", default="pixels")  # how image segments decode: the run's serializer.image
    input_size: tuple[int, int] = (0, 0)  # (width, height) images are resized to; (0, 0): as decoded
    trunk: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    trunk_stages: int = 3  # ResNet stages kept (1..4), after the stem
    question_tokens: Literal["words", "bytes"] = "words"
    word_buckets: int = 4096
    embed_dim: int = 300
    lstm_hidden: int = 1024
    lstm_layers: int = 1
    mlp_hidden: int = 1024
    dropout: float = 0.0
    answers: tuple[str, ...] = ()  # the classes: a run fills them from the task's answer vocabulary

    def __post_init__(self):
        if not 1 <= self.trunk_stages <= 4:
            raise ValueError(f"trunk_stages must be in 1..4, got {self.trunk_stages}")
        if min(self.word_buckets, self.embed_dim, self.lstm_hidden, self.lstm_layers, self.mlp_hidden) < 1:
            raise ValueError("word_buckets, embed_dim, lstm_hidden, lstm_layers and mlp_hidden must be >= 1")
        if len(set(self.answers)) != len(self.answers) or len(self.answers) == 1:
            raise ValueError(f"model.answers must be at least two distinct strings, got {list(self.answers)}")


@MODELS.register("clevr_cnn_lstm")
class CNNLSTM(StreamModel):
    """CNN+LSTM VQA baseline (Johnson et al. 2017): ResNet trunk from scratch + question LSTM + MLP."""

    Config = CNNLSTMConfig

    def __init__(self, config: CNNLSTMConfig | None = None):
        super().__init__()
        import torchvision

        from omnibyte.registry import SERIALIZERS

        self.config = cfg = config if config is not None else CNNLSTMConfig()
        if not cfg.answers:
            raise ValueError("model.answers is empty: a run fills it from the task's answer vocabulary "
                             "(task.answers); set model.answers to build the model on its own")
        self.image_serializer = SERIALIZERS.build(cfg.image)
        if not self.image_serializer.is_image:
            raise ValueError(f"image: {cfg.image.name!r} is not an image serializer")
        resnet = getattr(torchvision.models, cfg.trunk)(weights=None)  # from scratch: no download
        stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4][: cfg.trunk_stages]
        self.trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, *stages)
        expansion = 4 if cfg.trunk == "resnet50" else 1
        cnn_dim = 64 * 2 ** (cfg.trunk_stages - 1) * expansion
        n_tok = cfg.word_buckets + 1 if cfg.question_tokens == "words" else vocab.NUM_BYTES + 1
        self.embed = nn.Embedding(n_tok, cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True)
        self.classifier = nn.Sequential(
            nn.Linear(cnn_dim + cfg.lstm_hidden, cfg.mlp_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_hidden, len(cfg.answers)),
        )
        self.answer_index = {a: i for i, a in enumerate(cfg.answers)}
        # each class as a continuation (answer bytes + EOS, as VQA ranking encodes it), and back
        self._candidates = answer_candidates(cfg.answers)
        self._candidate_class = {tuple(c): i for i, c in enumerate(self._candidates)}
        self.stream_meta = StreamMeta(vocab_size=vocab.VOCAB_SIZE, patch_product=1, max_len=None,
                                      per_token_losses=False)
        self.register_buffer("_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    @property
    def answers(self) -> tuple[str, ...]:
        return self.config.answers

    # --- parsing a batch of qa streams ---------------------------------------------------------
    def parse(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) qa tokens -> images (B, 3, H, W) float, question ids (B, T), lengths (B,), labels (B,)."""
        rows = tokens.detach().cpu().numpy()
        images, questions, labels = [], [], []
        for r, row in enumerate(rows):
            seg = _segments(row)
            if "image" not in seg or "question" not in seg:
                raise ValueError(f"row {r}: not a qa stream (needs SOM_IMAGE .. EOM and SOM_QUESTION .. EOM)")
            images.append(self._image(seg["image"], r))
            questions.append(self._question_ids(seg["question"]))
            ans = seg.get("answer")
            labels.append(self.answer_index.get(ans.decode("utf-8", "replace"), -1) if ans is not None else -1)
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"images of different sizes in one batch {sorted(shapes)}; set model.input_size "
                             f"or a fixed serializer.image.size")
        device = tokens.device
        x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        lengths = torch.tensor([max(1, len(q)) for q in questions], dtype=torch.long)
        q = torch.zeros(len(questions), int(lengths.max()), dtype=torch.long)
        for i, ids in enumerate(questions):
            q[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return x, q.to(device), lengths, torch.tensor(labels, dtype=torch.long, device=device)

    def _image(self, data: bytes, row: int) -> np.ndarray:
        im = self.image_serializer.decode_image(ByteStream.from_bytes(data, Modality.IMAGE, id=f"row {row}"))
        im = im.convert("RGB")
        w, h = self.config.input_size
        if w and h and im.size != (w, h):
            from PIL import Image

            im = im.resize((w, h), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    def _question_ids(self, data: bytes) -> list[int]:
        if self.config.question_tokens == "bytes":
            return [b + 1 for b in data]
        words = _WORD.findall(data.decode("utf-8", "replace").lower())
        return [zlib.crc32(w.encode()) % self.config.word_buckets + 1 for w in words]

    def labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) answer class of each qa row (-1: no answer segment, or an answer outside ``answers``)."""
        out = []
        for row in tokens.detach().cpu().numpy():
            ans = _segments(row).get("answer")
            out.append(self.answer_index.get(ans.decode("utf-8", "replace"), -1) if ans is not None else -1)
        return torch.tensor(out, dtype=torch.long, device=tokens.device)

    # --- model ---------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) qa tokens -> answer logits (B, A). Going through ``forward`` keeps DDP wrappers working."""
        x, q, lengths, _ = self.parse(tokens)
        return self.classify(x, q, lengths)

    def classify(self, images: torch.Tensor, questions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], question ids (B, T), lengths (B,) -> answer logits (B, A)."""
        feats = self.trunk(images - self._mean).mean(dim=(2, 3))  # (B, C)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(questions), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (layers, B, hidden)
        return self.classifier(torch.cat([feats, h[-1]], dim=1))

    # --- the model contract --------------------------------------------------------------------
    def batch_loss(self, batch: Any):
        """Answer cross-entropy as a LossOutput (weight 0 for rows without an answer in ``answers``)."""
        from omnibyte.loss import LossOutput

        logits = self(batch.tokens)
        labels = self.labels(batch.tokens)
        valid = labels >= 0
        nll = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none") * valid
        w = valid.float()
        nats, weight = nll.sum(), w.sum()
        loss = nats / weight.clamp(min=1.0)
        per = {int(Modality.ANSWER): (nats.detach(), weight.detach())}
        return LossOutput(loss=loss, nats_sum=nats.detach(), weight_sum=weight.detach(), per_modality=per)

    @torch.no_grad()
    def score(self, prefix, candidates) -> torch.Tensor:
        """(K,) log-probability of each candidate answer (UTF-8 bytes + EOS) of one prompt; ``-inf`` for a
        candidate that is not one of ``answers`` followed by EOS."""
        x = as_batch(prefix, self.device)
        if x.shape[0] != 1:
            raise ValueError("score: prefix must be a single sequence")
        logp = torch.log_softmax(self._eval_logits(x)[0].float(), dim=-1)  # (A,)
        out = torch.full((len(candidates),), float("-inf"), device=logp.device)
        for k, c in enumerate(candidates):
            cls = self._candidate_class.get(tuple(int(t) for t in c))
            if cls is not None:
                out[k] = logp[cls]
        return out

    @torch.no_grad()
    def score_batch(self, prefixes, candidates) -> torch.Tensor:
        """(B, K): row b = :meth:`score` of ``prefixes[b]`` (1-D, any lengths), in one forward: the prefixes are
        padded with PAD (a special token, so it ends a segment as the end of a row does). Their images must
        have one size, as in any batch (``model.input_size`` or a fixed ``serializer.image.size``)."""
        rows = [as_batch(p, self.device) for p in prefixes]
        if any(r.shape[0] != 1 for r in rows):
            raise ValueError("score_batch: each prefix must be a single sequence")
        if not rows:
            return torch.zeros(0, len(candidates))
        x = torch.full((len(rows), max(r.shape[1] for r in rows)), vocab.PAD, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            x[i, : r.shape[1]] = r[0]
        logp = torch.log_softmax(self._eval_logits(x).float(), dim=-1)  # (B, A)
        out = torch.full((len(rows), len(candidates)), float("-inf"), device=logp.device)
        classes = [self._candidate_class.get(tuple(int(t) for t in c)) for c in candidates]
        known = [k for k, cls in enumerate(classes) if cls is not None]
        if known:
            out[:, known] = logp[:, [classes[k] for k in known]]
        return out

    @torch.no_grad()
    def generate(self, prompt, max_new_bytes: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens=(), generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """(B, <= max_new_bytes) tokens: each row's answer (argmax class; temperature > 0 samples a class from
        softmax(logits / temperature) with ``generator``) as UTF-8 bytes then EOS, PAD after a shorter row.
        A classifier gives one answer: it always ends at EOS, whatever ``stop_tokens``."""
        if top_k or top_p < 1.0:
            raise ValueError(f"{type(self).__name__}.generate: top_k / top_p are not supported (a classifier "
                             f"samples a class with temperature only)")
        x = as_batch(prompt, self.device)
        logits = self._eval_logits(x).float()
        if temperature <= 0:
            classes = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            classes = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
        rows = [self._candidates[int(c)][:max_new_bytes] for c in classes.tolist()]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), vocab.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(x.device)

    def _eval_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Answer logits in eval mode (BatchNorm running statistics), restoring the mode after."""
        was_training = self.training
        self.eval()
        try:
            return self(tokens)
        finally:
            self.train(was_training)


def _segments(row: np.ndarray) -> dict[str, bytes]:
    """First segment of each kind in a qa row: {"image", "question", "answer"} -> bytes."""
    out: dict[str, bytes] = {}
    kinds = {vocab.SOM_IMAGE: "image", vocab.SOM_QUESTION: "question", vocab.SOM_ANSWER: "answer"}
    starts = np.flatnonzero(row >= vocab.NUM_BYTES)  # every special token
    for k, pos in enumerate(starts):
        kind = kinds.get(int(row[pos]))
        if kind is None or kind in out:
            continue
        end = starts[k + 1] if k + 1 < len(starts) else len(row)
        out[kind] = row[pos + 1: end].astype(np.uint8).tobytes()
    return out
