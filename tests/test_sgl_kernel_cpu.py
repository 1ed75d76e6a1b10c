"""The pure-torch stand-in for sgl_kernel's CPU ops, against straightforward references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).parents[1] / "runtime_patch" / "sgl_kernel_cpu" / "sgl_kernel" / "__init__.py"
_spec = importlib.util.spec_from_file_location("esamp_sgl_kernel_stand_in", _PATH)
stand_in = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stand_in)


def test_assign_req_to_token_pool_writes_consecutive_slices():
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0, 3])
    start = torch.tensor([0, 3, 5])
    end = torch.tensor([2, 6, 6])
    out_cache_loc = torch.tensor([11, 12, 21, 22, 23, 31], dtype=torch.int64)

    expected = req_to_token.clone()
    expected[2, 0:2] = torch.tensor([11, 12])
    expected[0, 3:6] = torch.tensor([21, 22, 23])
    expected[3, 5:6] = torch.tensor([31])

    stand_in.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 10)
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_copy_all_layer_kv_cache_copies_rows_in_every_buffer(dtype):
    gen = torch.Generator().manual_seed(0)
    buffers = [(torch.randn(16, 3, 8, generator=gen) * 10).to(dtype) for _ in range(3)]
    buffers.append((torch.randn(16, 5, generator=gen) * 10).to(dtype))  # another row size
    src = torch.tensor([1, 2, 3, 9])
    tgt = torch.tensor([2, 3, 4, 15])  # overlaps src: all sources are read before writing
    expected = [b.clone() for b in buffers]
    for e in expected:
        e[tgt] = e[src].clone()

    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers], dtype=torch.int64)
    stand_in.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for got, want in zip(buffers, expected):
        assert torch.equal(got, want)


def test_copy_with_no_locations_is_a_no_op():
    buf = torch.arange(8.0).view(4, 2)
    before = buf.clone()
    empty = torch.tensor([], dtype=torch.int64)
    stand_in.copy_all_layer_kv_cache_cpu(torch.tensor([buf.data_ptr()], dtype=torch.uint64),
                                         torch.tensor([8]), empty, empty)
    assert torch.equal(buf, before)


def test_missing_op_names_itself():
    with pytest.raises(ImportError, match="sgl_kernel.fused_add_rmsnorm is not provided"):
        stand_in.fused_add_rmsnorm


def test_unsupported_op_imports_but_raises_naming_itself():
    op = stand_in.verify_tree_greedy_cpu
    with pytest.raises(NotImplementedError, match="sgl_kernel.verify_tree_greedy_cpu is not provided"):
        op()
