"""LAIC-RS component 2: one semantic centre per cluster, learned by prompt learning through the
frozen CLIP text tower (ALGORITHM.md section 5; CoOp's mechanics, class-specific context).

OUR READING (no code is public). Cluster k owns a prompt: the token sequence of an initial phrase
(by default "a photo of a {noun}." with the vocabulary noun nearest the k-means centre of k),
whose tokens between the start token and the end-of-text token become learnable context vectors,
initialised from their token embeddings. The start token, the end-of-text token and the padding
stay frozen; so does the whole text tower. The centre is the tower's projected feature at the
end-of-text position, L2-normalised:

    t_k = normalize(P^T LN(T(E_k + pos))[eot_k]),   E_k[j] = ctx_k[j] if 1 <= j < eot_k
                                                          = token_embedding(tokens_k[j]) otherwise

and images are assigned by temperature-scaled cosine: p_ik = softmax_k(cos(u_i, t_k) / tau).

The K prompts run as one batch through the single tower (it is shared, never copied per
cluster), trimmed to the longest prompt: with a causal mask, columns after the last end-of-text
token cannot change the pooled features. Only `ctx` is a parameter of this module (its state
dict is the context alone); the tower stays with the encoder that owns it. On CUDA the tower runs
under bf16 autocast.

Interpretability: `nearest_tokens` gives, for each learnable position of each prompt, the
vocabulary token whose embedding is nearest (cosine) to the learned context vector; the pipeline
decodes the ids with the model's tokenizer. Naming a centre by its nearest nouns is
`naming.py`'s job, on the centres this module returns.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

TOWER_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final",
               "text_projection", "attn_mask")


class PromptCentres(nn.Module):
    """K learnable prompts -> K unit centres. `tower`: the parts of a causal, end-of-text-pooled
    open_clip text transformer (`ClipEncoder.text_tower()`); `tokens` (K, L): the tokenized
    initial phrases, end-of-text = each row's largest token id (CLIP's BPE)."""

    def __init__(self, tower: dict, tokens: torch.Tensor):
        super().__init__()
        missing = [p for p in TOWER_PARTS if p not in tower]
        if missing:
            raise ValueError(f"text tower lacks {missing}")
        eot = tokens.argmax(dim=1)
        if bool((eot < 2).any()):
            raise ValueError("every prompt needs at least one token between start and end")
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        self._tower = dict(tower)  # shared, not registered: no copy, no parameters of ours
        embedding = tower["token_embedding"]
        with torch.no_grad():
            frozen = embedding(tokens.to(embedding.weight.device)).float()
        positions = torch.arange(length, device=frozen.device)
        learn = (positions[None, :] >= 1) & (positions[None, :] < eot.to(frozen.device)[:, None])
        self.register_buffer("tokens", tokens.to(frozen.device), persistent=False)
        self.register_buffer("eot", eot.to(frozen.device), persistent=False)
        self.register_buffer("frozen", frozen, persistent=False)
        self.register_buffer("learnable", learn, persistent=False)
        self.ctx = nn.Parameter(frozen.clone())

    @property
    def n_clusters(self) -> int:
        return self.ctx.shape[0]

    def prompt_embeddings(self) -> torch.Tensor:
        """(K, L, width): the learnable context where learnable, frozen token embeddings elsewhere
        (`where` also keeps the frozen positions' gradient at zero)."""
        return torch.where(self.learnable[..., None], self.ctx, self.frozen)

    def forward(self) -> torch.Tensor:
        """(K, D) unit centres, float32."""
        t = self._tower
        x = self.prompt_embeddings()
        length = x.shape[1]
        cuda = x.device.type == "cuda"
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                    else contextlib.nullcontext())
        with autocast:
            cast = t["transformer"].get_cast_dtype() if hasattr(
                t["transformer"], "get_cast_dtype") else x.dtype
            x = x.to(cast) + t["positional_embedding"][:length].to(cast)
            x = t["ln_final"](t["transformer"](x, attn_mask=t["attn_mask"][:length, :length]))
            pooled = x[torch.arange(x.shape[0], device=x.device), self.eot]
            projection = t["text_projection"]
            if projection is not None:
                pooled = (projection(pooled) if isinstance(projection, nn.Linear)
                          else pooled @ projection)
        return F.normalize(pooled.float(), dim=-1)

    def assign(self, u: torch.Tensor, temperature: float, centres: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(N, K) probabilities p_ik = softmax_k(cos(u_i, t_k) / temperature)."""
        centres = self() if centres is None else centres
        return torch.softmax(F.normalize(u, dim=-1) @ centres.T / temperature, dim=-1)

    @torch.no_grad()
    def nearest_tokens(self) -> list[list[int]]:
        """For each prompt, the vocabulary token id nearest (cosine) to each learned context
        vector, in prompt order."""
        table = F.normalize(self._tower["token_embedding"].weight.float(), dim=-1)
        ctx = F.normalize(self.ctx.float(), dim=-1)
        out = []
        for k in range(self.n_clusters):
            rows = ctx[k][self.learnable[k]]
            out.append((rows @ table.T).argmax(dim=-1).tolist())
        return out


def freeze_tower(tower: dict) -> dict:
    """Stop gradients into every tower parameter (the context is all that learns)."""
    for part in tower.values():
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
        elif isinstance(part, nn.Parameter):
            part.requires_grad_(False)
    return tower
