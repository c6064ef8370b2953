"""
The models of cee: two backbones, written so that early exit can stop after any layer, and their
exit policies.

- Encoder: BERT (Devlin et al. 2019). Post-LayerNorm blocks, an exit head after every layer.
- Decoder: GPT-2 (Radford et al. 2019), or the Llama family (Touvron et al. 2023; SmolLM2) by
  configuration: rotary positions, RMSNorm, SwiGLU, grouped-query attention. Pre-norm causal
  blocks; the exit head of layer l is the final norm + the LM head applied to layer l's state
  (CALM, Schuster et al. 2022), after an optional per-layer adapter.
- Policy: the small per-layer MLP of ConsistentEE (Zeng et al. 2024, arXiv 2312.11882) that reads
  a layer's state and gives the probability of exiting there.

Both backbones run one layer at a time (embed, then run_layer(l, ...) for l = 0..L-1), so an
inference loop can stop any input after any layer. from_pretrained() builds a backbone from
pretrained weights: weights.py reads the files (Hugging Face folders, GGUF files) into plain data,
this file turns them into a model.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights

ACTIVATIONS = {  # Hugging Face's names for the MLP nonlinearity
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def unpack(x, tokens, B, T):
    """
    Padding-free layout -> padded: x (N, D) holds the real tokens of B inputs, whose flat indices in
    the (B, T) grid are tokens (N,); returns (B, T, D) with zeros at the padding. (Packing is
    x.view(B * T, D)[tokens].)
    """
    return x.new_zeros(B * T, x.size(-1)).index_copy_(0, tokens, x).view(B, T, -1)


@dataclass
class Config:
    n_layer: int = 6              # L, the number of transformer blocks (and of exits)
    n_head: int = 12
    n_embd: int = 384             # C, the width of every state
    n_inner: int = 1536           # MLP hidden width
    vocab_size: int = 30522
    block_size: int = 512         # the size of the position table: the longest input
    type_vocab_size: int = 2      # encoder only: BERT's segment embeddings
    n_labels: int = 2             # encoder only: classes of each exit head
    # encoder only: exit state = "mean" of tokens or "cls" (first token + BERT pooler)
    pool: str = "mean"
    causal: bool = False          # encoder only: BERT configs with is_decoder=True attend causally
    act: str = "gelu"             # a key of ACTIVATIONS
    ln_eps: float = 1e-12
    dropout: float = 0.1
    attn_scale_by_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx
    attn_scale: bool = True       # GPT-2's scale_attn_weights: divide scores by sqrt(head size)
    tie_lm_head: bool = True      # decoder only: the LM head shares the token embedding
    # decoder only, the Llama family: rotary positions (no position table) with this base, 0 =
    # GPT-2's learned table; RMSNorm; SwiGLU; n_kv_head < n_head: grouped-query attention
    rope_theta: float = 0.0
    norm: str = "layer"           # "layer" (LayerNorm) or "rms" (RMSNorm)
    gated_mlp: bool = False       # down(act(gate(x)) * up(x)) instead of proj(act(fc(x)))
    n_kv_head: int = 0            # key/value heads, each shared by n_head / n_kv_head query heads;
                                  # 0 = n_head
    bias: bool = True             # biases in the attention and MLP projections
    exit_adapters: bool = False   # decoder only: a linear map per layer before its exit head
    policy_hidden: int = 32       # width of the policy MLP (reference: 32)
    # the policy also reads the exit head's confidence (max prob, entropy)
    policy_conf: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported; "
                             f"known: {', '.join(ACTIVATIONS)}")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of "
                             f"n_kv_head={self.n_kv_head}")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.n_embd // self.n_head


def norm_layer(cfg):
    """The normalisation of a block and of the final state: LayerNorm (BERT, GPT-2) or RMSNorm."""
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.ln_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)


def normalize(x, cfg):
    """norm_layer's normalisation without its learned scale and shift."""
    if cfg.norm == "rms":
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + cfg.ln_eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], eps=cfg.ln_eps)


