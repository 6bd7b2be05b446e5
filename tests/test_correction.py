"""Low-rank correction of the rounding error (``Quantize(correction_rank=k)``, ``--correct K``).

The math on synthetic matrices (whitening and the output Fisher put the rank where the error
matters), then a tiny Llama through the engine, the format and a reload. Quality on real weights
is measured in ``bench/quantize.py``'s correction rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

import eigenpatch
from eigenpatch.cli import patch_model_main
from eigenpatch.errors import EXIT_USAGE, UsageError
from eigenpatch.format.corrected import CorrectedQuantizedLinear, float_factors, round_rows
from eigenpatch.format.quantized import QuantizedLinear
from eigenpatch.patchers import Quantize
from eigenpatch.patchers.quantize.correct import correction, remaining
from eigenpatch.quantizer import quantize_rtn


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, its 2-bit rounding error and the Gram of correlated inputs (a few strong directions)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 128, generator=g) / 11
    mix = torch.randn(128, 128, generator=g) * torch.logspace(0, -2, 128)  # decaying input spectrum
    x = torch.randn(4096, 128, generator=g) @ mix.T
    error = w - torch.from_numpy(quantize_rtn(w, 2, 32).dequantize())
    return w, error, x.T @ x


def test_the_whitened_correction_takes_back_more_output_error_than_plain_svd():
    _, error, gram = _problem()
    left = remaining(error, torch.zeros(96, 1), torch.zeros(1, 128), gram)
    plain = remaining(error, *correction(error, 16), gram)
    whitened = remaining(error, *correction(error, 16, gram), gram)
    assert whitened < 0.5 * plain < 0.5 * left, (whitened, plain, left)
    more = remaining(error, *correction(error, 32, gram), gram)
    assert more < whitened


def test_the_output_fisher_spends_the_rank_on_the_outputs_the_loss_weighs():
    _, error, gram = _problem(1)
    weights = torch.ones(96)
    weights[:8] = 100.0  # eight outputs the loss is sensitive to
    heavy = slice(0, 8)

    def left_on_heavy(up: torch.Tensor, down: torch.Tensor) -> float:
        return remaining(error[heavy], up[heavy], down, gram)

    assert left_on_heavy(*correction(error, 8, gram, weights.sqrt())) < 0.2 * left_on_heavy(*correction(error, 8, gram))


def test_a_corrected_linear_adds_its_pair_and_keeps_fp16_factors_through_a_cast():
    w, _, _ = _problem()
    base = quantize_rtn(w, 2, 32, fp16_scales=True).module()
    up, down = torch.randn(96, 4), torch.randn(4, 128)
    module = CorrectedQuantizedLinear.from_parts(base, up, down, bias=torch.randn(96))
    x = torch.randn(3, 128)
    expected = x @ (base.dequantized() + up.half().float() @ down.half().float()).T + module.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    module.to(torch.bfloat16)
    assert module.correction_up.dtype == torch.float16 and module.base.scales.dtype == torch.float16
    assert module.stored_bytes() == base.stored_bytes() + 2 * 4 * (96 + 128)


def test_a_bf16_forward_casts_the_fp16_pair_once_and_again_only_when_it_changes():
    w, _, _ = _problem()
    module = CorrectedQuantizedLinear.from_parts(
        quantize_rtn(w, 4, 32).module(), torch.randn(96, 4), torch.randn(4, 128)
    )
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():  # inference (vLLM runs in inference mode)
        first = module(x)
        down, up = module.factors(torch.bfloat16)
        assert module.factors(torch.bfloat16)[0] is down and down.dtype == torch.bfloat16  # kept, not recast
        assert module.resident_bytes() == module.correction_bytes() + 2 * 4 * (96 + 128)  # the copy is counted
        module.correction_up.mul_(2)  # an in-place change (heal's optimizer steps are one)
        assert module.factors(torch.bfloat16)[1] is not up
        assert not torch.equal(module(x), first)
        expected = module.base(x) + x @ module.correction_down.to(x.dtype).T @ module.correction_up.to(x.dtype).T
        torch.testing.assert_close(module(x), expected)
    module(x).float().sum().backward()  # training: the live cast, so gradients reach the pair
    assert module.correction_up.grad is not None


def test_an_8_bit_pair_stores_int8_rows_with_fp16_scales_and_costs_what_the_budget_counts():
    w, _, _ = _problem()
    base = quantize_rtn(w, 3, 32, fp16_scales=True).module()
    up, down = torch.randn(96, 4), torch.randn(4, 128) / 7
    module = CorrectedQuantizedLinear.from_parts(base, up, down, factor_bits=8)
    assert module.correction_down.dtype == torch.int8 and module.correction_up_scale.shape == (96,)
    assert module.correction_down.abs().amax(dim=1).eq(127).all()  # each row spans the int8 range
    assert module.stored_bytes() == base.stored_bytes() + 4 * (96 + 128) + 2 * (4 + 96)
    assert module.correction_bytes() == sum(t.numel() * t.element_size() for t in module.stored_tensors())
    got_down, got_up = module.float_pair()
    assert (got_down - down).abs().max() <= down.abs().amax() / 254 * 1.01  # half a step of the row's grid
    assert (got_up - up).abs().max() <= up.abs().amax() / 254 * 1.01
    x = torch.randn(3, 128)
    expected = x @ (base.dequantized() + got_up @ got_down).T
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.dense_weight(), base.dequantized() + got_up @ got_down)
    module.to(torch.bfloat16)  # a cast of the model keeps codes and scales
    assert module.correction_up.dtype == torch.int8 and module.correction_up_scale.dtype == torch.float16
    with torch.no_grad():
        y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16 and module.factors(torch.bfloat16)[0].dtype == torch.bfloat16


def test_float_factors_trains_in_fp32_rounds_back_and_puts_a_trace_back_bit_for_bit():
    w, _, _ = _problem()
    model = torch.nn.Sequential(
        CorrectedQuantizedLinear.from_parts(
            quantize_rtn(w, 2, 32).module(), torch.randn(96, 8), torch.randn(8, 128), factor_bits=8
        )
    )
    module = model[0]
    stored = [t.clone() for t in module.stored_tensors()]
    objects = [id(t) for t in module.stored_tensors()]
    with float_factors(model, trained=False) as found:
        assert found == [module] and module.correction_down.dtype == torch.float32
        assert module.correction_down_scale is None and module.correction_down.requires_grad
    assert [id(t) for t in module.stored_tensors()] == objects  # a trace leaves the very tensors
    with float_factors(model):  # untouched: rounding again gives the same bytes
        pass
    assert all(torch.equal(a, b) for a, b in zip(stored, module.stored_tensors(), strict=True))
    with float_factors(model):
        module.correction_up.data.mul_(2)
    assert module.correction_up.dtype == torch.int8
    doubled = 2 * stored[1].float() * stored[3].float()[:, None]  # the trained pair, rounded per row again
    assert torch.equal(module.correction_up_scale, round_rows(doubled)[1])
    assert torch.equal(module.correction_up, stored[1])  # doubling a row doubles its scale, not its codes


@pytest.fixture(scope="module")
def corrected_tiny(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama, GPTQ int2 (groups of 32) with and without rank-16 corrections; the first saved."""
    from eigenpatch.zoo import resolve_text

    text = resolve_text("news", "calib")
    common = {"bits": 2, "group": 32, "calib_windows": 8, "calib_seq_len": 64, "fisher_windows": 4}
    models, reports = {}, {}
    for rank in (0, 16):
        models[rank] = make_tiny("llama")
        config = Quantize(correction_rank=rank, **common)
        reports[rank] = eigenpatch.patch(
            models[rank], config, tokenizer=tiny_tokenizer, calib_text=text, show_progress=False
        )
    out = eigenpatch.save(models[16], tmp_path_factory.mktemp("corrected") / "q2r16", tokenizer=tiny_tokenizer)
    return models, reports, out


