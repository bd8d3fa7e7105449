"""Matching and mask proofs on hand-made modules: every SDPA call form and the hand-written forms."""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsecomp
from sparsecomp.compiler.backend import BackendOptions, SparsecompBackend

BLOCK = {"block_m": 16, "block_n": 16}


# A window longer than any test sequence: every causal site goes through the sparse kernel and
# must still compute exactly the original attention (a bidirectional one runs the kernel dense).
COVERING = "streaming:sink=0,window=4096"
REWRITTEN = ("sparse_attention", "dense_attention")


def run(module, *args, plan=COVERING):
    backend = SparsecompBackend(BackendOptions.from_any({"plan": plan, "kernel_options": BLOCK, "inner": "eager"}))
    out = torch.compile(module, backend=backend)(*args)
    return out, backend.report()


def causal_keep(n, device=None):
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def qkv(b=2, hq=4, hkv=4, n=33, d=16):
    return torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)


SDPA_FORMS = {
    "positional_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.0, True),
    "keyword_causal_scale": lambda q, k, v: F.scaled_dot_product_attention(
        query=q, key=k, value=v, is_causal=True, scale=0.3
    ),
    "bool_mask_from_aranges": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_keep(q.shape[2], q.device)
    ),
    "float_mask_from_bool": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(causal_keep(q.shape[2]), 0.0, float("-inf"))
    ),
    "no_mask_bidirectional": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "torch_namespace": lambda q, k, v: torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal=True),
}


@pytest.mark.parametrize("form", sorted(SDPA_FORMS))
def test_sdpa_forms(form):
    fn = SDPA_FORMS[form]
    q, k, v = qkv()
    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    assert [s.became in REWRITTEN for s in report.sites] == [True], str(report)


def test_sdpa_enable_gqa_reads_real_kv_heads():
    q, k, v = qkv(hq=8, hkv=2)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out, report = run(Lambda(fn), q, k, v)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert report.sites[0].shape["kv_heads"] == 2


def test_sdpa_repeat_interleave_is_folded():
    q, k, v = qkv(hq=6, hkv=3)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))

    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    assert report.sites[0].gqa_folded and sparsecomp.counters["gqa_folded"] == 1


def eager_masked_fill(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~causal_keep(q.shape[2]), float("-inf"))
    p = F.dropout(F.softmax(s, dim=-1), p=0.0, training=False)
    return p @ v


def eager_where_cast(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)) * 0.2
    s = torch.where(causal_keep(q.shape[2]), s, torch.finfo(s.dtype).min)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def eager_softcap_additive(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)) * 0.25
    s = torch.tanh(s / 30.0) * 30.0
    s = s + torch.where(causal_keep(q.shape[2]), 0.0, torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def eager_no_scale(q, k, v):  # T5-style: no scale, no mask
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(3, 2)), dim=-1), v)


@pytest.mark.parametrize("fn", [eager_masked_fill, eager_where_cast, eager_softcap_additive, eager_no_scale])
def test_handwritten_forms(fn):
    q, k, v = qkv()
    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    site = report.sites[0]
    assert site.form == "matmul_softmax_matmul" and site.became in REWRITTEN, str(report)


def test_probabilities_used_elsewhere_is_not_a_site():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return p @ v, p.sum()

    q, k, v = qkv()
    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out[0], fn(q, k, v)[0])
    assert report.sites == []


def test_runtime_mask_tensor_is_kept_with_reason():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 33, 33) > 0.3

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    out, report = run(Lambda(fn), q, k, v, mask)
    torch.testing.assert_close(out, fn(q, k, v, mask))
    site = report.sites[0]
    assert site.became == "kept" and "cannot be proven" in site.reason


def test_window_and_offset_masks_are_proven():
    """Keys within 5 positions, query positions shifted by 3 (a chunk after 3 cached tokens)."""
    q = torch.randn(1, 2, 20, 16)
    k = v = torch.randn(1, 2, 23, 16)

    def fn(q, k, v):
        i = torch.arange(20) + 3
        j = torch.arange(23)
        keep = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - 5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    assert report.sites[0].mask == "causal + window 5 + query offset 3"


def test_dunder_methods_read_like_operators():
    """torch 2.11's Dynamo records ``a == b`` as the method ``__eq__``; the passes read both."""
    import operator

    import torch.fx as fx

    from sparsecomp.passes.fxutil import canonical_target

    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    eq_method = g.call_method("__eq__", (a, b))
    and_method = g.call_method("__and__", (a, b))
    to_function = g.call_function(torch.Tensor.to, (a, torch.bool))
    assert canonical_target(eq_method) is operator.eq
    assert canonical_target(and_method) is operator.and_
    assert canonical_target(to_function) == "to"


def test_sliced_aranges_use_the_length_they_really_keep():
    """arange(64)[:33] is 33 positions long (a stop past the end keeps less)."""
    q, k, v = qkv(n=33)

    def fn(q, k, v):
        i = torch.arange(64)[: q.shape[2]]
        j = torch.arange(40)[:100][: k.shape[2]]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j[None, :] <= i[:, None])

    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    assert report.sites[0].became == "sparse_attention" and report.sites[0].mask == "causal"


def test_mask_with_a_different_length_is_refused():
    """Positions that do not span the keys (an arange one short, broadcast) are never guessed."""
    q, k, v = qkv(n=33)

    def fn(q, k, v):
        i = torch.arange(33)
        j = torch.arange(1)  # broadcasts over the keys: every key gets position 0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j[None, :] <= i[:, None])

    out, report = run(Lambda(fn), q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    assert report.sites[0].became == "kept" and "do not span" in report.sites[0].reason


def test_sites_sharing_a_mask_but_not_lengths_get_their_own_index():
    """Encoder self-attention and decoder cross-attention read the same key padding mask."""
    enc, dec = torch.randn(2, 4, 20, 16), torch.randn(2, 4, 12, 16)
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, :6] = False

    def fn(enc, dec, pad):
        b = torch.arange(2)[:, None, None, None]
        j = torch.arange(20)[None, None, None, :]
        keep = pad[b, j]  # HF's padding_mask_function reads the 2-D mask this way
        self_out = F.scaled_dot_product_attention(enc, enc, enc, attn_mask=keep)
        cross_out = F.scaled_dot_product_attention(dec, self_out, self_out, attn_mask=keep)
        return cross_out

    out, report = run(Lambda(fn), enc, dec, pad)
    torch.testing.assert_close(out, fn(enc, dec, pad), atol=1e-5, rtol=1e-5)
    assert [s.became for s in report.sites] == ["dense_attention"] * 2
    assert all(s.mask.startswith("bidirectional + key padding") for s in report.sites)
