"""Tests for rayclust.encoders on the tiny offline architectures (no network, no weights)."""
import socket
import urllib.request

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip import pretrained as oc_pretrained
from PIL import Image

from rayclust.encoders import (
    ClipEncoder,
    EncoderLoadError,
    ImagePreprocess,
    describe_model,
    load_encoder,
    resolve_device,
)

TINY = "rayclust-tiny"


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return load_encoder(TINY, None, device="cpu")


def _rand_rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content plus noise, so resampling differences would show
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _normalise(u8: np.ndarray, pp: ImagePreprocess) -> torch.Tensor:
    x = torch.from_numpy(u8).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(pp.mean).view(3, 1, 1)) / torch.tensor(pp.std).view(3, 1, 1)


# ----------------------------------------------------------------------------- building

def test_tiny_builds_as_configured(enc):
    assert enc.embed_dim == 64
    assert enc.preprocess.size == (64, 64)
    assert enc.preprocess.resize_mode == "shortest" and enc.preprocess.interpolation == "bicubic"
    assert enc.device == torch.device("cpu") and enc.pretrained is None
    assert enc.cache_key == "rayclust-tiny__none-seed0"
    assert not enc.model.training
    assert TINY in open_clip.list_models()


def test_same_seed_same_weights_and_rng_untouched(enc):
    state = torch.random.get_rng_state()
    again = load_encoder(TINY, "none", device="cpu", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG is not perturbed
    sd0, sd1 = enc.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(enc.encode_uint8(x), again.encode_uint8(x))
    other = load_encoder(TINY, None, device="cpu", seed=1)
    assert other.cache_key == "rayclust-tiny__none-seed1"
    assert not torch.equal(enc.encode_uint8(x), other.encode_uint8(x))


def test_local_checkpoint(enc, tmp_path):
    path = tmp_path / "tiny-ckpt.pt"
    torch.save(enc.model.state_dict(), path)
    loaded = load_encoder(TINY, str(path), device="cpu", seed=123)  # weights come from the file
    x = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded.encode_uint8(x), enc.encode_uint8(x))
    assert loaded.cache_key.startswith("rayclust-tiny__tiny-ckpt-")
    assert "/" not in loaded.cache_key


def test_describe_model_matches_the_loaded_model(enc, tmp_path):
    """The driver's weight-free description (meta device) gives what loading gives."""
    path = tmp_path / "tiny-ckpt.pt"
    torch.save(enc.model.state_dict(), path)
    for name, tag, seed in [(TINY, None, 0), (TINY, str(path), 0), ("rayclust-tiny-bidir", None, 3),
                            ("ViT-B/32", "none", 1)]:
        loaded = load_encoder(name, tag, device="cpu", seed=seed)
        described = describe_model(name, tag, seed)
        assert described.preprocess == loaded.preprocess and described.embed_dim == loaded.embed_dim
        assert described.cache_key == loaded.cache_key and not described.downloads


def test_describe_model_needs_no_weights(no_network):
    """A pretrained tag is described from open_clip's tables alone: its preprocessing, nothing
    downloaded; a hub model is left to the worker that loads it."""
    openai = describe_model("ViT-B-32", "openai")
    assert openai.embed_dim == 512 and openai.preprocess.size == (224, 224)
    assert openai.cache_key == "ViT-B-32__openai" and openai.downloads
    siglip = describe_model("ViT-B-16-SigLIP", "webli")
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and siglip.preprocess.resize_mode == "squash"
    assert describe_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None) is None
    with pytest.raises(EncoderLoadError, match="ViT-B-32"):
        describe_model("ViT-B-33", None)


# ----------------------------------------------------------------------------- images

def test_encode_uint8_shape_and_norm(enc):
    x = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    out = enc.encode_uint8(x)
    assert out.shape == (5, 64) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(enc.encode_uint8(torch.from_numpy(x)), out)
    assert enc.encode_uint8(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 64)
    with pytest.raises(ValueError):
        enc.encode_uint8(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError):
        enc.encode_uint8(np.zeros((1, 64, 64, 3), np.float32))