def test_each_quantized_linear_gets_its_correction_and_the_bytes_count_it(corrected_tiny):
    models, reports, out = corrected_tiny
    corrected = {n: m for n, m in models[16].named_modules() if isinstance(m, CorrectedQuantizedLinear)}
    assert len(corrected) == 14 and all(m.rank == 16 for m in corrected.values())
    extra = sum(m.correction_bytes() for m in corrected.values())
    assert reports[16]["steps"][0]["bytes_after"] == reports[0]["steps"][0]["bytes_after"] + extra
    assert reports[16]["steps"][0]["correction_rank"] == 16
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    name, module = next(iter(corrected.items()))
    assert layers[name] == {**module.spec(), "kind": "quantized_corrected"}
    assert not any(n.startswith(f"{name}.") for n in layers)  # the base is a part, not a layer


def test_the_correction_brings_the_model_closer_to_dense_and_reloads_identically(corrected_tiny, tiny_tokenizer):
    from eigenpatch.evaluate import tokenize
    from eigenpatch.zoo import resolve_text

    models, _, out = corrected_tiny
    ids = tokenize(tiny_tokenizer, resolve_text("news", "eval"), 512).view(4, 128)
    with torch.no_grad():
        dense = make_tiny("llama")(ids).logits

        def error(m: torch.nn.Module) -> float:
            return float((m(ids).logits - dense).norm())

        assert error(models[16]) < 0.8 * error(models[0]), (error(models[16]), error(models[0]))
        loaded = eigenpatch.load(out)
        assert isinstance(loaded.model.layers[0].mlp.down_proj.base, QuantizedLinear)
        down_proj = loaded.model.layers[0].mlp.down_proj
        assert down_proj.correction_up.dtype == torch.int8 and down_proj.correction_up_scale.dtype == torch.float16
        torch.testing.assert_close(loaded(ids).logits, models[16](ids).logits, rtol=0, atol=0)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["version"] == 2  # int8 factors: a v1 reader would misread them, so it is refused


