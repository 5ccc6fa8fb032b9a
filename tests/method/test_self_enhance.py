"""Stage 2: the self-enhanced model and its training step (ALGORITHM.md 4.4)."""

from __future__ import annotations

import pytest
import torch

from rayclust.encoders import load_encoder
from rayclust.method.adapters import adapter_state_dict, apply_adapter
from rayclust.method.augment import StrongAugment, weak_view
from rayclust.method.heads import SEICHeads, TACHeads
from rayclust.method.pseudo_labels import ConfidenceEMA, weighted_cross_entropy
from rayclust.method.self_enhance import (SelfEnhancedModel, SelfEnhanceStep, compile_tower,
                                          freeze_text_branch, make_optimizer, predict_uint8,
                                          trainable_parameters)

K = 3


@pytest.fixture
def setup():
    """A fresh tiny random-weight CLIP (64x64 input), LoRA on its tower, and SEIC heads."""
    enc = load_encoder("rayclust-tiny", None, "cpu")
    torch.manual_seed(0)
    heads = freeze_text_branch(SEICHeads(enc.embed_dim, K))
    apply_adapter(enc.model.visual, "lora", rank=4)
    model = SelfEnhancedModel(enc.model.visual, heads, enc.preprocess.mean, enc.preprocess.std)
    images = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return enc, model, images


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_matches_the_stage1_pipeline_at_init(setup):
    enc, model, images = setup
    expected = model.heads(enc.encode_uint8(images))
    with torch.no_grad():
        logits = model.eval()(weak_view(images, model.mean, model.std))
    assert torch.allclose(logits, expected, atol=1e-5)
    labels, confidence = predict_uint8(model, images)
    probs = expected.softmax(-1)
    assert torch.equal(labels, probs.argmax(-1)) and torch.allclose(confidence, probs.amax(-1), atol=1e-6)


def test_only_adapter_and_image_branch_are_trainable(setup):
    _, model, _ = setup
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora" in n or n.startswith("heads.image.") for n in names)
    assert {n for n in names if n.startswith("heads.")} == {
        "heads.image.projection.weight", "heads.image.projection.bias",
        "heads.image.cluster.weight", "heads.image.cluster.bias"}
    assert len(trainable_parameters(model)) == len(names)
    tac = freeze_text_branch(TACHeads(8, K))
    assert all(p.requires_grad == n.startswith("image.") for n, p in tac.named_parameters())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_training_reduces_weighted_ce_and_touches_only_trainables(setup, device):
    """On CUDA the step runs under bf16 autocast with the on-device strong view and fused AdamW."""
    _, model, images = setup
    labels = torch.arange(len(images)) % K  # fixed pseudo-labels, learnable from brightness
    images = images // torch.tensor([1, 3, 9], dtype=torch.uint8)[labels].view(-1, 1, 1, 1)
    weights = torch.linspace(0.2, 1.0, len(images))
    model, images, labels, weights = (t.to(device) for t in (model, images, labels, weights))
    before = snapshot(model)

    def weak_loss():
        with torch.no_grad():
            return float(weighted_cross_entropy(model.eval()(weak_view(images, model.mean, model.std)),
                                                labels, weights))

    start = weak_loss()
    step = SelfEnhanceStep(model, make_optimizer(trainable_parameters(model), lr=1e-2), model.mean,
                           model.std, device, augment=StrongAugment(model.mean, model.std),
                           autocast=device == "cuda")
    g = torch.Generator().manual_seed(0)
    parts = [step(images, labels, weights, g) for _ in range(20)]
    assert set(parts[0]) >= {"loss", "mean_weight", "agreement"}
    assert all(torch.isfinite(p["loss"]) and not p["loss"].requires_grad for p in parts)
    assert weak_loss() < 0.75 * start
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, name
    assert any(("lora_b" in n) and not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_zero_weights_give_zero_loss_and_gradients(setup):
    _, model, images = setup
    params = trainable_parameters(model)
    before = snapshot(model)
    step = SelfEnhanceStep(model, make_optimizer(params), model.mean, model.std, "cpu")
    out = step(images[:4], torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.Generator().manual_seed(0))
    assert float(out["loss"]) == 0.0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in params)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # AdamW, wd 0


