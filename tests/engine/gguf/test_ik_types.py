"""Sizes of ik_llama.cpp-only types, checked against byte counts worked out from the block structs."""
import re

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.gguf.ik_types import IK_TYPES, ik_row_bytes, ik_tensor_bytes

_BY_NAME = {t.name: t for t in IK_TYPES.values()}
_MAINLINE_IDS = {int(t) for t in GGMLQuantizationType}


def _row(name: str, n_cols: int) -> int | None:
    return ik_row_bytes(_BY_NAME[name], n_cols)


@pytest.mark.parametrize("name, n_cols, expected_bytes", [
    # d(2) + extra(2) + scales_h(4) + scales_l(8) + qs(128) = 144 per 256; 16 blocks
    ("IQ4_K", 4096, 16 * 144),
    # scales(8) + qs(128) = 136 per 256, plus one f32 row scale
    ("IQ4_KS", 4096, 4 + 16 * 136),
    # extra(2) + scales(4) + qs(64) = 70 per 256, plus one f16 row scale; n_embd of DeepSeek-V3
    ("IQ2_KS", 7168, 2 + 28 * 70),
    # d(2) + extra(2) + scales(16) + qs(128) + qh(64) = 212 per 256
    ("IQ6_K", 2048, 8 * 212),
    # 64 ternary weights in 16 bytes, plus one f32 row scale
    ("IQ2_BN", 2560, 4 + 40 * 16),
    # d(2) + qh(8) + qs(16) = 26 per 32
    ("Q6_0", 4096, 128 * 26),
    # sh(8) + ql(32) + qh(16) = 56 per 256, plus one f32 row scale
    ("IQ1_KT", 4096, 4 + 16 * 56),
])
def test_row_bytes_match_block_structs(name, n_cols, expected_bytes):
    assert _row(name, n_cols) == expected_bytes


@pytest.mark.parametrize("interleaved, base", [
    ("Q4_K_R4", "Q4_K"), ("Q6_K_R4", "Q6_K"), ("IQ4_XS_R8", "IQ4_XS"),
    ("IQ4_NL_R4", "IQ4_NL"), ("Q8_0_R8", "Q8_0"), ("MXFP4_R8", "MXFP4"),
])
def test_interleaved_row_costs_the_same_as_mainline_base(interleaved, base):
    blck, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[base]]
    assert _row(interleaved, 4096) == 4096 // blck * type_size


@pytest.mark.parametrize("interleaved, base", [
    ("IQ4_K_R4", "IQ4_K"), ("IQ4_KS_R4", "IQ4_KS"), ("IQ5_KS_R4", "IQ5_KS"), ("IQ2_BN_R4", "IQ2_BN"),
])
def test_interleaved_row_costs_the_same_as_ik_base(interleaved, base):
    assert _row(interleaved, 7168) == _row(base, 7168)


def test_q4_k_r4_row_is_q4_k_row():
    # d(2) + dmin(2) + scales(12) + qs(128) = 144 per 256, same for the 4-row interleave
    assert _row("Q4_K_R4", 4096) == 16 * 144 == 2304


def test_iq1_s_r4_four_rows_are_structs_plus_row_scales():
    # a 24-byte struct holds 32 columns of 4 rows; each row has its own f16 scale
    assert 4 * _row("IQ1_S_R4", 4096) == 128 * 24 + 4 * 2


def test_q8_k_r8_eight_rows_are_structs():
    # a struct holds 256 columns of 8 rows: 8 f16 scales + 8 x 256 int8 quants
    assert 8 * _row("Q8_K_R8", 4096) == 16 * (8 * 2 + 8 * 256)


def test_row_bytes_unknown_when_cols_not_whole_blocks():
    assert _row("IQ4_K", 4000) is None
    assert _row("IQ4_KS", 128) is None


def test_expert_tensor_bytes():
    # ffn_down_exps of a DeepSeek-V3-like model: (n_ff_exp, n_embd, n_expert) in GGUF order
    shape = (2048, 7168, 256)
    assert ik_tensor_bytes(_BY_NAME["IQ4_K_R4"], shape) == 8 * 144 * 7168 * 256
    assert ik_tensor_bytes(_BY_NAME["IQ2_KS"], shape) == (2 + 8 * 70) * 7168 * 256


def test_tensor_bytes_refuse_broken_row_interleave():
    assert ik_tensor_bytes(_BY_NAME["Q4_K_R4"], (4096, 6)) is None
    assert ik_tensor_bytes(_BY_NAME["Q4_K_R4"], (4096, 8)) == 8 * 2304
    assert ik_tensor_bytes(_BY_NAME["IQ4_XS_R8"], (4096, 12)) is None


def test_i2_s_packs_four_per_byte_plus_tensor_scale():
    assert ik_tensor_bytes(_BY_NAME["I2_S"], (2560, 6912)) == 2560 * 6912 // 4 + 32


def test_no_ik_id_reuses_a_mainline_id():
    assert set(IK_TYPES) & _MAINLINE_IDS == set()


def test_no_ik_name_shadows_a_mainline_name():
    assert set(_BY_NAME) & {t.name for t in GGMLQuantizationType} == set()


def test_shared_ids_left_to_mainline_have_ik_layout():
    # MXFP4: e8m0 exponent(1) + 16 nibble bytes per 32; ik's Q1_0_G128: d(2) + 16 bit bytes per 128
    assert GGML_QUANT_SIZES[GGMLQuantizationType(39)] == (32, 1 + 16)
    assert GGML_QUANT_SIZES[GGMLQuantizationType(41)] == (128, 2 + 16)


def test_table_is_consistent():
    assert len(IK_TYPES) == 61
    for type_id, t in IK_TYPES.items():
        assert t.type_id == type_id and t.name == t.name.upper()
        assert t.block_size > 0 and t.type_size > 0
        suffix = re.search(r"_R(\d+)$", t.name)
        assert t.interleaved_rows == (int(suffix.group(1)) if suffix else
                                      {"Q4_0_4_4": 4, "Q4_0_4_8": 4, "Q4_0_8_8": 8}.get(t.name, 1))
