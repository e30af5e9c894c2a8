"""Tasks: datasets in their native layouts, and their metrics. Importing this package registers them.

``synthetic_text`` (synthetic.py), ``clevr_vqa`` (clevr.py), ``pg19`` (pg19.py), and the CNN+LSTM baseline
model ``clevr_cnn_lstm`` (cnn_lstm.py). The offline CLEVR-format generator lives in ``clevr_synth/``.
"""

from . import base, clevr, cnn_lstm, pg19, synthetic  # noqa: F401  (each registers itself)