def _odd_images():
    rgb = _rand_rgb(40, 30)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16))
    assert i16.mode == "I;16"
    return [
        rgb, rgba, pal, pal_t, rgb.convert("L"), rgb.convert("LA"), rgb.convert("CMYK"), rgb.convert("1"),
        i16, Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)),  # mode F
        i16.convert("I"),
        _rand_rgb(3, 5), _rand_rgb(1000, 10), _rand_rgb(10, 1000), _rand_rgb(64, 64),
    ]


def test_encode_images_any_mode_and_size(enc):
    images = _odd_images()
    for im in images:
        u8 = enc.preprocess.to_uint8(im)
        assert u8.shape == (64, 64, 3) and u8.dtype == np.uint8, im.mode
    out = enc.encode_images(images, batch_size=4)
    assert out.shape == (len(images), 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(images)))
    assert enc.encode_images([]).shape == (0, 64)


def test_mode_conversion_semantics():
    pp = ImagePreprocess((8, 8), (0.5,) * 3, (0.5,) * 3)
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert (pp.to_uint8(clear) == 255).all()  # transparent -> white, not black
    i16 = Image.fromarray(np.full((8, 8), 257 * 100, np.uint16))
    assert i16.mode == "I;16"
    assert (pp.to_uint8(i16) == 100).all()  # 16-bit scaled, not clipped
    assert (pp.to_uint8(i16.convert("I")) == 100).all()  # how PIL often opens 16-bit PNGs
    gray = Image.new("L", (8, 8), 77)
    assert (pp.to_uint8(gray) == 77).all()


@pytest.mark.parametrize("wh", [(97, 131), (131, 97), (64, 64), (3, 5), (1000, 10)])
def test_to_uint8_matches_open_clip_preprocess(wh):
    _, _, oc_pp = open_clip.create_model_and_transforms(TINY, pretrained=None)
    model = open_clip.create_model(TINY, pretrained=None)
    pp = ImagePreprocess.from_cfg(model.visual.preprocess_cfg)
    img = _rand_rgb(*wh, seed=sum(wh))
    ref = oc_pp(img)
    ours = _normalise(pp.to_uint8(img), pp)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 0.05


@pytest.mark.parametrize("size,mode,interp", [
    ((64, 64), "longest", "bicubic"), ((48, 80), "longest", "bilinear"), ((48, 80), "squash", "bicubic"),
    ((48, 80), "shortest", "bicubic"), ((64, 64), "shortest", "bilinear"),
])
def test_resize_modes_match_open_clip(size, mode, interp):
    pp = ImagePreprocess(size, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27), interp, mode, fill_color=0)
    ref_tf = open_clip.image_transform(size, is_train=False, mean=pp.mean, std=pp.std,
                                       resize_mode=mode, interpolation=interp)
    for wh in [(97, 131), (131, 97), (200, 20), (5, 3)]:
        img = _rand_rgb(*wh, seed=wh[0])
        ref = ref_tf(img)
        ours = _normalise(pp.to_uint8(img), pp)
        assert ours.shape == ref.shape, (wh, mode)
        assert (ours - ref).abs().max() < 0.05, (wh, mode)


def test_non_square_model_preprocess():
    enc = load_encoder("rayclust-tiny-bidir", None, device="cpu")
    assert enc.preprocess.size == (48, 80)
    out = enc.encode_images([_rand_rgb(100, 100), _rand_rgb(7, 300)])
    assert out.shape == (2, 64)


# ----------------------------------------------------------------------------- text

TEXTS = ["a photo of a cat.", "", "dog", "an extremely " + "long " * 100 + "sentence",
         "a blurry photo of the espresso machine.", "x", "art of the jack-o'-lantern."]


@pytest.mark.parametrize("name,trims", [(TINY, True), ("rayclust-tiny-custom", True), ("rayclust-tiny-bidir", False)])
def test_encode_texts_matches_untrimmed(name, trims, enc):
    e = enc if name == TINY else load_encoder(name, None, device="cpu")
    assert e.trims_text is trims
    out = e.encode_texts(TEXTS, batch_size=3)  # small batches: exercises sort + unsort
    with torch.no_grad():
        ref = e.model.encode_text(e.tokenizer(TEXTS))  # full 77-token inputs
    assert out.shape == (len(TEXTS), 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(len(TEXTS)))  # raw, not normalised
    assert e.encode_texts([]).shape == (0, 64)


TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", lambda c: f"itap of my {c}."]
NOUNS = ["cat", "golden retriever", "aircraft carrier", "tree frog", "{weird} noun"]


def _manual_ensemble(enc, normalize_templates):
    rows = []
    for noun in NOUNS:
        prompts = [t(noun) if callable(t) else t.format(noun) for t in TEMPLATES]
        with torch.no_grad():
            f = enc.model.encode_text(enc.tokenizer(prompts))
        if normalize_templates:
            f = F.normalize(f, dim=-1)
        rows.append(F.normalize(f.mean(0), dim=-1))
    return torch.stack(rows)


def test_prompt_ensemble(enc):
    calls = []
    raw = enc.encode_prompt_ensemble(NOUNS, TEMPLATES, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert raw.shape == (len(NOUNS), 64) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, _manual_ensemble(enc, False), atol=1e-5, rtol=0)
    total = len(NOUNS) * len(TEMPLATES)
    assert calls == [(4, total), (8, total), (12, total), (15, total)]

    normed = enc.encode_prompt_ensemble(NOUNS, TEMPLATES, batch_size=4, normalize_templates=True)
    torch.testing.assert_close(normed, _manual_ensemble(enc, True), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(len(NOUNS)))
    assert (normed - raw).abs().max() > 1e-4


# ----------------------------------------------------------------------------- errors

def test_unknown_model_suggests_close_name():
    with pytest.raises(EncoderLoadError, match="ViT-B-32"):
        load_encoder("ViT-B-33", None, device="cpu")
    with pytest.raises(EncoderLoadError, match="rayclust-tiny"):
        load_encoder("rayclust-tiyn", None, device="cpu")


def test_unknown_tag_lists_tags():
    with pytest.raises(EncoderLoadError) as ei:
        load_encoder("ViT-B-32", "laion9b_bogus", device="cpu")
    msg = str(ei.value)
    assert "laion9b_bogus" in msg and "laion2b_s34b_b79k" in msg and "openai" in msg


@pytest.fixture
def no_network(monkeypatch):
    """Every way open_clip could fetch weights raises at once: nothing can hang."""
    def boom(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(socket.socket, "connect_ex", boom)
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr(oc_pretrained, "hf_hub_download", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name,tag", [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", "openai"),
                                      ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)])
def test_download_failure_explains_offline_use(no_network, tmp_path, name, tag):
    cache = tmp_path / "empty-cache"
    with pytest.raises(EncoderLoadError) as ei:
        load_encoder(name, tag, device="cpu", cache_dir=str(cache))
    msg = str(ei.value)
    assert "could not download" in msg.lower()
    assert "model.pretrained=none" in msg and "model.cache_dir" in msg
    assert name in msg and str(cache) in msg
    if tag:
        assert tag in msg


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EncoderLoadError):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderLoadError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(EncoderLoadError, match="CUDA is not available"):
            load_encoder(TINY, None, device="cuda:1")


# ----------------------------------------------------------------------------- gpu

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_matches_fp32_cpu(enc):
    gpu = load_encoder(TINY, None, device="cuda")
    assert gpu.device.type == "cuda"
    x = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    img_gpu, img_cpu = gpu.encode_uint8(x), enc.encode_uint8(x)
    assert img_gpu.device.type == "cpu" and img_gpu.dtype == torch.float32
    assert F.cosine_similarity(img_gpu, img_cpu).min() > 0.99
    txt_gpu, txt_cpu = gpu.encode_texts(TEXTS), enc.encode_texts(TEXTS)
    assert F.cosine_similarity(txt_gpu, txt_cpu).min() > 0.99
    ens_gpu = gpu.encode_prompt_ensemble(NOUNS, TEMPLATES)
    ens_cpu = enc.encode_prompt_ensemble(NOUNS, TEMPLATES)
    assert F.cosine_similarity(ens_gpu, ens_cpu).min() > 0.99
