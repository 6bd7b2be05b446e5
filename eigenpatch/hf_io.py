"""Loading models for patching: resolve, validate, refuse bad input with one line.

The checks run before any transform so a bad input costs seconds, not a failed half-hour run:
missing files, corrupt safetensors, remote-code architectures, non-finite weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from eigenpatch.errors import UsageError
from eigenpatch.format import QUANT_METHOD
from eigenpatch.format.checkpoint import register_with_transformers
from eigenpatch.format.verify import CheckpointError
from eigenpatch.zoo import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str, folder: Path) -> torch.dtype:
    """``--dtype``: a name of :data:`DTYPES`, or ``auto`` (the dtype ``config.json`` records; fp32 when none)."""
    if name != "auto":
        return parse_dtype(name)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(stored, torch.float32)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``cpu``, ``cuda[:N]``, ``mps`` or ``auto`` (the best available), checked before anything loads."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA device (or this torch build has no CUDA)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported --device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    return device


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return None


def check_safetensors(folder: Path) -> None:
    """Open every safetensors header: a truncated or non-safetensors file fails here, not mid-load.

    Pickled ``.bin`` checkpoints are refused: eigenpatch loads weights with safetensors only.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UsageError(
                f"{folder} holds only pickled weights (.bin/.pt); eigenpatch loads safetensors only — convert with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise UsageError(f"{folder} has no *.safetensors weights; point at a complete model folder")
    for file in files:
        try:
            with file.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > file.stat().st_size:
                    raise ValueError("header length exceeds file size")
                header = json.loads(f.read(header_len))
            data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if file.stat().st_size < 8 + header_len + data_end:
                raise ValueError("file is shorter than its header says")
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # json, safetensors and OS errors all mean "not a usable file"
            raise UsageError(
                f"corrupt safetensors file {file.name} in {folder} ({type(exc).__name__}: {exc}); "
                "re-download or re-save the model"
            ) from None


def check_finite(model: torch.nn.Module) -> None:
    """Refuse NaN/inf weights: every transform downstream would silently spread them."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise UsageError(f"weight {name} contains NaN or inf values; the checkpoint is broken, fix or re-export it")


def is_patched(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an eigenpatch checkpoint (by its ``quantization_config``)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def load_model(
    ref: str | os.PathLike | None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any, Path]:
    """Resolve ``ref`` (folder, zoo name, cached hub id), validate it, and load model + tokenizer.

    Returns ``(model, tokenizer_or_None, folder)``; the model is in eval mode. Works for plain
    and for eigenpatch checkpoints (the quantizer is registered first).
    """
    folder = resolve_model(ref)
    check_safetensors(folder)
    register_with_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except CheckpointError:
        raise  # already one line naming the tensor, the file and the fix
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (it needs --trust-remote-code)" if "trust_remote_code" in str(exc) else ""
        raise UsageError(f"cannot load model from {folder}{hint}: {first}") from None
    model.eval()
    check_finite(model)
    return model, load_tokenizer(folder, trust_remote_code), folder
