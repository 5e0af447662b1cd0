"""ggml tensor types that only ik_llama.cpp defines: names and byte sizes.

We cannot run these types, but a GGUF quantized by ik_llama.cpp may hold them, so we name
them in errors and still report exact tensor sizes.

How the sizes were derived (ik_llama.cpp, ggml/src/ggml.c type traits and ggml-common.h):

- Each type has elements per block, bytes per block, and a per-row prefix of "row meta"
  bytes (row scales that the *_KS, *_KSS, *_KT, *_KL, *_BN types and a few Q8 activation
  types keep once per row). One row of n_cols elements takes
  ``row_meta_bytes + n_cols / block_size * type_size`` bytes (ik's ggml_row_size), every row
  of a tensor has that stride, so a tensor takes rows x that.
- Row-interleaved types (_R4, _R8, _R16) store groups of 4, 8 or 16 rows block by block, but
  their per-row cost equals the base type's: the traits give the base block size (for IQ1_S_R4,
  IQ1_M_R4, Q8_K_R8 and Q8_K_R16 the interleaved struct divided by the row count). Their quantizers
  require the row count (ne[1]) to be a multiple of the group; llama-quantize falls back to the
  base type otherwise, so a tensor breaking that rule is not a valid file.
- I2_S (Microsoft BitNet) claims 1 byte per element in the traits but ik's ggml_nbytes packs 4
  elements per byte and appends one 32-byte scale to the whole tensor; we model exactly that.

Ids shared with mainline (checked against gguf.constants and mainline ggml-common.h):
MXFP4 (39) and ik's Q1_0_G128 (41, mainline Q1_0) have the same block layout and decoding, so
they are left to the gguf tables. Q8_K (15) differs: ik adds a float block sum (296 bytes, not
292), but it is a dot-product intermediate that model files do not hold, so mainline's entry
stands. Ids 31-33 and 36 were removed from mainline (36 meant IQ4_NL_4_4 there, I2_S here).
(Q8_1, id 9, is 36 bytes in both ggml builds; only gguf's GGML_QUANT_SIZES says 40.)
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence


@dataclass(frozen=True)
class IkType:
    type_id: int          # the ggml_type enum value in ik_llama.cpp
    name: str             # ik_llama.cpp's enum name, e.g. "IQ4_K_R4"
    block_size: int       # elements per block (0 if unknown)
    type_size: int        # bytes per block of one row (0 if unknown)
    row_meta_bytes: int   # bytes before the first block of each row
    interleaved_rows: int = 1      # rows stored together; ne[1] must be a multiple of it
    tensor_trailer_bytes: int = 0  # bytes after the last row of the whole tensor


_QK_K = 256

# (type_id, name, block_size, type_size, row_meta_bytes, interleaved_rows)
# Byte counts for the ik-only block structs, from their fields (d = f16 scale):
_TABLE: tuple[tuple[int, str, int, int, int, int], ...] = (
    (31, "Q4_0_4_4", 32, 18, 0, 4),
    (32, "Q4_0_4_8", 32, 18, 0, 4),
    (33, "Q4_0_8_8", 32, 18, 0, 8),
    (97, "Q8_0_X4", 32, 34, 0, 1),
    (98, "Q8_1_X4", 32, 36, 0, 1),
    (99, "Q8_2_X4", 32, 36, 0, 1),     # d + int16 sum + 32 quants
    (133, "Q6_0", 32, 26, 0, 1),       # d + 8 high-bit bytes + 16 nibble bytes
    (134, "IQ1_BN", 64, 13, 2, 1),     # 12 packed trits + 1 extra byte; f16 row scale
    (135, "IQ2_BN", 64, 16, 4, 1),     # 2 bits each; f32 row scale
    (136, "Q8_K64", 64, 68, 0, 1),
    (137, "IQ2_K", _QK_K, 76, 0, 1),   # d, extra, 8 scale bytes, 64 quant bytes
    (138, "IQ3_K", _QK_K, 110, 0, 1),  # d, extra, scales_h, 8 scales_l, 64 qs, 32 qh
    (139, "IQ4_K", _QK_K, 144, 0, 1),  # d, extra, 4 scales_h, 8 scales_l, 128 qs
    (140, "IQ5_K", _QK_K, 176, 0, 1),  # IQ4_K + 32 qh
    (141, "IQ6_K", _QK_K, 212, 0, 1),  # d, extra, 16 scales, 128 qs, 64 qh
    (144, "IQ4_KS", _QK_K, 136, 4, 1),   # 8 scales, 128 qs; f32 row scale
    (145, "IQ2_KS", _QK_K, 70, 2, 1),    # extra, 4 scales, 64 qs; f16 row scale
    (146, "IQ4_KSS", _QK_K, 128, 4, 1),
    (147, "Q8_K16", 64, 64, 20, 1),
    (148, "Q8_K32", _QK_K, 296, 0, 1),
    (149, "Q8_KR8", _QK_K, 296, 0, 1),
    (150, "Q8_K128", 128, 140, 0, 1),
    (151, "Q8_KV", 32, 32, 8, 1),
    (152, "IQ5_KS", _QK_K, 168, 4, 1),   # 8 scales, 128 qs, 32 qh
    (153, "IQ2_KT", _QK_K, 68, 4, 1),    # 4 scales, 64 trellis bytes
    (154, "IQ3_KT", _QK_K, 100, 4, 1),   # IQ2_KT + 32 sign bytes
    (155, "IQ4_KT", _QK_K, 128, 4, 1),
    (156, "IQ3_KS", _QK_K, 102, 2, 1),   # extra, 4 scales, 64 qs, 32 qh
    (157, "IQ2_KL", _QK_K, 86, 2, 1),    # scales_h, 4 scales_l, 64 qs, 16 qh
    (158, "IQ1_KT", _QK_K, 56, 4, 1),    # 8 sh, 32 ql, 16 qh
    (202, "Q4_0_R8", 32, 18, 0, 8),
    (206, "Q5_0_R4", 32, 22, 0, 4),
    (208, "Q8_0_R8", 32, 34, 0, 8),
    (210, "Q2_K_R4", _QK_K, 84, 0, 4),
    (211, "Q3_K_R4", _QK_K, 110, 0, 4),
    (212, "Q4_K_R4", _QK_K, 144, 0, 4),
    (213, "Q5_K_R4", _QK_K, 176, 0, 4),
    (214, "Q6_K_R4", _QK_K, 210, 0, 4),
    (216, "IQ2_XXS_R4", _QK_K, 66, 0, 4),
    (217, "IQ2_XS_R4", _QK_K, 74, 0, 4),
    (218, "IQ3_XXS_R4", _QK_K, 98, 0, 4),
    (219, "IQ1_S_R4", 32, 6, 2, 4),      # 24-byte struct covers 32 cols x 4 rows
    (220, "IQ4_NL_R4", 32, 18, 0, 4),
    (221, "IQ3_S_R4", _QK_K, 110, 0, 4),
    (222, "IQ2_S_R4", _QK_K, 82, 0, 4),
    (223, "IQ4_XS_R8", _QK_K, 136, 0, 8),
    (229, "IQ1_M_R4", 32, 7, 2, 4),      # 28-byte struct covers 32 cols x 4 rows
    (230, "BF16_R16", 1, 2, 0, 16),
    (233, "Q6_0_R4", 32, 26, 0, 4),
    (335, "IQ2_BN_R4", 64, 16, 4, 4),
    (337, "IQ2_K_R4", _QK_K, 76, 0, 4),
    (338, "IQ3_K_R4", _QK_K, 110, 0, 4),
    (339, "IQ4_K_R4", _QK_K, 144, 0, 4),
    (340, "IQ5_K_R4", _QK_K, 176, 0, 4),
    (344, "IQ4_KS_R4", _QK_K, 136, 4, 4),
    (352, "IQ5_KS_R4", _QK_K, 168, 4, 4),
    (353, "MXFP4_R8", 32, 17, 0, 8),
    (397, "Q8_K_R16", _QK_K, 258, 0, 16),  # 16 f16 scales + 16 x 256 quants, per row
    (398, "Q8_KV_R8", 32, 32, 4, 8),
    (399, "Q8_K_R8", _QK_K, 258, 0, 8),    # 8 f16 scales + 8 x 256 quants, per row
)

_I2_S = IkType(36, "I2_S", 4, 1, 0, tensor_trailer_bytes=32)

IK_TYPES: dict[int, IkType] = {
    _I2_S.type_id: _I2_S,
    **{row[0]: IkType(*row) for row in _TABLE},
}


def ik_row_bytes(t: IkType, n_cols: int) -> int | None:
    """Bytes of one row of `n_cols` elements (ik's ggml_row_size); None if not expressible."""
    if t.block_size <= 0 or n_cols % t.block_size:
        return None
    return t.row_meta_bytes + n_cols // t.block_size * t.type_size


def ik_tensor_bytes(t: IkType, shape: Sequence[int]) -> int | None:
    """Bytes of a tensor of GGUF shape (ne0 = n_cols first), as ik's ggml_nbytes.

    None when the row size is unknown or ne[1] breaks the type's row interleaving.
    """
    row_bytes = ik_row_bytes(t, shape[0])
    n_rows_per_matrix = shape[1] if len(shape) > 1 else 1
    if row_bytes is None or n_rows_per_matrix % t.interleaved_rows:
        return None
    return row_bytes * prod(shape[1:]) + t.tensor_trailer_bytes
