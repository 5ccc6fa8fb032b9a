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


class PromptCentres(nn.Module):
    """K learnable prompts -> K unit centres. `tower`: the frozen text transformer
    (`ClipEncoder.text_tower().freeze()`: `token_embedding`, `end_of_text(tokens)`,
    `features(embeddings, end)`); `tokens` (K, L): the tokenized initial phrases."""

    def __init__(self, tower, tokens: torch.Tensor):
        super().__init__()
        eot = tower.end_of_text(tokens)
        if bool((eot < 2).any()):
            raise ValueError("every prompt needs at least one token between start and end")
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        self._tower = tower  # shared, not a submodule: no copy, none of its weights are ours
        weight = tower.token_embedding.weight
        with torch.no_grad():
            frozen = tower.token_embedding(tokens.to(weight.device)).float()
        positions = torch.arange(length, device=frozen.device)
        eot = eot.to(frozen.device)
        learn = (positions[None, :] >= 1) & (positions[None, :] < eot[:, None])
        self.register_buffer("eot", eot, persistent=False)
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
        x = self.prompt_embeddings()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            pooled = self._tower.features(x, self.eot)
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
        table = F.normalize(self._tower.token_embedding.weight.float(), dim=-1)
        ctx = F.normalize(self.ctx.float(), dim=-1)
        return [(ctx[k][self.learnable[k]] @ table.T).argmax(dim=-1).tolist()
                for k in range(self.n_clusters)]
