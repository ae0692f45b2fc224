"""The Qwen2.5-VL language decoder, split into the exportable trunk and the differentiable head.

trunk: layers 0..L-2 with an explicit token-major KV cache (past entries in, new entries out).
head:  token embedding, the last layer with its own cache, final norm, LM head (stays in PyTorch so the
       V-Reason controller can take gradients through it).
Both share one ``Decoder`` holding the weights once; ``Decoder.forward`` is the full-sequence reference.
"""

from __future__ import annotations

import torch
from torch import nn

from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.layers import GatedMLP, RMSNorm, apply_rotary, given_output, upcast

# every linear of a decoder layer, by module path (what weight-only quantization quantizes)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


class MRoPE(nn.Module):
    """Multimodal rotary embedding: each frequency band follows one of the (t, h, w) position axes.

    Qwen2.5-VL gives each axis one contiguous band (``mrope_section``); with ``mrope_interleaved`` in the
    config (Qwen3-VL) frequency j follows h when j % 3 == 1 and j < 3 * section[1], w when j % 3 == 2 and
    j < 3 * section[2], and t otherwise."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        bounds, start = [], 0
        for n in cfg.mrope_section:
            bounds.append((start, start + n))
            start += n
        self.bounds = bounds
        self.interleaved = bool(getattr(cfg, "mrope_interleaved", False))
        self.section = list(cfg.mrope_section)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [3, B, S] -> cos, sin [B, S, 1, head_dim]
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [3, B, S, head_dim/2]
        if self.interleaved:  # the selection is built on the device (nothing copied from the host per step)
            j = torch.arange(freqs.shape[-1], device=freqs.device)
            h = (j % 3 == 1) & (j < 3 * self.section[1])
            w = (j % 3 == 2) & (j < 3 * self.section[2])
            freqs = torch.where(h, freqs[1], torch.where(w, freqs[2], freqs[0]))
        else:
            freqs = torch.cat([freqs[i % 3, ..., a:b] for i, (a, b) in enumerate(self.bounds)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Qwen2.5-VL: q/k/v with bias, o without; Qwen3-VL (``attention_bias``, ``qk_norm`` in its config): no
        # bias anywhere by default, and an RMSNorm over head_dim on q and k before the rotary embedding
        bias = getattr(cfg, "attention_bias", None)
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True if bias is None else bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True if bias is None else bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True if bias is None else bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bool(bias))
        self.q_norm = self.k_norm = None
        if getattr(cfg, "qk_norm", False):
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qkv_proj: nn.Linear | None = None  # set by ``fuse_projections`` (runtime weight layout)

    def fuse_projections(self) -> None:
        """Replace q/k/v by one linear over their concatenated weights (one GEMV instead of three per token;
        same values, and the separate weights are released)."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        bias = self.q_proj.bias is not None
        fused = nn.Linear(self.q_proj.in_features, sum(p.out_features for p in parts), bias=bias, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if bias:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B,S,heads,hd] and k [B,S,kv,hd] with rotary applied, v [B,S,kv,hd]."""
        b, s, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(b, s, self.heads, self.head_dim), k.view(b, s, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return q, k, v.view(b, s, self.kv_heads, self.head_dim)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of q [B,S,heads,hd] over keys/values [B,T,kv,hd] (the cache is not
        repeated per group); ``allowed`` [S,T] (or broadcastable) marks the visible entries."""
        b, s = q.shape[:2]
        groups = self.heads // self.kv_heads
        qg = q.view(b, s, self.kv_heads, groups, self.head_dim).permute(0, 2, 3, 1, 4)  # [B, kv, groups, S, hd]
        kg = keys.permute(0, 2, 3, 1).unsqueeze(2)  # [B, kv, 1, head_dim, T]
        vg = values.permute(0, 2, 1, 3).unsqueeze(2)  # [B, kv, 1, T, head_dim]
        scores = torch.matmul(qg, kg) * (self.head_dim**-0.5)  # [B, kv, groups, S, T]
        scores = upcast(scores).masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, vg)  # [B, kv, groups, S, head_dim]
        return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(b, s, self.heads * self.head_dim))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, index: torch.Tensor, allowed: torch.Tensor, values=None) -> torch.Tensor:
        """Static-shape decode of one token x [1,1,hidden]: its key and value are written into the
        fixed-capacity caches [1,C,kv,hd] at the device index ``index`` [1], and it attends over the whole
        buffer with ``allowed`` [1,C] (entries <= index). No shape depends on the cache length. ``values``
        maps the value cache to what attention reads (the controller's differentiable video rows). B requests'
        tokens at once: x [B,1,hidden], caches [B,C,kv,hd] (one row each), ``index`` [B], ``allowed`` [B,C]."""
        q, k, v = self.project(x, cos, sin)
        with torch.no_grad():
            if x.shape[0] == 1:
                key_cache.index_copy_(1, index, k.detach())
                value_cache.index_copy_(1, index, v.detach())
            else:  # each row's entries at its own index
                rows = torch.arange(x.shape[0], device=index.device)
                key_cache[rows, index] = k.detach()[:, 0]
                value_cache[rows, index] = v.detach()[:, 0]
        return self.attend_one(q, key_cache, value_cache if values is None else values(value_cache), allowed)

    def attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   allowed: torch.Tensor) -> torch.Tensor:
        """``attend`` for one query token q [B,1,heads,hd] over a fixed-capacity cache: PyTorch's fused
        scaled_dot_product_attention, the query heads of each kv group taken as that group's queries (the cache
        is read in place, never repeated per group, and no fp32 score tensor over the capacity is built)."""
        b = q.shape[0]
        qg = q.view(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # [B, kv, groups, hd]
        out = nn.functional.scaled_dot_product_attention(qg, keys.transpose(1, 2), values.transpose(1, 2),
                                                         attn_mask=allowed.view(-1, 1, 1, allowed.shape[-1]))
        return self.o_proj(out.reshape(b, 1, self.heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,  # [B, P, kv_heads, head_dim]
        past_value: torch.Tensor,  # [B, P, kv_heads, head_dim]
        cache_length: torch.Tensor | None = None,  # [B] (or [1]) int64: each row's past entries at or after it
                                                   # are ignored
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = x.shape[1]
        q, k, v = self.project(x, cos, sin)
        keys = torch.cat((past_key, k), dim=1)  # [B, T, kv_heads, head_dim], T = P + S
        values = torch.cat((past_value, v), dim=1)
        return self.attend(q, keys, values, causal_mask(s, past_key.shape[1], x.device, cache_length)), k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, past_key, past_value, cache_length=None):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_key, past_value, cache_length)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v

    def step(self, x, cos, sin, key_cache, value_cache, index, allowed, values=None):
        """Static-shape decode of one token (see ``Attention.step``)."""
        x = x + self.self_attn.step(self.input_layernorm(x), cos, sin, key_cache, value_cache, index, allowed, values)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()


def causal_mask(s: int, p: int, device, cache_length: torch.Tensor | None = None) -> torch.Tensor:
    """Built inside the graph from P and S: new token i (at cache index P + i) sees the past entries below its
    row's ``cache_length`` (all P when None) and the new tokens up to itself. Without ``cache_length``: [S, P + S],
    the plain causal mask. With it ([B], or [1] for every row): [B, 1, 1, S, P + S], broadcast over ``attend``'s
    scores; a past of P entries then holds rows of different lengths (a batch of requests, each row's past padded
    to the longest), or a fixed-capacity cache of which only the first entries are filled (static decode)."""
    j = torch.arange(p + s, device=device).unsqueeze(0)  # [1, T]
    i = torch.arange(s, device=device).unsqueeze(1)  # [S, 1]
    causal = j <= i + p
    if cache_length is None:
        return causal
    past = j < p
    filled = j < cache_length.view(-1, 1, 1)  # [B, 1, T]
    return ((past & filled) | (causal & ~past)).view(-1, 1, 1, s, p + s)


def static_mask(capacity: int, index: torch.Tensor) -> torch.Tensor:
    """[B, capacity] bool: the cache entries a query at cache index ``index`` [B] (a device tensor) sees."""
    return torch.arange(capacity, device=index.device) <= index.view(-1, 1)


class Decoder(nn.Module):
    """All decoder weights, held once. ``trunk`` and ``head`` below are thin views over it."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = MRoPE(cfg)

    def empty_cache(self, batch: int = 1, device=None, dtype=None) -> torch.Tensor:
        """A [B, 0, kv_heads, head_dim] tensor: the past of a prefill."""
        w = self.embed_tokens.weight
        return torch.zeros(batch, 0, self.cfg.num_key_value_heads, self.cfg.head_dim,
                           device=device or w.device, dtype=dtype or w.dtype)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [B, S, vocab] with no cache: the reference the split is tested against."""
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        empty = self.empty_cache(x.shape[0], x.device, x.dtype)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, empty, empty)
        return self.lm_head(self.norm(x))


