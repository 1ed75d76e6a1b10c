"""Pure-torch stand-in for the CPU ops of ``sgl_kernel`` that SGLang 0.5.23 imports on CPU.

Why: SGLang's CPU path does ``from sgl_kernel import ...`` at import time, but the CPU build of
sgl_kernel is not published on PyPI and the published wheel holds CUDA code only. The project's
setup puts this directory on ``sys.path`` only where the real ``sgl_kernel`` cannot be imported.

Provided: ``assign_req_to_token_pool_cpu`` (srt/mem_cache/allocation.py) and
``copy_all_layer_kv_cache_cpu`` (kernels/ops/kvcache/cache_move.py). The speculative-decoding
ops in UNSUPPORTED import but raise when called; any other op raises an ImportError that names
it, so a new SGLang dependency fails loudly.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"]
__version__ = "0.0.0+esamp-cpu-stand-in"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's slice of ``out_cache_loc`` into ``req_to_token[req, start:end]``.

    The slices of ``out_cache_loc`` are consecutive, in batch order (same as SGLang's Triton
    kernel ``assign_req_to_token_pool``).
    """
    del pool_len  # the row length of req_to_token; torch indexing knows it
    offset = 0
    for req, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        length = end - start
        req_to_token[req, start:end] = out_cache_loc[offset : offset + length].to(req_to_token.dtype)
        offset += length


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy rows ``src_loc -> tgt_loc`` in every KV buffer, given raw addresses and row bytes.

    ``data_ptrs[b]`` is the address of buffer b and ``strides[b]`` its row size in bytes (SGLang
    passes raw pointers so one kernel covers all layers and dtypes). All source rows are read
    before any target row is written, so overlapping locations are safe.
    """
    if src_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64)
    tgt = tgt_loc.to(torch.int64)
    rows = int(torch.maximum(src.max(), tgt.max()).item()) + 1
    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * row_bytes)).from_address(address)
        buffer = torch.frombuffer(raw, dtype=torch.uint8).view(rows, row_bytes)
        buffer[tgt] = buffer[src].clone()


# Imported at module level by SGLang's CPU path but only called by features these machines
# do not run (speculative decoding). Importing them works; calling one raises.
UNSUPPORTED = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)


def _unsupported(name: str):
    def op(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by esamp-sgl's CPU stand-in for sgl_kernel "
            f"(it only has {', '.join(__all__)}); this SGLang feature needs the real sgl_kernel."
        )

    op.__name__ = name
    return op


def __getattr__(name: str):
    if name in UNSUPPORTED:
        return _unsupported(name)
    if name.startswith("__"):
        raise AttributeError(name)
    # ImportError (not AttributeError): `from sgl_kernel import x` would replace an
    # AttributeError's message with a generic one, hiding which op is missing.
    raise ImportError(
        f"sgl_kernel.{name} is not provided by esamp-sgl's CPU stand-in for sgl_kernel "
        f"(it only has {', '.join(__all__)}); this SGLang code path needs the real sgl_kernel."
    )
