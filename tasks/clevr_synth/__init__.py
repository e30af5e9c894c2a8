"""Offline CLEVR-format generator: scenes, numpy renders and CLEVR-family questions (no Blender).

``generate(out_dir, images, questions_per_image, seed, ...)`` writes a CLEVR v1.0 layout;
``main(argv)`` is ``omnibyte prepare clevr-synth``. See generate.py (layout, splits, determinism),
scene.py (sampling), render.py (the renderer), programs.py (executor), templates.py (question families).
"""

from .generate import build_parser, generate, main, split_counts
from .programs import ANSWERS, answer, execute
from .scene import sample_scene
from .templates import load_templates

__all__ = ["generate", "main", "build_parser", "split_counts", "answer", "execute", "ANSWERS",
           "sample_scene", "load_templates", "render_scene"]


def render_scene(scene, width: int = 480, height: int = 320):
    """RGB uint8 image of a scene from :func:`sample_scene` (see render.py)."""
    from .render import render

    return render(scene, width, height)