class Trunk(nn.Module):
    """Layers 0..L-2 with explicit cache I/O; the module exported to ONNX / TensorRT.

    forward(inputs_embeds [B,S,H], position_ids [3,B,S], past_key.0, past_value.0, ..., cache_length=None) ->
        (hidden [B,S,H], key.0, value.0, ...) with new cache entries only, [B,S,kv_heads,head_dim].
    ``cache_length`` [B] (the graph input of that name): how many leading past entries of each row are valid; the
    rest are masked, so decode can pass the whole fixed-capacity cache (static shapes), and rows of different
    lengths can decode in one call.
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.layers = decoder.layers[:-1]
        self.rotary = decoder.rotary

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor,
                cache_length: torch.Tensor | None = None):
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1], cache_length)
            new += [k, v]
        return (x, *new)

    def step(self, x: torch.Tensor, position_ids: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Static-shape decode of one token x [1,1,H] at position_ids [3,1,1]: every layer writes its new
        entries into its fixed-capacity cache at ``index`` [1] in place; returns hidden [1,1,H]. B requests'
        tokens at once: x [B,1,H], caches [B,C,kv,hd] (one row each), ``index`` [B]."""
        cos, sin = self.rotary(position_ids, x.dtype)
        allowed = static_mask(keys[0].shape[1], index)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cos, sin, keys[i], values[i], index, allowed)
        return x