def rope_table(cfg):
    """
    Rotary position embeddings (Su et al. 2021, as Llama computes them): cos and sin of position
    p times the frequencies theta^(-2i/D), each frequency on two dimensions i and i + D/2:
    (2, block_size, D).
    """
    D = cfg.head_size
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))  # (D/2,)
    angle = torch.arange(cfg.block_size, dtype=torch.float)[:, None] * freq  # (T, D/2)
    angle = torch.cat([angle, angle], -1)  # (T, D)
    return torch.stack([angle.cos(), angle.sin()])


def rotate(x, rope, rows):
    """Rotate x (B, H, T, D) by the angles of its rows' positions (rows: a range or a list)."""
    where = slice(rows.start, rows.stop) if isinstance(rows, range) else torch.tensor(rows)
    cos, sin = rope[0][where], rope[1][where]  # (T, D)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """Multi-head self-attention; with a KV cache it writes this call's keys/values at `pos`."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.n_kv_head, D = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * D, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.scale = ((D ** -0.5 if cfg.attn_scale else 1.0)
                      / ((layer + 1) if cfg.attn_scale_by_layer else 1))

    def forward(self, x, bias=None, causal=False, cache=None, pos=0, tokens=None, rope=None):
        """
        x (B, T, C) -> (B, T, C). pos: the position of x's first row, the others following it; or a
        list of every row's position, for rows that are not consecutive (generate.py's deferred
        fill).
        tokens: x holds only the real tokens (N, C) of a padded batch, at these flat indices (N,) of
        the (B, T) grid of bias (B, 1, 1, T), which it needs: the projections skip the padding,
        attention runs on the grid. rope: rope_table() when positions are rotary.
        """
        qkv = self.qkv(x)
        if tokens is not None:
            qkv = unpack(qkv, tokens, bias.size(0), bias.size(-1))
        B, T = qkv.shape[:2]
        H, Hkv = self.n_head, self.n_kv_head
        D = qkv.size(2) // (H + 2 * Hkv)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # (B, Hkv, T, D)
        rows = range(pos, pos + T) if isinstance(pos, int) else pos
        if rope is not None:
            q, k = rotate(q, rope, rows), rotate(k, rope, rows)
        if cache is not None:  # cache: this layer's (k, v) buffers, each (B, Hkv, T_max, D)
            where = slice(pos, pos + T) if isinstance(pos, int) else list(pos)
            cache[0][:, :, where] = k
            cache[1][:, :, where] = v
            # (B, H, last position + 1, D)
            k, v = cache[0][:, :, :max(rows) + 1], cache[1][:, :, :max(rows) + 1]
        prefix = causal and rows == range(T)  # rows 0..T-1: SDPA's own causal mask
        # the row at position p sees the keys 0..p (a lone row sees all)
        if causal and T > 1 and not prefix:
            bias = (torch.arange(max(rows) + 1, device=x.device)
                    <= torch.tensor(rows, device=x.device)[:, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=prefix and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
        if tokens is not None:
            y = y.view(B * T, H * D)[tokens]  # (N, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """proj(act(fc(x))); gated (SwiGLU, Llama): fc computes gate and up at once, and
    proj(act(gate) * up)."""

    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.fc = nn.Linear(cfg.n_embd, cfg.n_inner * (2 if self.gated else 1), bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.act]
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, -1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return F.dropout(self.proj(h), self.dropout, self.training)


class EncoderBlock(nn.Module):
    """BERT's block: LayerNorm after each residual add (post-LN)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn, self.ln_1 = Attention(cfg, layer), nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.mlp, self.ln_2 = MLP(cfg), nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.causal = cfg.causal

    def forward(self, x, bias=None, tokens=None):
        x = self.ln_1(x + self.attn(x, bias, causal=self.causal, tokens=tokens))
        return self.ln_2(x + self.mlp(x))


class DecoderBlock(nn.Module):
    """GPT-2's and Llama's block: a norm before each sublayer (pre-norm), causal attention."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1, self.attn = norm_layer(cfg), Attention(cfg, layer)
        self.ln_2, self.mlp = norm_layer(cfg), MLP(cfg)

    def forward(self, x, cache=None, pos=0, rope=None):
        x = x + self.attn(self.ln_1(x), causal=True, cache=cache, pos=pos, rope=rope)
        return x + self.mlp(self.ln_2(x))


class TransposedLinear(nn.Module):
    """
    nn.Linear's map with the weight stored (in, out): one-row products read this layout faster
    on a CPU, except down-projections (in > out), which read (out, in) faster (measured:
    docs/performance.md). weight: the (out, in) view, as nn.Linear's, for code that reads it.
    """

    def __init__(self, linear):
        super().__init__()
        self.wt = nn.Parameter(linear.weight.detach().T.contiguous())  # (in, out)
        self.bias = linear.bias

    @property
    def weight(self):
        return self.wt.T  # (out, in)

    def forward(self, x):
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        y = x2 @ self.wt if self.bias is None else torch.addmm(self.bias, x2, self.wt)  # (N, out)
        return y.view(*x.shape[:-1], y.size(-1))  # (..., out)


class Policy(nn.Module):
    """
    pi_l(s_l): the probability of exiting at layer l (reference: C -> 32 -> 1, GELU, sigmoid).
    With cfg.policy_conf it also reads the exit head's max probability and entropy:
    C + 2 -> 32 -> 1. Early exit runs it between every two layers, so it is kept cheap: its GELU is
    the tanh form (on 32 numbers the exact, erf, GELU costs about 3x more on a CPU), and forward
    applies net's weights as functions (on a CPU each nn.Module call costs microseconds, as much as
    a matmul this small).
    """

    def __init__(self, cfg):
        super().__init__()
        n_in = cfg.n_embd + (2 if cfg.policy_conf else 0)
        self.net = nn.Sequential(nn.Linear(n_in, cfg.policy_hidden), nn.GELU("tanh"),
                                 nn.Linear(cfg.policy_hidden, 1))

    def forward(self, x):  # x (B, n_in) -> (B,)
        fc, gelu, out = self.net
        h = F.gelu(F.linear(x, fc.weight, fc.bias), approximate=gelu.approximate)
        return torch.sigmoid(F.linear(h, out.weight, out.bias).squeeze(-1))


def confidence(logits):
    """What a confidence rule reads from an exit head: (max probability, entropy), each (...,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()  # 0 at a shortlist's -inf, where p log p counts as 0: log p clamped finite
    return p.max(-1).values, -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


class Backbone(nn.Module):
    """What both models share: blocks, exit policies, input checks and weight loading."""

    def policy_input(self, state, logits):
        """
        The policy's view of one layer: the exit state, plus the head's confidence if configured.
        """
        if not self.config.policy_conf:
            return state
        # (..., C+2)
        return torch.cat([state, torch.stack(confidence(logits), -1).to(state.dtype)], -1)

    def run_layers(self, x, *args, n=None, every=False):
        """
        Layers 1..n (all by default) on the embedding output x, each run_layer(l, x, *args); the
        last output, or with every=True the list [x, layer 1 output, ..., layer n output].
        """
        states = [x]
        for l in range(self.config.n_layer if n is None else n):
            states.append(self.run_layer(l, states[-1], *args))
        return states if every else states[-1]

    @classmethod
    def from_pretrained(cls, path, quiet=False, **overrides):
        """
        A pretrained model: a Hugging Face folder, or for a Decoder a .gguf file (read by
        weights.py); overrides set Config fields (pool, n_labels, ...), over the file's. Unless
        quiet, says in one line what was loaded and what is freshly initialised.
        """
        kind, fields, keys = weights.read(path)
        if kind not in cls.model_type:
            other = {"bert": "Encoder", "gpt2": "Decoder", "llama": "Decoder"}.get(kind)
            hint = (f"; use {other}.from_pretrained" if other
                    else "; only BERT, GPT-2 and Llama are supported")
            raise ValueError(f"{path} holds a {kind!r} checkpoint, not "
                             f"{' or '.join(cls.model_type)}{hint}")
        model = cls(Config(**(fields | overrides)))
        weights.load_weights(model, keys, weights.KEY_MAPS[kind](model.config), path, quiet)
        return model

    def check_ids(self, idx):
        # one pass over the ids
        lo, hi = [v.item() for v in torch.aminmax(idx)] if idx.numel() else (0, 0)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {lo}..{hi}")
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than the position table "
                             f"({self.config.block_size})")

class Encoder(Backbone):
    model_type = ("bert",)

    @property
    def n_out(self):
        """The width of an exit head's output: the classes."""
        return self.config.n_labels

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln_e = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, l) for l in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd) if cfg.pool == "cls" else None
        self.heads = nn.ModuleList(nn.Linear(cfg.n_embd, cfg.n_labels) for _ in range(cfg.n_layer))
        # the last layer always exits
        self.policies = nn.ModuleList(Policy(cfg) for _ in range(cfg.n_layer - 1))
        self.apply(init_weights)

    def embed(self, input_ids, token_type_ids=None, tokens=None):
        """(B, T, C); with tokens (real_tokens of the mask), only the real tokens: (N, C)."""
        T = input_ids.size(1)
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        pos = torch.arange(T, device=input_ids.device)
        if tokens is not None:  # each real token's id, type and position
            input_ids, tt, pos = input_ids.flatten()[tokens], tt.flatten()[tokens], tokens % T
        x = self.wte(input_ids) + self.wtt(tt) + self.wpe(pos)  # HF's order of the sum
        return F.dropout(self.ln_e(x), self.config.dropout, self.training)

    @staticmethod
    def real_tokens(attention_mask):
        """
        The flat indices (N,) of the real tokens in the mask's (B, T) grid; None when nothing is
        padding. Layers given them skip the padding (all but attention run on the N real tokens
        only): a batch of sentences padded to its longest is often half padding.
        """
        if attention_mask is None or attention_mask.all():
            return None
        return attention_mask.flatten().nonzero().squeeze(1)

    @staticmethod
    def attn_bias(attention_mask):
        """
        (B, T) of 1 = token, 0 = padding -> (B, 1, 1, T) boolean, True where attention may look.
        """
        if attention_mask is None:
            return None
        return attention_mask[:, None, None, :].bool()

    def run_layer(self, l, x, bias=None, tokens=None):
        return self.blocks[l](x, bias, tokens)  # (B, T, C), or (N, C) with tokens

    def pool_weights(self, attention_mask):
        """
        (B, T) of 1 = token, 0 = padding -> (B, 1, T): each token's weight in its input's mean;
        None -> None.
        """
        if attention_mask is None:
            return None
        m = attention_mask.to(self.wte.weight.dtype)  # the dtype of the states it pools
        return (m / m.sum(1, keepdim=True).clamp(min=1))[:, None, :]

    def exit_state(self, h, weights=None):
        """
        s_l: what exit head l and policy l read from the layer's token states h (B, T, C) -> (B, C).
        weights: pool_weights(attention_mask), computed once per batch; None: the mean of all T
        positions.
        """
        if self.pooler is not None:
            return torch.tanh(self.pooler(h[:, 0]))
        return h.mean(1) if weights is None else torch.bmm(weights, h).squeeze(1)  # masked mean

    def exit_logits(self, state, l):
        """Exit head l (0-based) on its exit state (B, C) -> (B, n_labels)."""
        return self.heads[l](F.dropout(state, self.config.dropout, self.training))  # (B, n_labels)

    def layer_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """
        [embedding output, layer 1 output, ..., layer L output], each (B, T, C), zeros at the
        padding.
        """
        self.check_ids(input_ids)
        tokens, bias = self.real_tokens(attention_mask), self.attn_bias(attention_mask)
        states = self.run_layers(self.embed(input_ids, token_type_ids, tokens), bias, tokens,
                                 every=True)
        return states if tokens is None else [unpack(x, tokens, *input_ids.shape) for x in states]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Every exit's logits (B, L, n_labels) and exit states (B, L, C): one pass, all layers."""
        states = self.layer_states(input_ids, attention_mask, token_type_ids)[1:]
        weights = self.pool_weights(attention_mask)
        s = torch.stack([self.exit_state(h, weights) for h in states], 1)  # (B, L, C)
        logits = torch.stack([self.exit_logits(s[:, l], l) for l in range(self.config.n_layer)], 1)
        return logits, s

