"""Inference for MBLMs, a component the model is composed with (not a mixin of it).

* :mod:`.decoder` -- :class:`Decoder`: per-stage caches (``new_state`` / ``feed``), sampling (``generate``)
  and closed-set scoring (``score``) over a model's stages, embeddings and head.
* :mod:`.scoring` -- ``score_batch``: closed-set scoring of many prefixes at once (``MBLM.score_batch``), equal
  to a loop over ``Decoder.score``.
* :mod:`.sampling` -- ``sample`` (temperature, top-k, nucleus).
* :mod:`.graphs` -- :class:`GraphStepper`: the per-byte step on static buffers, replayed as CUDA graphs.
* :mod:`.kernels` -- Triton kernels for one decode position of a Transformer stage.
* :mod:`.speculative` -- speculative decoding (verification pass, rollback, model drafters); :mod:`.drafters` --
  the ``Drafter`` interface and ``LookupDrafter`` (prompt lookup).

The caches themselves (:mod:`omnibyte.model.cache`) belong to the blocks' contract, not to this package.
"""
