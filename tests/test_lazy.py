"""Out-of-core patching: a checkpoint read and written one decoder layer at a time.

The lazy path must give the very tensors the in-memory path gives (it runs the same per-layer
code through another :class:`~eigenpatch.engine.shards.LayerSource`), resume after a kill, and
refuse bad requests before it loads anything.
"""

import json

import pytest
import torch
from conftest import TINY_VOCAB, killed_after_layer, make_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eigenpatch
from eigenpatch.cli import patch_model_main
from eigenpatch.engine.fisher import stream_output_fisher
from eigenpatch.engine.shards import CheckpointLayers
from eigenpatch.engine.streams import layer_prefix
from eigenpatch.errors import EXIT_USAGE, UsageError
from eigenpatch.out_of_core import INDEX_FILE, patch_checkpoint
from eigenpatch.patchers import SVD, LowRank
from eigenpatch.patchers.lowrank.oneshot import collect_output_fisher
from eigenpatch.patchers.targets import find_linears

CPU, FP32 = torch.device("cpu"), torch.float32


class _Tokens:
    """A tokenizer stand-in for random calibration ids (plumbing: the engine only sees token ids)."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        gen = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, TINY_VOCAB, (2048,), generator=gen).tolist()}

    def save_pretrained(self, folder: object) -> None:
        """Nothing to save: the stand-in has no files."""


def _sequential(**kw: object) -> LowRank:
    """The CLI's default method, small: global loss ranks, fwhiten pairs fitted layer by layer, refined."""
    base = dict(
        ratio=0.5,
        allocator="loss",
        factorizer="fwhiten",
        sequential=True,
        refine_steps=2,
        calib_windows=8,
        calib_seq_len=64,
        fisher_windows=2,
    )
    return LowRank(**(base | kw))


@pytest.fixture
def one_thread():
    """Comparisons of two runs use one thread: with two, BLAS may split its sums differently from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each tiny family saved in several small shards (so layers span files), built once."""
    folders = {}
    for family in ("llama", "qwen2", "mistral", "gemma3"):
        folder = tmp_path_factory.mktemp(family) / family
        _with_decaying_spectra(make_tiny(family)).save_pretrained(folder, max_shard_size="300KB")
        folders[family] = folder
    return folders