class Decoder(Backbone):
    """
    GPT-2, or a model of the Llama family (SmolLM2, Llama 2/3): rotary positions, RMSNorm, SwiGLU,
    grouped-query attention, as configured. Exits, policies, the KV cache and state copying work
    the same on both.
    """
    model_type = ("gpt2", "llama")

    @property
    def n_out(self):
        """The width of an exit head's output: the vocabulary."""
        return self.config.vocab_size

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if not cfg.rope_theta else None
        # rotary positions: a table, not a parameter (not in the state dict)
        self.register_buffer("rope", rope_table(cfg) if cfg.rope_theta else None, persistent=False)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, l) for l in range(cfg.n_layer))
        self.ln_f = norm_layer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.policies = nn.ModuleList(Policy(cfg) for _ in range(cfg.n_layer - 1))
        # a linear map per layer before the shared head (a tuned lens, Belrose et al. 2023), so
        # that a frozen model's early layers speak the last one's language
        self.adapters = (nn.ModuleList(nn.Linear(cfg.n_embd, cfg.n_embd)
                                       for _ in range(cfg.n_layer - 1))
                         if cfg.exit_adapters else None)
        self.apply(init_weights)
        for a in self.adapters or []:  # the identity: the untrained exit is the plain head
            nn.init.eye_(a.weight)
        if cfg.tie_lm_head:
            self.lm_head.weight = self.wte.weight
        self.register_buffer("shortlist", None)  # set_shortlist: the exits' share of the vocab
        self.short_head = None

    def set_shortlist(self, ids):
        """
        Exit heads over a shortlist of the vocabulary, ids (V',) (FR-Spec, Zhao et al. 2025): an
        exit at layer l < L computes V' logits, the rest of the vocabulary gets -inf; full depth
        keeps the whole head. SmolLM2's 49,152-token head is as costly as 8 of its layers, and a
        token that exits pays it. ids None: every head whole again.
        """
        self.shortlist = ids
        self.short_head = None
        if ids is not None:
            self.short_head = nn.Linear(self.config.n_embd, len(ids), bias=False)
            self.short_head.to(self.lm_head.weight.device, self.lm_head.weight.dtype)
            with torch.no_grad():
                self.short_head.weight.copy_(self.lm_head.weight[ids])  # (V', C)
            self.short_head.requires_grad_(False)

    def in_shortlist(self, ids):
        """Whether each token id is one an early exit can say: in the shortlist, if there is one."""
        return torch.ones_like(ids, dtype=torch.bool) if self.shortlist is None else torch.isin(
            ids, self.shortlist)

    def embed(self, idx, pos=0):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + idx.size(1), device=idx.device))
        return F.dropout(x, self.config.dropout, self.training)  # (B, T, C)

    def run_layer(self, l, x, cache=None, pos=0):
        """Layer l on x (B, T, C) at positions pos..pos+T-1 (or at the list of positions pos); with
        a cache it also fills layer l's K/V there."""
        return self.blocks[l](x, None if cache is None else cache[l], pos, self.rope)

    def exit_logits(self, x, l=None):
        """
        The exit head of layer l (0-based): its adapter, if the model has them, then the final
        norm and the LM head, shared by every layer, or its shortlist rows (set_shortlist; the
        other tokens get -inf). (..., C) -> (..., vocab). l None, or the last layer: the model's
        own output.
        """
        logits, ids = self.exit_head(x, l)
        if ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., ids] = logits
        return full

    def exit_head(self, x, l=None):
        """exit_logits before the shortlist's logits are spread over the vocabulary: (logits
        (..., V'), the token ids of their columns (V',)), ids None for the whole vocabulary."""
        if l is None or l == self.config.n_layer - 1:
            return self.lm_head(self.ln_f(x)), None
        if self.adapters is not None:
            x = self.adapters[l](x)
        if self.short_head is None:
            return self.lm_head(self.ln_f(x)), None
        return self.short_head(self.ln_f(x)), self.shortlist  # (..., V')

    def copy_state_up(self, l, x, cache, pos, folded=None):
        """
        A token that exits after layer l (0-based) leaves layers l+1.. without keys/values at its
        positions, yet later tokens attend to them. State copying (CALM, Schuster et al. 2022):
        treat the exited state x (B, T, C) as the input of every skipped layer and write the K/V it
        gives, all the skipped layers in one batched matmul (folded: folded_kv() of the current
        weights, computed once per generation; None computes it here).
        """
        W, b = self.folded_kv() if folded is None else folded
        B, T, C = x.shape
        c = self.config
        n, H, D = c.n_layer - l - 1, c.kv_heads, c.head_size
        xn = normalize(x, c).view(1, B * T, C).expand(n, -1, -1)
        kv = torch.baddbmm(b[l + 1:, None], xn, W[l + 1:].transpose(1, 2))  # (n, B*T, 2 H D)
        kv = kv.view(n, B, T, 2, H, D).permute(0, 3, 1, 4, 2, 5)  # (n, 2, B, H, T, D)
        if self.rope is not None:  # keys turn by the angle of their position, as run_layer's
            kv = torch.stack([rotate(kv[:, 0], self.rope, range(pos, pos + T)), kv[:, 1]], 1)
        cache[l + 1:, :, :, :, pos:pos + T] = kv

    def folded_kv(self):
        """
        Every layer's key/value projection with its ln_1 folded in, stacked: (L, 2 Hkv D, C) and
        (L, 2 Hkv D). ln_1(x) = n(x) * g + beta, n the plain normalisation (normalize()), so layer
        j's K/V = n(x) W'_j^T + b'_j with W'_j = W_j * g_j (each input column scaled) and
        b'_j = W_j beta_j + bias_j (RMSNorm has no beta, Llama no bias: those terms are 0).
        """
        q = self.config.n_embd  # the rows of qkv before the keys
        out = []
        for blk in self.blocks:
            w, ln = blk.attn.qkv.weight[q:], blk.ln_1
            b = w.new_zeros(len(w))
            if blk.attn.qkv.bias is not None:
                b = b + blk.attn.qkv.bias[q:]
            if getattr(ln, "bias", None) is not None:
                b = b + w @ ln.bias
            out.append((w * ln.weight, b))
        return torch.stack([w for w, _ in out]), torch.stack([b for _, b in out])

    def for_decoding(self):
        """
        A copy of this model, in eval mode, to generate with: the linear layers of the blocks, the
        adapters and the heads whose output is at least as wide as their input become
        TransposedLinear (the tied head gets its own copy). The same maths; this model, untouched,
        stays the one to train and save.
        """
        fast = copy.deepcopy(self).eval()
        parents = [fast, *fast.blocks.modules()] + ([fast.adapters] if fast.adapters else [])
        for parent in parents:  # not the policies: Policy applies its weights as functions
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) and child.out_features >= child.in_features:
                    setattr(parent, name, TransposedLinear(child))
        return fast

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """
        Preallocated keys and values, one tensor (L, 2, B, Hkv, T_max, D): cache[l] is layer l's
        (k, v).
        """
        c = self.config
        shape = (c.n_layer, 2, batch_size, c.kv_heads, max_len or c.block_size, c.head_size)
        return torch.zeros(shape, device=device or self.wte.weight.device,
                           dtype=dtype or self.wte.weight.dtype)

    def layer_states(self, idx):
        """[embedding output, layer 1 output, ..., layer L output], each (B, T, C)."""
        self.check_ids(idx)
        return self.run_layers(self.embed(idx), every=True)

    def forward(self, idx, targets=None):
        """
        Full-depth logits (B, T, vocab); loss = cross-entropy against targets, None without them.
        """
        logits = self.exit_logits(self.layer_states(idx)[-1])
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                            ignore_index=-1)
        return logits, loss

def init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


