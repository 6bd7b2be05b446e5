"""STS: spectral basis, the per-sample steering step, the CLIP path (tiny random CLIP), the text path (MiniLM)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from eigenpatch.errors import UsageError
from eigenpatch.patchers.sts.encoders import ClipEncoder, SentenceEncoder, text_views, zero_shot_classify
from eigenpatch.patchers.sts.method import STS, _entropy, confident_views, spectral_basis, steer_predict


def test_spectral_basis_finds_the_prototypes_principal_subspace():
    g = torch.Generator().manual_seed(0)
    c, d, k = 200, 64, 5
    signal = torch.randn(c, k, generator=g) @ torch.randn(k, d, generator=g)
    basis = spectral_basis(signal + 0.05 * torch.randn(c, d, generator=g))
    assert basis.shape == (d, k)
    torch.testing.assert_close(basis.T @ basis, torch.eye(k), atol=1e-5, rtol=0)
    residual = signal - (signal @ basis) @ basis.T  # the signal lies in the span
    assert residual.norm() / signal.norm() < 0.01
    assert spectral_basis(signal, rank=2).shape == (d, 2)
    with pytest.raises(UsageError, match="rank"):
        spectral_basis(signal, rank=0)


def test_the_steering_step_lowers_the_objective():
    g = torch.Generator().manual_seed(1)
    n, v, c, d = 6, 16, 10, 32
    protos = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    views = F.normalize(protos[torch.randint(0, c, (n, 1), generator=g)] + torch.randn(n, v, d, generator=g), dim=-1)
    config = STS(views=v, keep=0.25, lr=0.05, steps=5)
    scale = 20.0
    keep = confident_views(scale * views @ protos.T, config.keep)
    assert keep.shape == (n, 4)
    kept = torch.gather(views, 1, keep[..., None].expand(-1, -1, d))
    before = _entropy((scale * kept @ protos.T).softmax(-1).mean(1))
    after = _entropy(steer_predict(views, protos, config, scale, "sts"))
    assert (after < before).all()  # marginal entropy of the kept views went down for every input
    full = steer_predict(views, protos, config, scale, "full")
    assert full.shape == (n, c) and torch.allclose(full.sum(-1), torch.ones(n))
    assert not torch.allclose(full, steer_predict(views, protos, config, scale, "sts"))
    zero = steer_predict(
        views, protos, STS(views=v, keep=0.25, steps=0), scale, "sts"
    )  # no step: the kept views' mean prediction
    torch.testing.assert_close(zero, (scale * kept @ protos.T).softmax(-1).mean(1))


def test_factored_logits_equal_the_materialized_shifted_prototypes():
    """The STS step never forms ``normalize(z_c + B γ)``; its logits must equal doing so (any basis)."""
    from eigenpatch.patchers.sts.method import _Factored, _mean_probs

    g = torch.Generator().manual_seed(2)
    n, m, c, d, k = 3, 5, 7, 24, 4
    views = F.normalize(torch.randn(n, m, d, generator=g), dim=-1)
    protos = torch.randn(c, d, generator=g)  # not normalized
    basis = torch.randn(d, k, generator=g)  # not orthonormal
    gamma = torch.randn(n, k, generator=g)
    shifted = protos + (gamma @ basis.T)[:, None, :]
    factored = _Factored(views, protos, basis)
    torch.testing.assert_close(factored.mean_probs(gamma, 9.0), _mean_probs(views, shifted, 9.0))
    torch.testing.assert_close(factored.shift_norm(gamma), (gamma @ basis.T).norm(dim=-1))


def test_config_errors_are_clear():
    with pytest.raises(UsageError, match="keep"):
        STS(keep=0)
    with pytest.raises(UsageError, match="method"):
        steer_predict(torch.zeros(1, 2, 4), torch.eye(4), STS(), 1.0, "prompt")


@pytest.fixture(scope="module")
def tiny_clip(tiny_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        # eos_token_id 2: CLIP's legacy pooling (the highest token id), since the tiny vocabulary has no EOS
        text_config={**text, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return CLIPModel(config).eval(), tokenizer


def test_clip_path_runs_end_to_end_without_encoder_gradients(tiny_clip):
    model, tokenizer = tiny_clip
    encoder = ClipEncoder(model, tokenizer)
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    labels = ["dog", "cat", "car", "tree", "house", "boat"]
    config = STS(views=16, keep=0.25, lr=0.5, seed=3)
    zs = zero_shot_classify(encoder, images, labels, "zero-shot", config)
    steered = zero_shot_classify(encoder, images, labels, "sts", config)
    assert zs.shape == steered.shape == (5, 6)
    assert torch.allclose(steered.sum(-1), torch.ones(5))
    assert (steered - zs).abs().max() > 1e-4  # the steered logits differ from zero-shot
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # and the encoders got no gradient
    torch.testing.assert_close(zero_shot_classify(encoder, images, labels, "sts", config), steered)  # seeded
    other = zero_shot_classify(encoder, images, labels, "sts", STS(views=16, keep=0.25, lr=0.5, seed=4))
    assert not torch.equal(other, steered)  # other views


def test_text_views_are_seeded_crops_of_the_input():
    sentence = "the quick brown fox jumps over the lazy dog"
    views = text_views(sentence, 8, random.Random(0))
    assert views[0] == sentence and len(views) == 8
    assert views == text_views(sentence, 8, random.Random(0))
    source = set(sentence.split())
    assert all(v and set(v.split()) <= source for v in views) and len(set(views)) > 1


def test_sentence_encoder_classifies_real_sentences():
    """Real all-MiniLM-L6-v2 (zoo ``minilm-l6``): zero-shot gets clear cases right, STS keeps them."""
    encoder = SentenceEncoder.load("minilm-l6", template="This text is about {}.")
    labels = ["football", "cooking", "astronomy"]
    inputs = [
        "The striker scored twice in the second half and the home side won the cup.",
        "Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.",
        "The telescope observed a distant galaxy whose light left it billions of years ago.",
    ]
    for method in ("zero-shot", "sts", "full"):
        probs = zero_shot_classify(encoder, inputs, labels, method, STS(views=16, keep=0.25))
        assert probs.argmax(-1).tolist() == [0, 1, 2], method


def test_sts_cli(tmp_path, capsys):
    import json

    from eigenpatch.cli import main
    from eigenpatch.errors import EXIT_USAGE

    (tmp_path / "labels.txt").write_text("football\ncooking\n")
    (tmp_path / "inputs.txt").write_text("The goalkeeper saved a penalty.\nSimmer the sauce for ten minutes.\n")
    argv = ["sts", "--labels", str(tmp_path / "labels.txt"), "--inputs", str(tmp_path / "inputs.txt")]
    assert main([*argv, "--views", "8", "--json", str(tmp_path / "out.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["football", "cooking"]
    assert json.loads((tmp_path / "out.json").read_text())["method"] == "sts"
    assert main([*argv, "--template", "no slot"]) == EXIT_USAGE
    assert "{}" in capsys.readouterr().err
