"""``snap``: input embeddings replaced by the nearest vocabulary row (``patch-model --snap``).

The search is checked on SmolLM2's real table (near neighbours, bf16 rounding), the transform on
tiny models (Llama, and Gemma3, which scales its embeddings), the CLI and the server's refusal of
a split table. The registry's contract test serves a snap checkpoint in vLLM with prompt
embeddings and exports it to ONNX.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny, pushed

import eigenpatch
from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import TokenSnap, decoder_layers, token_identities_removed
from eigenpatch.format.snap import CHUNK, half_gaps, nearest_rows, snap_rows
from eigenpatch.patchers import Snap


@pytest.fixture(scope="module")
def smollm2_table(smollm2_dir) -> torch.Tensor:
    """SmolLM2-135M's embedding table, read from its safetensors file."""
    from safetensors import safe_open

    file = next(smollm2_dir.glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_row_finds_itself_in_a_real_table(smollm2_table, dtype):
    """Token-id inputs must pass unchanged: in bf16 the GEMM's scores round enough to rank a near
    neighbour first, and only the exact re-ranking of the candidates keeps each row itself."""
    table = smollm2_table.to(dtype)
    ids = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(0))[:1500]
    ids = torch.cat([ids, torch.arange(300)])  # low ids: byte tokens and specials, the closest rows
    found = nearest_rows(table[ids], table)
    same = (table[found] == table[ids]).all(-1)  # a duplicated row may be found under another id
    assert bool(same.all()), f"{int((~same).sum())} of {len(ids)} rows snapped elsewhere"
    assert torch.equal(snap_rows(table[ids], table, 1.0), table[ids])


def test_a_cluster_wider_than_the_candidates_is_searched_exactly(monkeypatch):
    """150 near-identical rows tie in bf16 scores beyond the 64 candidates: only the exact search
    over the whole table finds each row itself."""
    import eigenpatch.format.snap as snap

    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(32, generator=g) + 0.05 * torch.randn(150, 32, generator=g)
    table = torch.cat([cluster, torch.randn(500, 32, generator=g)]).bfloat16()
    exact = []
    real = snap._exact_nearest
    monkeypatch.setattr(snap, "_exact_nearest", lambda x, t, s: exact.append(len(x)) or real(x, t, s))
    found = nearest_rows(table[:150], table)
    assert bool((table[found] == table[:150]).all())
    assert sum(exact) > 0  # the fallback ran


def test_perturbations_below_half_the_gap_snap_back_and_larger_ones_need_not():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(700, 32, generator=g)
    ids = torch.arange(CHUNK + 44)  # more than one chunk
    sampled, gaps = half_gaps(table, sample=10_000)  # every row: sample > vocab
    gaps = torch.empty(700).index_copy_(0, sampled, gaps)
    assert sorted(sampled.tolist()) == list(range(700))
    d = torch.cdist(table, table) + torch.eye(700) * 1e9
    assert torch.allclose(gaps, d.min(1).values / 2, rtol=1e-4)
    direction = torch.randn(len(ids), 32, generator=g)
    direction /= direction.norm(dim=-1, keepdim=True)
    inside = table[ids] + 0.99 * gaps[ids, None] * direction
    assert torch.equal(nearest_rows(inside, table), ids)
    # past the midpoint towards the nearest neighbour: the neighbour wins
    neighbour = d[ids].argmin(1)
    across = table[ids] + 0.51 * (table[neighbour] - table[ids])
    assert torch.equal(nearest_rows(across, table), neighbour)