def test_a_negative_correction_rank_gets_one_line_and_exit_2(tmp_path, capsys):
    flags = ["--bits", "2", "--correct", "-1", "-o", str(tmp_path / "out")]
    assert patch_model_main([str(tmp_path / "no-such-model"), *flags]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "--correct -1" in err and len(err.splitlines()) == 1


def test_block_local_refinement_lowers_each_layers_output_error(tiny_tokenizer):
    """Adam on the corrections only (fp32 while it trains, int8 rows after), against the dense layer's outputs."""
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    config = Quantize(bits=2, group=32, correction_rank=16, refine_steps=32, calib_windows=8, calib_seq_len=64)
    config.fisher_windows = 4
    report = eigenpatch.patch(
        model, config, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"), show_progress=False
    )
    assert report["steps"][0]["refine_error_ratio"] < 0.9  # measured 0.51
    assert all(
        m.correction_up.dtype == torch.int8 and m.correction_down_scale is not None
        for m in model.modules()
        if isinstance(m, CorrectedQuantizedLinear)
    )


def test_patch_model_corrects_out_of_core(tiny_tokenizer, tmp_path, capsys):
    """``patch-model --bits 2 --correct 8``: layer by layer from the shards, refined, reloadable."""
    source, out = tmp_path / "tiny", tmp_path / "q2r8"
    make_tiny("llama").save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    flags = ["--bits", "2", "--group", "32", "--correct", "8", "--refine-steps", "4", "--fisher-windows", "2"]
    flags += ["--calib-windows", "4", "--calib-seq-len", "64"]
    assert patch_model_main([str(source), *flags, "-o", str(out)]) == 0
    assert "rank-8 corrections" in capsys.readouterr().out
    report = json.loads((out / "eigenpatch_report.json").read_text())
    assert report["out_of_core"] and report["steps"][0]["correction_rank"] == 8
    loaded = eigenpatch.load(out)
    assert sum(isinstance(m, CorrectedQuantizedLinear) for m in loaded.modules()) == 14
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_killed_corrected_run_resumes_without_a_second_fisher_pass_to_the_same_tensors(
    tiny_tokenizer, tmp_path, monkeypatch
):
    """The output Fisher's weights are the quantize plan: a run killed after layer 1 resumes at
    layer 1 with them restored (no Fisher pass again) and writes what an uninterrupted run writes."""
    from conftest import killed_after_layer
    from safetensors.torch import load_file

    from eigenpatch.out_of_core import patch_checkpoint
    from eigenpatch.zoo import resolve_text

    source = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(source)
    config = Quantize(bits=2, group=32, correction_rank=8, refine_steps=4, calib_windows=4, calib_seq_len=64)
    config.fisher_windows = 2
    text = resolve_text("news", "calib")

    def run(out: str) -> dict:
        report, _ = patch_checkpoint(
            source, [config], tmp_path / out, state_dir=tmp_path / f"state-{out}", device=torch.device("cpu"),
            dtype=torch.float32, tokenizer=tiny_tokenizer, calib_text=text, show_progress=False,
        )  # fmt: skip
        return report

    def stored(out: str) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted((tmp_path / out).glob("*.safetensors")) for k, v in load_file(f).items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two runs compared bit for bit: one BLAS summation order
    try:
        run("reference")
        with killed_after_layer(monkeypatch, 1):
            run("out")
        report = run("out")
    finally:
        torch.set_num_threads(threads)
    assert report["engine"]["resumed_at_layer"] == 1 and set(report["engine"]["passes"]) == {"fit"}
    reference, resumed = stored("reference"), stored("out")
    assert reference.keys() == resumed.keys() and any(k.endswith("correction_up") for k in reference)
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_fp16_corrections_write_format_v1_and_an_old_recipe_reruns_with_them(tiny_tokenizer, tmp_path):
    """``--correction-bits 16`` keeps what v1 readers load; a quantize entry written before
    ``correction_bits`` existed (config version 1) replays with the fp16 factors it stored."""
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    config = Quantize(bits=2, group=32, correction_rank=4, correction_bits=16, calib_windows=2, calib_seq_len=32)
    config.fisher_windows = 1
    eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"),
                     show_progress=False)  # fmt: skip
    out = eigenpatch.save(model, tmp_path / "fp16", tokenizer=tiny_tokenizer)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["version"] == 1 and qconfig["recipe"][0]["version"] == 2
    assert all(spec["factor_bits"] == 16 for spec in qconfig["layers"].values())
    loaded = eigenpatch.load(out).model.layers[0].self_attn.q_proj
    assert loaded.correction_up.dtype == torch.float16 and loaded.correction_up_scale is None

    old = {k: v for k, v in Quantize(correction_rank=4).to_dict().items() if k != "correction_bits"}
    assert eigenpatch.config_from_dict({**old, "version": 1}).correction_bits == 16
    assert eigenpatch.config_from_dict(Quantize(correction_rank=4).to_dict()).correction_bits == 8
    with pytest.raises(UsageError, match="--correction-bits 4"):
        Quantize(correction_bits=4)