class Head(nn.Module):
    """Token embedding, the last decoder layer, final norm and LM head; differentiable in PyTorch.

    Built over a full ``Decoder`` (sharing its weights) or standalone from ``head.safetensors`` of an
    export, where it is the only PyTorch copy of these weights.
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.layer = decoder.layers[-1]
        self.norm = decoder.norm
        self.lm_head = decoder.lm_head
        self.rotary = decoder.rotary
        self.tied = decoder.cfg.tie_word_embeddings
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight
        # d(loss)/d(input) of the LM head where a backend computes it faster than PyTorch (the ort backend on CPU:
        # ``ort_head.DenseInputGrad``); used with given logits (``forward``)
        self.lm_head_input_grad = None

    @classmethod
    def standalone(cls, cfg: TextConfig) -> Head:
        """A head with its own (uninitialized) weights and nothing else of the decoder."""
        shell = nn.Module()
        shell.cfg = cfg
        shell.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        shell.layers = nn.ModuleList([DecoderLayer(cfg)])
        shell.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        shell.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        shell.rotary = MRoPE(cfg)
        return cls(shell)

    def prefer_column_major_lm_head(self) -> None:
        """Store the LM head weight column-major ([V, H] view over [H, V] storage). On CPU, PyTorch's
        matrix-vector kernels then read it about twice as fast in both the forward and the backward of the
        controller (measured on the benchmark shape: 41 -> 23 ms forward, 35 -> 21 ms backward). Values are
        unchanged; one copy of the weight remains (the embedding shares it when tied)."""
        w = self.lm_head.weight
        moved = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
        self.lm_head.weight = moved
        if self.tied:
            self.embed_tokens.weight = moved

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, index: torch.Tensor, values=None) -> torch.Tensor:
        """Static-shape head for one token: hidden [1,1,H] -> logits [V]; writes the last layer's entries at
        ``index`` [1]. ``values`` maps the value cache to what attention reads (see ``Attention.step``)."""
        return self.step_rows(hidden, position_ids, key_cache, value_cache, index, values)[0]

    def step_rows(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, index: torch.Tensor, values=None) -> torch.Tensor:
        """``step`` for B requests' tokens at once: hidden [B,1,H], each over its own cache row (caches
        [B,C,kv,hd]) at its own ``index`` [B]; logits [B, V]."""
        return self.lm_head(self.step_features(hidden, position_ids, key_cache, value_cache, index, values))[:, -1]

    def step_features(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, index: torch.Tensor, values=None) -> torch.Tensor:
        """``step_rows`` up to the LM head: its input, the final norm's output [B,1,H]."""
        cos, sin = self.rotary(position_ids, hidden.dtype)
        allowed = static_mask(key_cache.shape[1], index)
        return self.norm(self.layer.step(hidden, cos, sin, key_cache, value_cache, index, allowed, values))

    def weights(self) -> dict[str, torch.Tensor]:
        """The head's tensors to save (the LM head is omitted when tied to the embedding)."""
        sd = dict(self.state_dict())
        if self.tied:
            sd.pop("lm_head.weight")
        return sd

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def features(self, hidden: torch.Tensor, position_ids: torch.Tensor, past_key: torch.Tensor,
                 past_value: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` up to the LM head: its input (the final norm's output) and the layer's new entries."""
        cos, sin = self.rotary(position_ids, hidden.dtype)
        x, k, v = self.layer(hidden, cos, sin, past_key, past_value)
        if last_only:
            x = x[:, -1:]
        return self.norm(x), k, v

    def forward(
        self,
        hidden: torch.Tensor,  # [B, S, hidden]: output of the trunk
        position_ids: torch.Tensor,  # [3, B, S]
        past_key: torch.Tensor,  # [B, P, kv_heads, head_dim]
        past_value: torch.Tensor,
        last_only: bool = False,
        logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns logits [B, S, vocab] (or [B, 1, vocab] with ``last_only``: a long prefill then never
        materializes S x vocab logits) and this layer's new key and value entries. ``logits``: the last
        position's logits already computed for these very inputs (the head's ONNX Runtime graph); they are
        returned as they are, differentiable through the LM head's input gradient, and the LM head's forward is
        not run again (``last_only`` only)."""
        x, k, v = self.features(hidden, position_ids, past_key, past_value, last_only)
        if logits is not None:
            if not last_only:
                raise ValueError("given logits stand for the last position only: pass last_only=True")
            return given_output(self.lm_head, x, logits, self.lm_head_input_grad), k, v
        return self.lm_head(x), k, v