def _noisy(model: torch.nn.Module, ids: torch.Tensor, size: float) -> torch.Tensor:
    """What layer 0 gets for ``ids`` (scaled for Gemma), pushed ``size`` x the mean row norm."""
    with torch.no_grad():
        return pushed(model.get_input_embeddings()(ids), size, seed=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_snapped_model_reads_tokens_whatever_embeddings_it_is_sent(family):
    model = make_tiny(family)
    plain = copy.deepcopy(model)
    report = eigenpatch.patch(model, Snap(), show_progress=False)["steps"][0]
    dim = model.config.hidden_size
    assert report["scale"] == pytest.approx(dim**0.5 if family == "gemma3" else 1.0, rel=1e-3)
    assert 0 < report["safe_radius"]["min"] <= report["safe_radius"]["median"]
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    noisy = _noisy(model, ids, 0.2)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        assert torch.equal(clean, plain(input_ids=ids).logits)  # token ids: unchanged, bit for bit
        assert torch.equal(model(inputs_embeds=noisy).logits, clean)  # sent embeddings: read as the tokens
        assert (plain(inputs_embeds=noisy).logits - clean).abs().max() > 1e-2  # which the noise did change
        with token_identities_removed(model) as removed:
            assert removed == ["model.layers.0.snap_in"]
            assert (model(inputs_embeds=noisy).logits - clean).abs().max() > 1e-2
        assert torch.equal(model(inputs_embeds=noisy).logits, clean)  # re-attached


def test_snap_runs_before_a_projection_on_the_same_input():
    """Whatever order the recipe attached them in, the projection sees the snapped rows."""
    from eigenpatch.format.interventions import HiddenProjection, attach

    model = make_tiny("llama")
    layer = decoder_layers(model)[0]
    basis = torch.linalg.qr(torch.randn(128, 4, generator=torch.Generator().manual_seed(0)))[0]
    attach(layer, HiddenProjection.from_bases(torch.zeros(128), basis.T.contiguous(), basis, mode="drop", hook="pre"))
    eigenpatch.patch(model, Snap(), show_progress=False)  # attached second, runs first
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=_noisy(model, ids, 0.2)).logits, model(input_ids=ids).logits)


def test_saved_snap_checkpoint_stores_no_tensor_and_reloads_bound(tmp_path):
    model = make_tiny("llama")
    eigenpatch.patch(model, Snap(), show_progress=False)
    out = eigenpatch.save(model, tmp_path / "snapped")
    spec = json.loads((out / "config.json").read_text())["quantization_config"]["interventions"]
    assert spec == {
        "model.layers.0.snap_in": {"kind": "snap", "hook": "pre", "dim": 128, "start": 0, "vocab": 512, "scale": 1.0}
    }
    loaded = eigenpatch.load(out)
    snap = loaded.model.layers[0].snap_in
    assert isinstance(snap, TokenSnap) and snap.table() is not None
    assert snap.table().data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # the model's own table
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(inputs_embeds=_noisy(loaded, ids, 0.2)).logits, loaded(input_ids=ids).logits)


def test_cli_snap_prints_its_safe_radius(tiny_dir, tmp_path, capsys):
    from eigenpatch.cli import patch_model_main

    assert patch_model_main([str(tiny_dir), "--snap", "-o", str(tmp_path / "out"), "-q"]) == 0
    text = capsys.readouterr().out
    assert "snap: 512 rows; a perturbation below" in text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["recipe"][0]["transform"] == "snap"


def test_serve_refuses_prompt_embeds_on_a_split_table(tmp_path):
    from eigenpatch.serving.launcher import check_snap_parallelism

    model = make_tiny("llama")
    eigenpatch.patch(model, Snap(), show_progress=False)
    out = eigenpatch.save(model, tmp_path / "snapped")
    check_snap_parallelism(out, ["--enable-prompt-embeds"])  # TP 1: fine
    check_snap_parallelism(out, ["--tensor-parallel-size", "2"])  # no embeddings accepted: snap is off
    with pytest.raises(UsageError, match="tensor-parallel-size 1"):
        check_snap_parallelism(out, ["--enable-prompt-embeds", "-tp", "2"])


def test_a_model_whose_first_layer_reads_something_else_is_refused():
    model = make_tiny("llama")
    embedding = model.get_input_embeddings()
    embedding.register_forward_hook(lambda m, args, out: out + 1.0)  # e.g. a learned offset added
    with pytest.raises(UsageError, match="does not read rows of its embedding table"):
        eigenpatch.patch(model, Snap(), show_progress=False)
