"""The attention backends' names, torch-free, for option parsers and configs (``backend.py`` maps each to its class)."""

BACKEND_NAMES = ("flash-attn", "triton", "torch")
#: what ``--attention-backend`` accepts: "auto" picks for the device at hand (``backend.create_backend``)
BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
