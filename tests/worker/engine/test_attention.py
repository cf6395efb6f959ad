"""The plain-PyTorch attention's decode path against SDPA: grouped heads, padded rows, float32 and bfloat16; decode
rows grouped by length; and the dtype of a model's weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import worker.engine.quant
import worker.models.loading
from worker.engine.paged.attention import _decode, decode_groups
from worker.models.loading import cpu_has_bf16, model_dtype


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_is_sdpas_with_grouped_heads_and_padded_rows(dtype, tolerance):
    # Given 3 sequences of 7, 19 and 40 tokens padded to 40, 9 query heads over 3 key/value heads
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 9, 64), torch.randn(3, 3, 40, 64), torch.randn(3, 3, 40, 64)
    mask = (torch.arange(40)[None, :] < torch.tensor([7, 19, 40])[:, None])[:, None, None, :]
    # When the decode path attends each sequence's one new token to its own tokens
    out = _decode(query.to(dtype), key.to(dtype), value.to(dtype), mask, 0.125)
    # Then it computes what SDPA does in float32, padding ignored
    expected = F.scaled_dot_product_attention(query.unsqueeze(2), key, value, attn_mask=mask, scale=0.125,
                                              enable_gqa=True).squeeze(2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    # ... and each row is unchanged by what lies in its padding
    key[0, :, 7:] = 1e4
    assert torch.equal(_decode(query.to(dtype), key.to(dtype), value.to(dtype), mask, 0.125)[0], out[0])


def test_decode_rows_are_padded_only_to_rows_of_similar_length():
    # Given 26 decode rows: one of a long document's 7,800 tokens, 25 of 700 to 1,000, two of 8 and 15
    lengths = [900, 7800, *range(700, 1000, 13)[:23], 1000, 8, 15]
    rows = list(range(100, 100 + len(lengths)))
    # When they are grouped for the padded products
    groups = decode_groups(lengths, rows)
    # Then the long row is alone, the short rows are not padded to it, and no group pads past twice its shortest
    assert [len(group) for group in groups] == [1, 25, 2]
    assert groups[0] == [101] and sorted(row for group in groups for row in group) == rows
    length_of = dict(zip(rows, lengths))
    assert all(length_of[group[0]] <= 2 * min(length_of[row] for row in group) for group in groups)
    # ... and rows of one length stay together
    assert decode_groups([50] * 4, [0, 1, 2, 3]) == [[3, 2, 1, 0]]


def test_auto_is_bfloat16_where_it_is_native_else_fp16_weights_where_fbgemm_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(worker.models.loading, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(worker.engine.quant, "fbgemm_available", lambda: True)
    assert model_dtype("auto", "cpu") == torch.float16 and model_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(worker.engine.quant, "fbgemm_available", lambda: False)
    assert model_dtype("auto", "cpu") == torch.float32
    assert model_dtype("bfloat16", "cpu") == torch.bfloat16 and model_dtype("float32", "cuda") == torch.float32
    monkeypatch.setattr(worker.models.loading, "cpu_has_bf16", lambda: True)
    assert model_dtype("auto", "cpu") == torch.bfloat16
    # The instructions are read from the CPU's flags
    zen4, skylake = tmp_path / "zen4", tmp_path / "skylake"
    zen4.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    skylake.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_bf16(zen4) and not cpu_has_bf16(skylake) and not cpu_has_bf16(tmp_path / "missing")