def test_online_pseudo_labels(setup):
    _, model, images = setup
    step = SelfEnhanceStep(model, make_optimizer(trainable_parameters(model)), model.mean, model.std, "cpu",
                           augment=StrongAugment(model.mean, model.std))
    ema = ConfidenceEMA(K, momentum=0.5)
    model.train()
    labels, weights = step.online(images, ema)
    assert model.training  # train flag restored
    expected_labels, confidence = predict_uint8(model, images)
    assert torch.equal(labels, expected_labels)
    # the first batch sets the statistics (no 1/K prior)
    assert float(ema.mean) == pytest.approx(float(confidence.double().mean()), rel=1e-5)
    assert float(ema.var) == pytest.approx(float(confidence.double().var()), rel=1e-4)
    assert weights.shape == (12,) and float(weights.min()) >= 0 and float(weights.max()) == 1.0
    out = step(images, labels, weights, torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"])


def test_heads_run_in_float32_under_autocast(setup):
    """Issue 10 item 5: under bf16 autocast the tower may run in bf16, but the heads must see the
    float32 features exactly as stage 1 does (bf16 heads quantise the logits: confidences
    collapse onto a few values and argmaxes flip). CPU autocast stands in for CUDA's."""
    _, model, images = setup
    x = weak_view(images, model.mean, model.std)
    seen = {"dtypes": set()}
    model.visual.register_forward_hook(lambda m, i, out: seen.__setitem__("features", out))
    for layer in model.heads.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda m, i, out: seen["dtypes"].add((i[0].dtype, out.dtype)))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert seen["features"].dtype == torch.bfloat16  # the tower did run under autocast
    assert seen["dtypes"] == {(torch.float32, torch.float32)} and logits.dtype == torch.float32
    with torch.no_grad():  # the same features through the heads outside any autocast region
        expected = model.heads(torch.nn.functional.normalize(seen["features"].float(), dim=-1))
    assert torch.equal(logits, expected)
    # the training step's forward too
    step = SelfEnhanceStep(model, make_optimizer(trainable_parameters(model)), model.mean,
                           model.std, "cpu")
    seen["dtypes"].clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(images, torch.arange(len(images)) % K, torch.ones(len(images)),
             torch.Generator().manual_seed(0))
    assert seen["dtypes"] == {(torch.float32, torch.float32)}


@pytest.mark.gpu
@CUDA
def test_bf16_tower_matches_stage1_predictions_on_cuda(setup):
    """On CUDA, stage 2's prediction under bf16 autocast (the default there) agrees with stage
    1's: the same bf16 tower as the embed stage (`encode_uint8`), float32 heads on its features."""
    enc, model, images = setup
    enc = load_encoder("rayclust-tiny", None, "cuda")
    model = SelfEnhancedModel(enc.model.visual, model.heads, model.mean, model.std).cuda()
    images = torch.randint(0, 256, (256, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = model.heads(enc.encode_uint8(images).cuda()).softmax(-1).cpu()
    labels, confidence = predict_uint8(model, images, autocast=True)
    assert torch.equal(labels, probs.argmax(-1))
    assert torch.allclose(confidence, probs.amax(-1), atol=1e-5, rtol=0)
    assert len(torch.unique(confidence)) > 0.9 * len(images)  # not quantised


def test_make_optimizer_requires_trainables():
    with pytest.raises(ValueError, match="no trainable"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])


@pytest.mark.parametrize("device, backend", [
    ("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=[pytest.mark.gpu, CUDA])])
def test_compiled_tower_keeps_names_and_outputs(setup, device, backend):
    """On the CPU, dynamo's capture and AOT autograd only (backend aot_eager): inductor's code
    generation takes ~35 s on a 2-core CPU. On CUDA, the production backend."""
    _, model, images = setup
    model, images = model.to(device), images.to(device)
    x = weak_view(images, model.mean, model.std)
    with torch.no_grad():
        eager = model.eval()(x)
    keys = list(model.state_dict())
    adapter = list(adapter_state_dict(model.visual))
    compile_tower(model.visual, backend=backend)
    assert list(model.state_dict()) == keys and list(adapter_state_dict(model.visual)) == adapter
    with torch.no_grad():
        compiled = model.eval()(x)
    assert torch.allclose(compiled, eager, atol=1e-4)
    step = SelfEnhanceStep(model, make_optimizer(trainable_parameters(model), lr=1e-2), model.mean,
                           model.std, device)
    before = snapshot(model)
    labels = (torch.arange(len(images)) % K).to(device)
    out = step(images, labels, torch.ones(len(images), device=device),
               torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()
               if "lora_b" in n)
