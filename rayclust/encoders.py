"""CLIP encoders: build any open_clip model and embed images and text.

Images travel as uint8 ``(B, H, W, 3)`` arrays already resized/cropped by
:meth:`ImagePreprocess.to_uint8` (cheap to ship between workers); the
``/255`` and mean/std normalisation happen on the model's device.
Outputs are always float32 CPU tensors.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import pretrained as oc_pretrained
from open_clip.transformer import TextTransformer
from PIL import Image

# Register the repo's tiny architectures (rayclust-tiny, ...) for tests and offline demos.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

_HF_PREFIX, _LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"


class EncoderLoadError(RuntimeError):
    """Model cannot be built; the message is meant for the user, no traceback needed."""


# All user-facing load errors in one place.
_MESSAGES = {
    "device": "{msg}. Use device 'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.",
    "unknown_model": "Unknown open_clip model {name!r}. Close matches: {close}. "
                     "See open_clip.list_models() for all names (or use 'hf-hub:org/repo').",
    "unknown_tag": "Pretrained weights {tag!r} are neither a known tag for model {name!r} nor an "
                   "existing checkpoint file. Known tags: {tags}. Use 'none' for random weights.",
    "download": "Could not download the pretrained weights for {what}: {err}\n"
                "Weights are looked up in and downloaded to {cache}.\nTo run offline, either:\n"
                "  * use random weights (exercises the pipeline, meaningless clusters): "
                "--set model.pretrained=none\n"
                "  * or pre-download the weights on a machine with internet access, e.g.\n"
                "      python -c \"import open_clip; open_clip.create_model({call}, cache_dir='DIR')\"\n"
                "    then copy DIR to this machine and set model.cache_dir=DIR.",
    "build": "Could not build model {name!r} (pretrained={tag!r}): {err}",
}


def _fail(key: str, **kw) -> EncoderLoadError:
    return EncoderLoadError(_MESSAGES[key].format(**kw))


def _default_cache(cache_dir: str | None) -> str:
    if cache_dir:
        return repr(cache_dir) + " (model.cache_dir)"
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        HF_HUB_CACHE = "~/.cache/huggingface/hub"
    return f"the default caches ({HF_HUB_CACHE} for Hugging Face weights, ~/.cache/clip for URL weights)"


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; accepts 'cpu', 'cuda', 'cuda:N'."""
    spec = (device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise _fail("device", msg=f"Invalid device {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _fail("device", msg=f"Device {device!r} requested but CUDA is not available "
                                      f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _fail("device", msg=f"Device {device!r} requested but only "
                                      f"{torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise _fail("device", msg=f"Unsupported device {device!r}")
    return dev


from rayclust.preprocess import ImagePreprocess  # noqa: E402  (torch-free; decode workers use it alone)


# ----------------------------------------------------------------------------- encoder

def _trimmable_text_tower(model: torch.nn.Module) -> dict | None:
    """Parts of a causal, EOT-pooled text transformer, or None if trimming is unsafe.

    With a causal mask, the token at position p only sees positions <= p, so when
    pooling at the EOT/EOS token, dropping padding columns after the last pooled
    position leaves the output unchanged. Bidirectional towers (SigLIP), 'last'/'first'
    pooling, CoCa's appended CLS token, pad masks and HF text towers are not trimmed.
    """
    if isinstance(model, open_clip.CLIP):  # text tower flattened onto the model
        parts = dict(token_embedding=model.token_embedding, positional_embedding=model.positional_embedding,
                     transformer=model.transformer, ln_final=model.ln_final,
                     text_projection=model.text_projection, attn_mask=model.attn_mask,
                     pool_type=model.text_pool_type, eos_id=getattr(model, "text_eos_id", None))
    elif isinstance(getattr(model, "text", None), TextTransformer):
        t = model.text
        if t.cls_emb is not None or t.use_pad_mask or t.output_tokens:
            return None
        parts = dict(token_embedding=t.token_embedding, positional_embedding=t.positional_embedding,
                     transformer=t.transformer, ln_final=t.ln_final, text_projection=t.text_projection,
                     attn_mask=t.attn_mask, pool_type=t.pool_type, eos_id=t.eos_id)
    else:
        return None
    mask = parts["attn_mask"]
    if parts["pool_type"] not in ("argmax", "eos") or mask is None or mask.ndim != 2:
        return None
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if not torch.equal(torch.isneginf(mask), causal) or not torch.all(mask[~causal] == 0):
        return None
    return parts


class TextTower:
    """A causal, end-of-text-pooled open_clip text transformer, driven from token embeddings:
    `ClipEncoder` feeds it the embeddings of tokens, prompt learning (LAIC-RS,
    `method/prompt_centres.py`) its own learnable ones. Holds the model's modules, not copies."""

    def __init__(self, parts: dict):
        self._parts = parts
        self.token_embedding: torch.nn.Embedding = parts["token_embedding"]

    def end_of_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) token ids -> (n,) position of each row's end-of-text token (the pooled one)."""
        if self._parts["pool_type"] == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self._parts["eos_id"]).int().argmax(dim=-1)

    def features(self, x: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """(n, L, width) token embeddings and (n,) end-of-text positions -> (n, D) raw projected
        features at those positions, as CLIP.encode_text computes them. L may be shorter than the
        context: with the causal mask, later columns cannot change the pooled features."""
        p = self._parts
        length = x.shape[1]
        cast_dtype = p["transformer"].get_cast_dtype()
        x = x.to(cast_dtype) + p["positional_embedding"][:length].to(cast_dtype)
        x = p["ln_final"](p["transformer"](x, attn_mask=p["attn_mask"][:length, :length]))
        feats = x[torch.arange(x.shape[0], device=x.device), end]
        proj = p["text_projection"]
        if proj is not None:
            feats = proj(feats) if isinstance(proj, torch.nn.Linear) else feats @ proj
        return feats

    def freeze(self) -> "TextTower":
        """No gradients into any of the tower's weights (prompt learning trains its context
        only); returns self."""
        for part in self._parts.values():
            if isinstance(part, (torch.nn.Module, torch.nn.Parameter)):
                part.requires_grad_(False)
        return self


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", s).strip("-")


class ClipEncoder:
    """A loaded open_clip model in eval mode; see :func:`load_encoder`."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, pretrained: str | None,
                 device: torch.device, cache_key: str):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.pretrained, self.device = name, pretrained, device
        self._cache_key = cache_key
        self.preprocess = ImagePreprocess.from_cfg(open_clip.get_model_preprocess_cfg(model))
        parts = _trimmable_text_tower(model)
        self._text = TextTower(parts) if parts is not None else None
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)
        self.embed_dim = int(self._encode_tokens(self.tokenizer([""])).shape[1])

    @property
    def cache_key(self) -> str:
        """Filesystem-safe id of (architecture, weights), e.g. 'ViT-B-32__laion2b_s34b_b79k'."""
        return self._cache_key

    def text_tower(self) -> TextTower:
        """The model's text transformer, for feeding it token embeddings (prompt learning).
        Causal, end-of-text-pooled towers only (CLIP's and most open_clip text towers)."""
        if self._text is None:
            raise EncoderLoadError(f"model {self.name!r}: its text tower is not a causal, "
                                   "end-of-text-pooled transformer, which prompt learning needs")
        return self._text

    @property
    def trims_text(self) -> bool:
        """Whether encode_texts drops trailing padding columns (causal, EOT-pooled towers)."""
        return self._text is not None

    def _autocast(self):
        # bf16 on CUDA (fast, accurate enough for cosine geometry); exact fp32 on CPU.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")

    @torch.no_grad()
    def encode_uint8(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 at ``preprocess.size`` -> (B, D) L2-normalised float32 CPU."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3 or tuple(x.shape[1:3]) != self.preprocess.size:
            raise ValueError(f"expected uint8 (B, {self.preprocess.size[0]}, {self.preprocess.size[1]}, 3) "
                             f"images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] == 0:
            return torch.empty(0, self.embed_dim)
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self._mean) / self._std
        with self._autocast():
            feats = self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1).cpu()

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """PIL images -> (B, D) L2-normalised float32 CPU (to_uint8 + encode_uint8)."""
        out = [self.encode_uint8(np.stack([self.preprocess.to_uint8(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) token ids -> (n, D) raw projected text features, float32 CPU."""
        tokens = tokens.to(self.device)
        with torch.no_grad(), self._autocast():
            tower = self._text
            if tower is None:
                feats = self.model.encode_text(tokens)
            else:  # same computation as CLIP.encode_text, on tokens[:, :L]
                end = tower.end_of_text(tokens)
                tokens = tokens[:, :int(end.max()) + 1]
                feats = tower.features(tower.token_embedding(tokens), end)
        return feats.float().cpu()

    def _text_batches(self, texts: list[str], batch_size: int):
        """Yield (indices, raw features) batches. With trimming, texts are sorted by
        length so each batch is trimmed to similar lengths (less wasted compute)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if self.trims_text else list(range(len(texts)))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield torch.tensor(idx), self._encode_tokens(self.tokenizer([texts[i] for i in idx]))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """n strings -> (n, D) RAW (unnormalised) projected text features, float32 CPU."""
        texts = list(texts)
        out = torch.empty(len(texts), self.embed_dim)
        for idx, feats in self._text_batches(texts, batch_size):
            out[idx] = feats
        return out

    @torch.no_grad()
    def encode_prompt_ensemble(self, nouns: Sequence[str], templates: Sequence[str | Callable[[str], str]],
                               batch_size: int = 256, normalize_templates: bool = False,
                               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """TAC's prompt ensemble: e_j = normalize(mean_m g(template_m(noun_j))).

        Templates are '{}'-format strings (or callables). TAC averages the RAW template
        embeddings; ``normalize_templates=True`` L2-normalises each one first
        (VLM4Cluster). All N_w * M prompts are batched together. Returns (N_w, D)
        L2-normalised float32 CPU; ``progress(done, total)`` is called per batch.
        """
        if not templates:
            raise ValueError("need at least one template")
        fill = [t if callable(t) else t.format for t in templates]
        prompts = [f(noun) for noun in nouns for f in fill]
        m, total, done = len(fill), len(prompts), 0
        sums = torch.zeros(len(nouns), self.embed_dim, dtype=torch.float64)  # float64: order-independent sum
        for idx, feats in self._text_batches(prompts, batch_size):
            if normalize_templates:
                feats = F.normalize(feats, dim=-1)
            sums.index_add_(0, idx // m, feats.double())
            done += len(idx)
            if progress is not None:
                progress(done, total)
        return F.normalize(sums, dim=-1).float()  # normalize(sum) == normalize(mean)


@dataclass(frozen=True)
class _Plan:
    """How ``load_encoder`` builds a model: the open_clip name, the cache key and the keyword
    arguments of ``open_clip.create_model`` (weights excluded until ``_fetch``)."""

    name: str
    arch: str
    tag: str | None
    key: str
    kwargs: dict
    schema: bool  # 'hf-hub:' or 'local-dir:': the config itself lives outside open_clip
    download: dict | None = None  # open_clip's pretrained cfg of a tag (what to download)


def _plan(name: str, pretrained: str | None, seed: int) -> _Plan:
    tag = None if pretrained is None or str(pretrained).strip().lower() in ("", "none", "null") else str(pretrained)
    kwargs: dict = {}
    if tag and tag.startswith(_HF_PREFIX):  # open_clip convention: hub models are named, not tagged
        name, tag = tag, None
    elif tag and os.path.isdir(tag):
        name, tag = _LOCAL_DIR_PREFIX + tag, None
    schema = name.startswith((_HF_PREFIX, _LOCAL_DIR_PREFIX))
    arch = name if schema else name.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
    if not schema and arch not in open_clip.list_models():
        models = open_clip.list_models()
        lower = {m.lower(): m for m in models}
        close = [lower[m] for m in difflib.get_close_matches(arch.lower(), list(lower), n=5, cutoff=0.4)]
        raise _fail("unknown_model", name=name, close=", ".join(close) or "none")

    if schema:
        key = f"{_safe(arch)}__{'hf-hub' if arch.startswith(_HF_PREFIX) else 'local'}"
        kwargs["require_pretrained"] = arch.startswith(_HF_PREFIX)
    elif tag is None:
        key = f"{_safe(arch)}__none-seed{seed}"
    elif os.path.isfile(tag):
        st = os.stat(tag)
        digest = hashlib.sha1(f"{os.path.abspath(tag)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
        key = f"{_safe(arch)}__{_safe(Path(tag).stem)}-{digest}"
    else:
        cfg = oc_pretrained.get_pretrained_cfg(arch, tag)
        if not cfg:
            raise _fail("unknown_tag", name=name, tag=tag,
                        tags=", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none (random weights only)")
        key = f"{_safe(arch)}__{_safe(tag.lower().replace('-', '_'))}"  # open_clip's tag normalisation
        # Loading from the file loses the tag's preprocessing: pass it explicitly. Weights trained
        # with QuickGELU (e.g. 'openai') need it, or embeddings are subtly wrong (open_clip only warns).
        kwargs.update(force_preprocess_cfg={k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                            if k in cfg},
                      force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        return _Plan(name, arch, tag, key, kwargs, schema, download=cfg)
    return _Plan(name, arch, tag, key, kwargs, schema)


def _fetch(plan: _Plan, cache_dir: str | None) -> dict:
    """``create_model`` arguments with the weights: a tag's file is downloaded first, separately,
    so a fetch failure is reported as such."""
    kwargs = dict(plan.kwargs)
    if plan.schema or plan.tag is None:
        return kwargs
    path = plan.tag  # a local checkpoint file
    if plan.download is not None:
        try:
            path = oc_pretrained.download_pretrained(plan.download, cache_dir=cache_dir)
        except Exception as e:  # hub / urllib / requests / OS errors
            raise _fail("download", what=f"model {plan.arch!r} (pretrained={plan.tag!r})",
                        call=f"{plan.arch!r}, pretrained={plan.tag!r}", err=f"{type(e).__name__}: {e}",
                        cache=_default_cache(cache_dir)) from e
    kwargs.update(pretrained=path, require_pretrained=True)
    return kwargs


@dataclass(frozen=True)
class ModelDescription:
    """What the driver needs to know about a model without holding it."""

    preprocess: ImagePreprocess
    cache_key: str
    embed_dim: int
    downloads: bool  # loading it fetches pretrained weights (a tag), which may fail


def describe_model(name: str, pretrained: str | None, seed: int = 0) -> ModelDescription | None:
    """Preprocessing, embedding size and cache key that :func:`load_encoder` would give, without
    weights: the architecture is built on the meta device (no memory, nothing downloaded, about a
    tenth of a second even for ViT-bigG-14), so a driver can describe the model that only its
    workers will load. None for hub models and local model folders, whose config must itself be
    fetched or read where the model loads. Unknown names and tags raise as in ``load_encoder``;
    whether the weights can be downloaded is not checked (``downloads`` says they will be)."""
    plan = _plan(name, pretrained, seed)
    if plan.schema:
        return None
    with torch.device("meta"):
        model = open_clip.create_model(plan.arch, device="meta", **plan.kwargs)
    preprocess = ImagePreprocess.from_cfg(open_clip.get_model_preprocess_cfg(model))
    h, w = preprocess.size
    embed_dim = int(model.encode_image(torch.empty(1, 3, h, w, device="meta")).shape[-1])
    return ModelDescription(preprocess, plan.key, embed_dim, plan.download is not None)


def load_encoder(name: str, pretrained: str | None, device: str = "auto", cache_dir: str | None = None,
                 seed: int = 0) -> ClipEncoder:
    """Build open_clip model ``name`` with weights ``pretrained`` on ``device``.

    ``pretrained``: an open_clip tag ('laion2b_s34b_b79k', 'openai'), 'hf-hub:org/repo'
    (or pass that as ``name``), a local checkpoint file (or directory holding
    open_clip_config.json + weights), or None/'none' for random weights seeded by ``seed``.
    """
    dev = resolve_device(device)
    plan = _plan(name, pretrained, seed)
    kwargs = _fetch(plan, cache_dir)
    arch = plan.arch
    try:
        with torch.random.fork_rng(devices=[]):  # reproducible random init, caller's RNG untouched
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, device=dev, cache_dir=cache_dir, **kwargs)
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    except Exception as e:
        if plan.name.startswith(_HF_PREFIX):  # config/weights/tokenizer fetched from the hub
            raise _fail("download", what=f"hub model {arch!r}", call=repr(arch), err=f"{type(e).__name__}: {e}",
                        cache=_default_cache(cache_dir)) from e
        raise _fail("build", name=plan.name, tag=plan.tag, err=f"{type(e).__name__}: {e}") from e
    return ClipEncoder(model, tokenizer, arch, plan.tag, dev, plan.key)
