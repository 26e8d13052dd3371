"""Tiny model builders shared by tests/test_models_structure.py and
test_models_structure_compile.py: transformers architectures whose MoE blocks quantize_model
recognizes by structure, and user blocks written transformers-4.x style."""

import torch
import torch.nn.functional as F
from torch import nn

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=32, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

# arch: (config class, model class, config overrides, HF block class, block attribute, router attribute)
ARCHS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, norm_topk_prob=True),
              "OlmoeSparseMoeBlock", "mlp", "gate"),
    # PhiMoE routes with sparsemixer (top-2 by masked softmaxes); HF's router is called as is
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=4),
               "PhimoeSparseMoeBlock", "mlp", "router"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4),
                   "GraniteMoeMoE", "block_sparse_moe", "router"),
    # layer 0 Mamba (PyTorch path on CPU), layer 1 attention, both with an MoE feed-forward
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(num_experts=4, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
                   attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8),
              "JambaSparseMoeBlock", "feed_forward", "router"),
}


def hf_model(arch: str, *, seed: int = 0, **overrides):
    """A tiny bf16 `arch` causal LM with random weights, eval mode. Routers are drawn with
    std 0.5 (not 0.02) so routing is not a near-tie everywhere."""
    import transformers

    cfg_cls, model_cls, kw = ARCHS[arch][:3]
    args = dict(COMMON, **kw, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**args))
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith((".gate.weight", ".router.weight")):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(torch.bfloat16).eval()


def moe_layers(model, arch):
    return [n for n, m in model.named_modules() if type(m).__name__ == ARCHS[arch][3]]


def ids(seed=0, shape=(2, 8)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


class GatedMLP(nn.Module):
    def __init__(self, H, I, names=("w1", "w3", "w2"), act=None):
        super().__init__()
        self.names = names
        g, u, d = names
        setattr(self, g, nn.Linear(H, I, bias=False))
        setattr(self, u, nn.Linear(H, I, bias=False))
        setattr(self, d, nn.Linear(I, H, bias=False))
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class UserListMoE(nn.Module):
    """transformers 4.x Qwen3-MoE / Mixtral style: `gate` is an nn.Linear, routing and the
    per-expert loop live in forward."""

    def __init__(self, H=64, I=32, E=4, top_k=2, norm_topk_prob=True, names=("w1", "w3", "w2"), act=None):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([GatedMLP(H, I, names, act) for _ in range(E)])

    def route(self, x2):
        logits = self.gate(x2)
        w = F.softmax(logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w /= w.sum(dim=-1, keepdim=True)
        return w.to(x2.dtype), sel

    def forward(self, x):
        B, S, H = x.shape
        x2 = x.reshape(-1, H)
        w, sel = self.route(x2)
        out = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(sel == e)
            out.index_add_(0, tok, (expert(x2[tok]) * w[tok, slot, None]).to(out.dtype))
        return out.reshape(B, S, H)


class InterleavedExperts(nn.Module):
    """Fused experts used as `x @ W`: gate_up_proj [E, H, 2I] with gate/up interleaved
    along 2I (`is_concatenated = False`), down_proj [E, I, H]; no `is_transposed` flag, so
    the orientation has to come from the router's hidden size."""

    is_concatenated = False

    def __init__(self, H, I, E):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * I) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(E, I, H) * 0.05)
        self.act_fn = nn.SiLU()

    def forward(self, x, e):
        gu = x @ self.gate_up_proj[e]
        return (self.act_fn(gu[..., 0::2]) * gu[..., 1::2]) @ self.down_proj[e]


class Router(nn.Module):
    """A router module returning (logits, weights, ids): softmax over the top-k logits."""

    def __init__(self, H, E, top_k):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(E, H) * 0.5)

    def forward(self, x2):
        logits = F.linear(x2, self.weight)
        v, i = torch.topk(logits.float(), self.top_k, dim=-1)
        return logits, torch.softmax(v, dim=-1).to(x2.dtype), i


class UserFusedMoE(nn.Module):
    def __init__(self, H=64, I=32, E=4, top_k=2):
        super().__init__()
        self.router = Router(H, E, top_k)
        self.experts = InterleavedExperts(H, I, E)

    def forward(self, x):
        B, S, H = x.shape
        x2 = x.reshape(-1, H)
        _, w, sel = self.router(x2)
        out = torch.zeros_like(x2)
        for e in range(self.experts.gate_up_proj.shape[0]):
            tok, slot = torch.where(sel == e)
            out.index_add_(0, tok, (self.experts(x2[tok], e) * w[tok, slot, None]).to(out.dtype))
        return out.reshape(B, S, H)


class Stack(nn.Module):
    """Embedding -> n residual MoE layers -> head: a user model around the blocks."""

    def __init__(self, make_block, n=2, H=64, V=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList([make_block() for _ in range(n)])
        self.head = nn.Linear(H, V, bias=False)
        with torch.no_grad():
            for layer in self.layers:
                g = getattr(layer, "gate", None)
                if isinstance(g, nn.Linear):
                    g.weight.mul_(8.0)  # away from near-ties

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)
