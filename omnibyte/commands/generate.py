"""omnibyte generate <run-dir> --prompt TEXT [--max-new-bytes N] ..."""

from __future__ import annotations

HELP = "sample bytes from a trained run's model after a prompt"


def add_arguments(p) -> None:

    from ._plugins import add_plugin_arguments

    p.add_argument("run_dir", help="a run directory (runs/<run_name>)")
    p.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    p.add_argument("--prompt-file", default=None,
                   help="read the prompt from this file instead (a text run: UTF-8 text, serialized as --prompt is)")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt bytes as they are (default: through the run's serializer, minus its end)")
    p.add_argument("--max-new-bytes", type=int, default=256, help="bytes to sample after the prompt (>= 1)")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest bytes (>= 0; 0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num", type=int, default=1, help="samples to draw (>= 1)")
    p.add_argument("--modality", default=None, metavar="text|image|question|answer|special",
                   help="the prompt bytes' modality, for a run with modality-aware blocks (model routes by it; "
                        "special tokens are special)")
    p.add_argument("--checkpoint", default=None, metavar="best|latest|STEP",
                   help="default: the run's eval.checkpoint (auto: the best checkpoint by its validation "
                        "metric, else the latest)")
    add_plugin_arguments(p)
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs (auto: the run's train.device)")
    p.add_argument("--quiet", action="store_true", help="print only the samples (no checkpoint line, warnings only)")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: step byte by byte eagerly (default: the CUDA-graph step with Triton decode kernels)")
    p.add_argument("--draft", default=None, metavar="RUN|self|lookup",
                   help="speculative decoding: a smaller byte-model run (same token contract) drafts --draft-len "
                        "bytes, this run verifies them in one pass (greedy output unchanged, sampling exact; eager "
                        "passes, or --graph-verify); "
                        "'self': this run's own first --draft-layers layers draft; 'lookup': no model, the bytes "
                        "that followed an earlier occurrence of the context's last bytes (prompt lookup; a run "
                        "directory named so: ./lookup)")
    p.add_argument("--draft-layers", default=None, metavar="N0,N1,...",
                   help="--draft self: layers kept per stage, outermost first (e.g. 4,2)")
    p.add_argument("--draft-len", type=int, default=4, help="--draft: bytes drafted per verification (>= 1)")
    p.add_argument("--lookup-ngram", default=None, metavar="MIN,MAX",
                   help="--draft lookup: the shortest match used and the longest compared, in bytes (default 2,8)")
    p.add_argument("--lookup-candidates", type=int, default=None, metavar="N",
                   help="--draft lookup: earlier occurrences of the last 2 bytes compared per draft (default 32)")
    p.add_argument("--draft-checkpoint", default=None, metavar="best|latest|STEP",
                   help="--draft: the draft run's checkpoint (default: the draft run's own eval.checkpoint, as omnibyte eval)")
    p.add_argument("--graph-verify", action="store_true",
                   help="--draft: verification passes on the CUDA-graph stepper's static buffers, one CUDA graph per "
                        "(patch phase, pass length) (generate(..., graph_verify=True); on an H100 0.33x the "
                        "graphed plain decoder before the pass was compiled, see benchmarks/RESULTS.md). "
                        "Off CUDA the same static passes run eagerly; a model without them (they need a Mamba-2 "
                        "global stage and one inner Transformer stage over bytes) uses the eager passes, logged. "
                        "Decodes at the weights' dtype on CUDA, as the CUDA-graph step (the eager fallback too; the "
                        "precision line says which runs); --compile applies")
    p.add_argument("--aligned", action="store_true",
                   help="--graph-verify: patch-aligned passes, each round's drafts ending with the current patch, so "
                        "a pass runs the local stage once (generate(..., graph_verify=\"aligned\"))")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: also torch.compile the Mamba stages' step first (~30 s once; 1.55x the bytes/s on an H100)")


def _ints(text: str, error: str, count: int | None = None) -> list[int]:
    """Comma-separated integers (``count`` of them where given); else a ConfigError saying ``error``."""
    from omnibyte.config import ConfigError

    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(error) from None
    if count is not None and len(values) != count:
        raise ConfigError(error)
    return values


def check_arguments(args) -> bytes | None:
    """Refuse out-of-range sampling arguments with a ConfigError naming the option (before the run is loaded);
    returns the ``--prompt-file`` bytes (None without it)."""
    import math

    from omnibyte.config import ConfigError

    if args.max_new_bytes < 1:
        raise ConfigError(f"--max-new-bytes must be >= 1, got {args.max_new_bytes}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: all bytes), got {args.top_k}")
    if not 0 < args.top_p <= 1:  # NaN fails too
        raise ConfigError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if args.draft_len < 1:
        raise ConfigError(f"--draft-len must be >= 1, got {args.draft_len}")
    if (args.draft == "self") != (args.draft_layers is not None):
        raise ConfigError("--draft self and --draft-layers go together (self-speculation by layer skipping)")
    if args.draft_layers is not None:
        args.draft_layers = _ints(args.draft_layers, f"--draft-layers must be integers separated by commas, got "
                                                     f"{args.draft_layers!r}")
    if (args.lookup_ngram is not None or args.lookup_candidates is not None) and args.draft != "lookup":
        raise ConfigError("--lookup-ngram and --lookup-candidates tune --draft lookup")
    if args.lookup_ngram is not None:
        args.lookup_ngram = _ints(args.lookup_ngram, "--lookup-ngram must be two integers MIN,MAX (e.g. 2,8)", 2)
    if args.aligned and not args.graph_verify:
        raise ConfigError("--aligned shapes the --graph-verify passes: it needs --graph-verify")
    if args.graph_verify and not args.draft:
        raise ConfigError("--graph-verify verifies drafts: it needs --draft RUN|self|lookup")
    if args.graph_verify and args.no_graphs:
        raise ConfigError("--graph-verify runs the verification passes and the plain steps on the CUDA-graph stepper; "
                          "it cannot be combined with --no-graphs")
    if args.draft and args.compile and not args.graph_verify:
        raise ConfigError("--draft runs eager verification passes; it cannot be combined with --compile (with "
                          "--graph-verify, --compile applies to the CUDA-graph stepper)")
    if args.modality is not None:
        from omnibyte.vocab import Modality

        try:
            Modality.parse(args.modality)
        except ValueError as e:
            raise ConfigError(f"--modality: {e}") from None
    if not args.prompt_file:
        return None
    from pathlib import Path

    try:
        return Path(args.prompt_file).read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"--prompt-file {args.prompt_file}: is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(f"--prompt-file {args.prompt_file}: cannot be read ({e.strerror or e})") from None


def document_start(serializer) -> list[int]:
    """What an empty prompt becomes: the context a document starts after in training. A text serializer's BOS
    when it writes one; else EOS, which precedes each document of a concatenated stream; a text serializer with
    neither is refused (its documents start after nothing the model can be given). BOS used to be given
    always, a token a run without BOS never trained on. Serializers that take more than text: BOS, as before."""
    from omnibyte import vocab

    cfg = serializer.config
    if getattr(cfg, "field", None) is None or getattr(cfg, "bos", False):
        return [vocab.BOS]
    if getattr(cfg, "eos", False):
        return [vocab.EOS]
    from omnibyte.config import ConfigError

    raise ConfigError("an empty prompt: this run's serializer writes neither BOS nor EOS, so no token stands for "
                      "the start of a document in its training; give --prompt TEXT")


def prompt_tokens(serializer, text: str, data: bytes | None, raw: bool) -> list[int]:
    """The prompt as the model saw such text in training: serialized, trailing EOS/EOM dropped."""
    from omnibyte import vocab

    if raw:
        return list(data if data is not None else text.encode("utf-8"))
    field = getattr(serializer.config, "field", None)
    if field is None:  # serializers that need more than text (qa, images): the bytes themselves
        return list(data if data is not None else text.encode("utf-8"))
    if data is not None:  # a text run's prompt file is text, serialized as in training (BOS ...)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            from omnibyte.config import ConfigError

            raise ConfigError(f"--prompt-file: not UTF-8 text ({e.reason} at byte {e.start}); this run's serializer "
                              f"takes text: pass --raw to feed the file's bytes as they are") from None
    if getattr(serializer.config, "max_bytes", 0):
        # the training length cap is not the prompt's: a cut prompt (truncate: head) was printed whole before a
        # continuation of bytes the model never saw, and truncate: error fell back to raw bytes without BOS
        import dataclasses

        serializer = type(serializer)(dataclasses.replace(serializer.config, max_bytes=0))
    stream = serializer({"id": "prompt", field: text})  # a refusal names the prompt
    tokens = [int(t) for t in stream.tokens]
    while tokens and tokens[-1] in (vocab.EOS, vocab.EOM):
        tokens.pop()
    return tokens


def run(args) -> int:
    import torch

    from omnibyte import vocab
    from omnibyte.run import load_run

    from ._plugins import import_chosen_plugins

    data = check_arguments(args)
    import_chosen_plugins(args)

    import logging

    from omnibyte.logging import setup_console_logging

    setup_console_logging(logging.WARNING if args.quiet else logging.INFO)
    loaded = load_run(args.run_dir, args.checkpoint, device=args.device, trust_plugins=args.trust_plugins)
    logging.getLogger("omnibyte.generate").info("sampling from %s checkpoint %s (step %d)", loaded.which,
                                                loaded.checkpoint, loaded.step)
    serializer, model = loaded.serializer, loaded.model
    prompt = prompt_tokens(serializer, args.prompt, data, args.raw) or document_start(serializer)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batch = torch.tensor([prompt] * args.num, dtype=torch.long, device=device)
    kw = {}
    if model.stream_meta.modality_aware:  # routes by the prompt's modality track: the user says what it is
        from omnibyte.config import ConfigError

        if args.modality is None:
            raise ConfigError(f"{args.run_dir}: this run's model has modality-aware blocks (modality_experts) and "
                              f"routes every byte by its modality; give the prompt's with --modality NAME")
        code = int(vocab.Modality.parse(args.modality))
        kw["modality"] = torch.where(batch < vocab.NUM_BYTES, code, int(vocab.Modality.SPECIAL))
        if loaded.config.serializer.name != "qa":  # one modality between specials (utf8: BOS text... EOS)
            kw["base_modality"] = int(serializer.modality)
    drafter = None
    if args.draft:
        drafter = load_drafter(args, model, device)
        kw.update(draft=drafter, draft_len=args.draft_len, graph_verify="aligned" if args.aligned else args.graph_verify)
    from omnibyte.model.inference.decoder import check_room

    try:  # the model's own check, as a one-line argument error
        check_room(model, len(prompt), args.max_new_bytes)
    except ValueError as e:
        from omnibyte.config import ConfigError

        raise ConfigError(f"--max-new-bytes {args.max_new_bytes}: {e}") from None
    graphs = device.type == "cuda" and (args.graph_verify or not (args.no_graphs or args.draft))
    bf16 = precision_of(loaded.config, device, graphs)
    logging.getLogger("omnibyte.generate").info(
        "precision: %s", precision_line(loaded.config, device, model, graphs, args.graph_verify))
    from omnibyte.precision import autocast

    with torch.no_grad(), autocast(device, bf16):
        out = model.generate(batch, args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, stop_tokens=(vocab.EOS,), generator=gen,
                             use_graphs=not (args.no_graphs or args.draft), compile_step=args.compile and graphs,
                             **kw)
    if drafter is not None and drafter.acceptance is not None:
        logging.getLogger("omnibyte.generate").info(
            "speculative decoding: %d bytes drafted, %d kept (acceptance %.1f%%) in %d verification passes",
            drafter.proposed, drafter.accepted, 100 * drafter.acceptance, drafter.rounds)
    elif drafter is not None:  # no acceptance rate without a draft (Drafter.acceptance None; not 0%)
        logging.getLogger("omnibyte.generate").info(
            "speculative decoding: no bytes drafted, so no acceptance rate (%d verification passes)", drafter.rounds)
    # the prompt before its continuation, --prompt-file's as --prompt's (it printed the continuation alone)
    shown = args.prompt if data is None else data.decode("utf-8", errors="replace")
    for row in out.tolist():
        made = bytes(t for t in row if t < vocab.NUM_BYTES)
        print(shown + made.decode("utf-8", errors="replace"))
        if args.num > 1:
            print("-" * 40)
    return 0


def precision_of(config, device, graphs: bool) -> bool:
    """Whether ``generate`` decodes under bf16 autocast: the run's ``train.precision`` policy, as ``omnibyte ask``
    and evaluation use it (greedy answers then agree with theirs), except where the CUDA-graph step was asked for,
    which runs at the weights' dtype (fp32; so do the eager steps of a model without it), as the precision line it
    logs says (:func:`precision_line`)."""
    from omnibyte.precision import use_bf16

    return use_bf16(config.train.precision, device) and not graphs


def precision_line(config, device, model, graphs: bool, graph_verify: bool) -> str:
    """What ``omnibyte generate`` decodes with and at which precision (after "precision: "). ``graphs``: the
    CUDA-graph step was asked for (no autocast, :func:`precision_of`); then what runs is the CUDA-graph step (with
    ``graph_verify``: and the static verification passes) where the model has it, else the eager steps (passes)
    that ``generate`` falls back on, at the weights' dtype all the same (graph_verify.static_support says which)."""
    from omnibyte.precision import use_bf16

    policy = use_bf16(config.train.precision, device)
    if not graphs:
        return "bf16 autocast (train.precision, as omnibyte ask and eval)" if policy else "fp32 (train.precision)"
    from omnibyte.model.inference.graph_verify import static_support

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    same = ""
    if policy:  # how to decode as ask and eval do
        same = "; ask and eval run bf16 autocast: " + ("eager verification, without --graph-verify," if graph_verify
                                                       else "--no-graphs") + " for the same"
    why = static_support(model, passes=graph_verify)
    if why is None:
        what = "the CUDA-graph step and static verification passes" if graph_verify else "the CUDA-graph step"
        return f"{dtype} weights, no autocast ({what}{same})"
    what = ("eager verification passes and steps, as this model has no static verification" if graph_verify else
            "eager steps, as this model has no CUDA-graph step")
    return f"{dtype} weights, no autocast ({what}: {why}{same})"


def load_drafter(args, model, device):
    """The --draft drafter for ``model``: a run's model (ModelDrafter), ``self`` (SelfDrafter) or ``lookup``
    (LookupDrafter); a run that cannot draft is a ConfigError."""
    import logging

    from omnibyte.config import ConfigError
    from omnibyte.model.inference.speculative import LookupDrafter, ModelDrafter, SelfDrafter
    from omnibyte.run import load_run

    if model.stream_meta.modality_aware:
        raise ConfigError(f"{args.run_dir}: speculative decoding (--draft) does not support modality-aware models")
    if args.draft == "lookup":
        logging.getLogger("omnibyte.generate").info("drafting by prompt lookup, up to %d bytes per pass",
                                                    args.draft_len)
        kw = {}
        if args.lookup_ngram is not None:
            kw["min_ngram"], kw["max_ngram"] = args.lookup_ngram
        if args.lookup_candidates is not None:
            kw["candidates"] = args.lookup_candidates
        try:
            return LookupDrafter(**kw)
        except ValueError as e:
            raise ConfigError(f"--lookup-ngram / --lookup-candidates: {e}") from None
    try:
        if args.draft == "self":
            logging.getLogger("omnibyte.generate").info("drafting with this run's first %s layers per stage, %d "
                                                        "bytes per pass", args.draft_layers, args.draft_len)
            return SelfDrafter(model, args.draft_layers)
        draft = load_run(args.draft, args.draft_checkpoint, device=str(device), trust_plugins=args.trust_plugins)
        logging.getLogger("omnibyte.generate").info("drafting with %s checkpoint %s (step %d), %d bytes per pass",
                                                    args.draft, draft.checkpoint, draft.step, args.draft_len)
        return ModelDrafter(draft.model, model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--draft {args.draft}: {e}") from None
