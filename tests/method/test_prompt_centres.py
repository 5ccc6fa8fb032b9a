"""LAIC-RS prompt-learned semantic centres (rayclust/method/prompt_centres.py) on the tiny
random open_clip model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayclust.encoders import load_encoder
from rayclust.method.prompt_centres import PromptCentres

PHRASES = ["a photo of a dog.", "a photo of a golden retriever.", "a photo of a car."]


@pytest.fixture
def enc():
    return load_encoder("rayclust-tiny", None, "cpu")


def _centres(enc):
    return PromptCentres(enc.text_tower().freeze(), enc.tokenizer(PHRASES))


def test_at_initialisation_the_centres_are_the_phrases_text_features(enc):
    centres = _centres(enc)
    out = centres()
    assert out.shape == (3, enc.embed_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    expected = F.normalize(enc.encode_texts(PHRASES), dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # trimmed to the longest prompt, and only the context is state
    assert centres.frozen.shape[1] == int(enc.tokenizer(PHRASES).argmax(dim=1).max()) + 1
    assert list(centres.state_dict()) == ["ctx"]


def test_only_the_context_between_start_and_end_gets_gradients(enc):
    centres = _centres(enc)
    target = F.normalize(torch.randn(3, enc.embed_dim, generator=torch.Generator().manual_seed(0)),
                         dim=1)
    loss = -(centres() * target).sum()
    loss.backward()
    grad = centres.ctx.grad
    learn = centres.learnable
    assert grad[learn].abs().sum() > 0
    assert torch.count_nonzero(grad[~learn]) == 0  # start, end-of-text and padding stay put
    assert [p for p in enc.model.parameters() if p.grad is not None] == []
    assert [n for n, p in centres.named_parameters() if p.requires_grad] == ["ctx"]
    eot = enc.tokenizer(PHRASES).argmax(dim=1)
    assert learn.sum(dim=1).tolist() == (eot - 1).tolist()


def test_the_context_learns_and_names_itself_by_tokens(enc):
    centres = _centres(enc)
    tokens = enc.tokenizer(PHRASES)[:, : centres.frozen.shape[1]]
    # at initialisation the nearest vocabulary tokens are the phrase's own tokens
    assert centres.nearest_tokens() == [tokens[k][centres.learnable[k]].tolist() for k in range(3)]
    target = F.normalize(torch.randn(3, enc.embed_dim, generator=torch.Generator().manual_seed(1)),
                         dim=1)
    with torch.no_grad():
        before = float((centres() * target).sum(dim=1).mean())
    optimiser = torch.optim.Adam([centres.ctx], lr=0.05)
    for _ in range(30):
        optimiser.zero_grad()
        (-(centres() * target).sum()).backward()
        optimiser.step()
    with torch.no_grad():
        after = float((centres() * target).sum(dim=1).mean())
    assert after > before + 0.3, (before, after)
    probabilities = centres.assign(target, temperature=0.05)
    assert torch.equal(probabilities.argmax(dim=1), torch.arange(3))


def test_prompts_need_a_context_token(enc):
    tokens = enc.tokenizer(["", "dog"])
    with pytest.raises(ValueError, match="at least one token"):
        PromptCentres(enc.text_tower(), tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_tower_runs_in_bf16_and_the_centres_stay_float32():
    enc = load_encoder("rayclust-tiny", None, "cuda")
    centres = PromptCentres(enc.text_tower().freeze(), enc.tokenizer(PHRASES))
    assert centres.ctx.device.type == "cuda" and centres.ctx.dtype == torch.float32
    out = centres()
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    expected = F.normalize(enc.encode_texts(PHRASES), dim=1)  # also bf16 autocast on CUDA
    torch.testing.assert_close(out.cpu(), expected, atol=2e-2, rtol=0)
    out.sum().backward()
    assert centres.ctx.grad is not None and torch.isfinite(centres.ctx.grad).all()
