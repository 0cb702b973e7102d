"""FP8 storage of compressed entries: e4m3 codes and one fp32 scale per entry, the paper release's layout.

An entry of `dim` numbers becomes `dim` e4m3 bytes plus a 4-byte scale, scale = amax / 448 over the entry
(448 is e4m3's largest finite value), so the largest magnitude maps to 448 and the relative error of every
number is at most 2^-4 (3 mantissa bits, round to nearest), down to e4m3's subnormals. The release stores
its index keys this way (132 bytes for 128 dims); this project stores compressed KV the same way (516 bytes
for 512 dims; the release's own KV format keeps the 64 RoPE dims in bf16 with power-of-two scales per 64 dims).
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_fp8(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """entries (..., dim) -> (codes (..., dim) e4m3, scales (..., 1) fp32), on the entries' device.
    An all-zero entry gets scale 1 (its codes are zero) rather than a division by zero."""
    values = entries.float()
    amax = values.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (values / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # clamp: x / scale may round past 448
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., dim) e4m3, scales (..., 1) fp32 -> entries (..., dim) in `dtype`."""
    return (codes.float() * scales).to(dtype)