def _with_decaying_spectra(model: torch.nn.Module) -> torch.nn.Module:
    """Give every decoder Linear singular values decaying by 0.9 per index, as trained weights have.

    A random matrix's spectrum is flat: the best rank-r subspace is then a near-tie that float
    noise (BLAS sums round differently with the tensors' alignment) can rotate, and the ``loss``
    allocator's choices flip. With gaps between singular values both are well determined, so two
    runs can be compared to float tolerance.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                decay = s[0] * 0.9 ** torch.arange(len(s), dtype=s.dtype)
                module.weight.copy_(u @ torch.diag(decay) @ vh)
    return model


def _in_memory(folder, recipe):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=FP32).eval()
    report = eigenpatch.patch(model, recipe, tokenizer=_Tokens(), calib_text="x", show_progress=False)
    return model, report


def _lazy(folder, recipe, out, state):
    return patch_checkpoint(
        folder,
        recipe,
        out,
        state_dir=state,
        device=CPU,
        dtype=FP32,
        tokenizer=_Tokens(),
        calib_text="x",
        show_progress=False,
    )


def _assert_same_tensors(a: dict, b: dict) -> None:
    """The same tensors, to float noise: BLAS sums may round differently with the tensors' alignment,
    so a factor pair is compared by its product (a singular vector of a near-degenerate pair may
    rotate within its pair without changing it)."""
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".lowrank_up"):
            down = name.removesuffix("up") + "down"
            product, expected = a[name] @ a[down], b[name] @ b[down]
            torch.testing.assert_close(product, expected, rtol=0, atol=1e-4 * expected.abs().max().item(), msg=name)
        elif not name.endswith(".lowrank_down"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def _stored(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("method", ["sequential", "svd"])
def test_layer_by_layer_from_the_shards_equals_the_in_memory_patch(checkpoints, family, method, tmp_path, one_thread):
    """The same ranks, tensors and logits: one code path, two sources."""
    folder = checkpoints[family]
    recipe = [_sequential()] if method == "sequential" else [SVD(ratio=0.5)]
    expected, reference = _in_memory(folder, recipe)
    report, out = _lazy(folder, recipe, tmp_path / "out", tmp_path / "state")
    assert not (tmp_path / "state").exists()  # a finished run leaves nothing to resume
    index = json.loads((out / INDEX_FILE).read_text())
    n_layers = expected.config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == n_layers + 1  # one shard per layer, one for the rest
    assert report["steps"][0]["ranks"] == reference["steps"][0]["ranks"]  # one global allocation
    assert report["steps"][0]["factorized"] > 0
    loaded = eigenpatch.load(out)
    _assert_same_tensors(loaded.state_dict(), expected.state_dict())
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_engine_scores_from_the_shards_equal_the_whole_model_statistics(checkpoints, one_thread):
    """The ``loss`` allocator's inputs (spectra, output scales), from the engine's Fisher and scoring
    passes over layers read from the shards, are those of the one-shot path's whole-model statistics
    (hooks on one forward, one backward)."""
    from eigenpatch.calibration import calibration_windows
    from eigenpatch.engine.passes import plan_transforms
    from eigenpatch.patchers.lowrank.factorize import scaled_spectrum
    from eigenpatch.patchers.lowrank.layers import LowRankLayers
    from eigenpatch.patchers.lowrank.oneshot import calibration_stats
    from eigenpatch.recipe import PatchContext

    config = _sequential()
    context = PatchContext(tokenizer=_Tokens(), calib_text="x", show_progress=False)
    folder = checkpoints["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=FP32).eval()
    linears = find_linears(model, config.targets)
    windows = calibration_windows(_Tokens(), "x", config.calib_windows, config.calib_seq_len, config.seed)
    stats = calibration_stats(model, linears, config, context)
    source = CheckpointLayers(folder, folder.parent / "unused", device=CPU, dtype=FP32)
    transform = LowRankLayers(source.model, config, PatchContext(show_progress=False))
    passes = plan_transforms(source.model, [transform], windows, source=source, show_progress=False)
    assert set(passes) == {"fisher", "scores"}
    spectra, scales = transform.spectra, transform.scales
    assert spectra.keys() == scales.keys() == linears.keys()
    for name, linear in linears.items():
        torch.testing.assert_close(scales[name], stats.output_scale[name], rtol=1e-4, atol=1e-8)
        expected = scaled_spectrum(linear.weight, stats.whitening[name], stats.output_scale[name])
        torch.testing.assert_close(spectra[name], expected, rtol=1e-4, atol=1e-8 * expected.max().item())


def test_streamed_output_fisher_equals_the_whole_model_backward(checkpoints):
    """The Fisher walked backward one layer at a time from stored boundaries is the whole-model one."""
    folder = checkpoints["gemma3"]  # logit softcap and per-layer-type masks: the hardest head
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=FP32).eval()
    linears = find_linears(model, ("q_proj", "o_proj", "down_proj"))
    ids = torch.randint(0, TINY_VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    expected = collect_output_fisher(model, linears, ids, show_progress=False)
    source = CheckpointLayers(folder, folder.parent / "unused", device=CPU, dtype=FP32)
    modules = {}
    for name in linears:
        i = next(i for i in range(len(source)) if name.startswith(layer_prefix(model, i)))
        modules.setdefault(i, []).append(name.removeprefix(layer_prefix(model, i)))
    got = stream_output_fisher(source.model, modules, ids, source=source, batch_size=2, show_progress=False)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), rtol=1e-4, atol=0)


def test_a_killed_run_resumes_after_its_last_finished_layer(tmp_path, monkeypatch, one_thread):
    """Killed after layer 1 of 4, the same call continues at layer 2 (no scoring pass, no finished
    layer again); the result is the uninterrupted run's."""
    folder = tmp_path / "tiny4"
    config = make_tiny("llama").config
    config.num_hidden_layers = 4
    _with_decaying_spectra(AutoModelForCausalLM.from_config(config)).save_pretrained(folder)
    recipe = [_sequential()]
    _, reference = _lazy(folder, recipe, tmp_path / "reference", tmp_path / "state-ref")

    out, state = tmp_path / "out", tmp_path / "state"
    with killed_after_layer(monkeypatch, 2):
        _lazy(folder, recipe, out, state)
    assert not out.exists() and (state / "shards").is_dir()
    loads = []
    monkeypatch.setattr(
        CheckpointLayers, "load", lambda self, i, f=CheckpointLayers.load: loads.append(i) or f(self, i)
    )
    report, out = _lazy(folder, recipe, out, state)
    assert report["steps"][0]["layer_by_layer"]["resumed_at_layer"] == 2
    assert loads == [2, 3]  # no scoring pass again, no finished layer again
    assert len(report["steps"][0]["layer_by_layer"]["layer_seconds"]) == 4
    _assert_same_tensors(_stored(out), _stored(reference))


