"""The Triton kernels compile ahead of time for GPUs (sm80, sm90) without one: catches what the
interpreter cannot (tl.dot shape and dtype rules, loop-carried types, shared-memory budgets).

Uses triton's bundled ptxas; skipped where triton or ptxas is missing, or when the kernels were
imported interpreted (TRITON_INTERPRET=1).
"""

import inspect
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreted in this process")

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use


def _compile(fn, types, consts, arch, **opts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32"))
           for n in inspect.signature(fn.fn).parameters}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options=opts)
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    assert k.metadata.shared <= SHARED_LIMIT[arch], (fn.fn.__name__, k.metadata.shared)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("masked,softcap", [(True, False), (True, True), (False, False)])
def test_attention_kernels_compile_bf16_d128(arch, masked, softcap):
    """Every mask/softcap variant (causal and windows are MASKED; Gemma 2's cap is SOFTCAP)."""
    from tokenloom.kernels import triton_attention as T

    types = {n: "*bf16" for n in ("Q", "K", "V", "DO")}
    types.update({n: "*fp32" for n in ("O", "LSE", "DELTA", "DK", "DV", "DQ")}, scale="fp32", cap="fp32")
    for tiles, kernels in ((T._tiles(128, torch.bfloat16), (T._fwd_kernel,)),
                           (T._bwd_tiles(128, torch.bfloat16), (T._bwd_dkdv_kernel, T._bwd_dq_kernel))):
        consts = dict(MASKED=masked, SOFTCAP=softcap, IEEE=False, BLOCK_M=tiles["BLOCK_M"],
                      BLOCK_N=tiles["BLOCK_N"], BLOCK_D=tiles["BLOCK_D"])
        for fn in kernels:
            _compile(fn, types, consts, arch, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])


def test_merge_and_norm_kernels_compile():
    from tokenloom.kernels import triton_merge as M
    from tokenloom.kernels import triton_norm as N

    _compile(M._merge_kernel, {n: "*fp32" for n in ("AO", "AL", "O", "L")}, dict(BLOCK_S=64, BLOCK_D=128), 90)
    _compile(N._residual_rmsnorm_kernel, {**{n: "*bf16" for n in ("X", "R", "W", "OUT", "NEWR")}, "eps": "fp32"},
             dict(HAS_RES=True, BLOCK=8192), 90, num_warps=8)