def test_a_different_command_does_not_resume_a_stale_state(checkpoints, tmp_path):
    """State left by another recipe is discarded, not mixed in."""
    folder, state = checkpoints["llama"], tmp_path / "state"
    state.mkdir()
    (state / "run.json").write_text(json.dumps({"key": "another command"}))
    (state / "leftover").write_text("x")
    report, _ = _lazy(folder, [SVD(ratio=0.5)], tmp_path / "out", state)
    assert "resumed_at_layer" not in json.dumps(report)
    assert not state.exists()


def test_a_recipe_that_needs_the_whole_model_is_refused_layer_by_layer(checkpoints, tmp_path):
    with pytest.raises(UsageError, match="layer by layer"):
        _lazy(checkpoints["llama"], [_sequential(sequential=False)], tmp_path / "out", tmp_path / "state")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_device_cuda_without_cuda_is_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(tmp_path / "not-even-read"), "--compress", "0.5", "--device", "cuda", "-o", str(out), "-q"]
    assert patch_model_main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA" in err[0], err
    assert not out.exists()


def test_too_little_free_disk_is_refused_before_starting(tiny_dir, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    argv = [str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]
    assert patch_model_main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "free" in err[0] and "may need up to" in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_compresses_layer_by_layer_and_reports_peak_memory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert patch_model_main([str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]) == 0
    report = json.loads((out / "eigenpatch_report.json").read_text())
    assert report["out_of_core"] is True
    summary = capsys.readouterr().out
    assert "peak memory: RSS" in summary and "layer by layer from the shards" in summary
    assert isinstance(eigenpatch.load(out), torch.nn.Module)


def test_a_whole_model_recipe_that_does_not_fit_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    import eigenpatch.engine.memory

    monkeypatch.setattr(eigenpatch.engine.memory, "available_bytes", lambda device: 1000)
    out = tmp_path / "out"
    assert patch_model_main([str(tiny_dir), "--structured-ffn", "lowrank", "-o", str(out), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the whole model" in err[0] and "layer by layer" in err[0], err
    assert not out.exists()


def test_a_checkpoint_written_layer_by_layer_exports_to_onnx_with_parity(tiny_dir, tiny_tokenizer, tmp_path):
    """The sharded output (one file per layer + index) is the same format: ONNX Runtime runs it,
    logits within 1e-4 of PyTorch, the same greedy tokens."""
    from conftest import assert_onnx_parity_and_effect, copy_folder

    from eigenpatch.zoo import resolve_text

    folder = copy_folder(tiny_dir, tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(folder)
    _, out = patch_checkpoint(
        folder, [_sequential(calib_windows=4)], tmp_path / "out", state_dir=tmp_path / "state", device=CPU,
        dtype=FP32, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"), show_progress=False,
    )  # fmt: skip
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    baseline = AutoModelForCausalLM.from_pretrained(folder, dtype=FP32).eval()
    assert_onnx_parity_and_effect(out, tiny_tokenizer, tmp_path / "onnx", baseline)
