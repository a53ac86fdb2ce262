"""The forward @triton.jit kernels of the fused thought attention (the backward ones:
_attention_bwd.py); launchers and autograd live in
attention.py (which documents the algorithm). Scores are kept in log2 units
(qk_scale = scale * log2(e)) so that every exponential is an exp2.

Offsets: every product that can pass 2**31 elements (batch, head, step and tile starts times their
strides, ``bh * Tq``) is a scalar int64 folded into a base pointer; the per-lane offsets added to it
stay int32 (``arange(BLOCK) * stride`` is small), which keeps address math cheap in registers.

Register pressure (sm_90, checked by tests/test_triton_compile_sm90.py): tiles that feed no dot --
q and dO in the extra-key loops, the extra keys and values -- stay in the input dtype and are
upcast where used; the forward and dQ extra-key loops disable loop-invariant code motion so that
the compiler does not hoist the fp32 upcast of q and dO back out as live fp32 [BLOCK_M, D] copies.
The extra-key loops are software-pipelined (``tl.range(num_stages=2)``): Triton has no dot there to
trigger pipelining by itself, and each step is two [BLOCK, D] loads."""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# The visibility rule in kernel form (quietstar/layout.py is its one definition): a base position is
# a key or a query only where it exists and is not padding; base keys are causal; a query's extra
# keys are its own earlier steps at the same position (the extra-key loops walk exactly those).


@triton.jit
def _is_real(pad_row, offs, in_range, HAS_PAD: tl.constexpr):
    """Positions ``offs`` that exist (``in_range``) and are not padding (``pad_row[offs] != 0``)."""
    real = in_range
    if HAS_PAD:
        real = real & (tl.load(pad_row + offs, mask=in_range, other=0) != 0)
    return real


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_base_tiles(
    acc, l_i, m_i, q, k_head, v_head, pad_row,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, L, qk_scale,
    BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of a query tile with base key tiles [lo, hi) (scores in log2 units)."""
    arange_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + arange_n
        key_in = offs_n < L
        k_tile = k_head + tl.cast(start_n, tl.int64) * stride_kt
        v_tile = v_head + tl.cast(start_n, tl.int64) * stride_vt
        k_t = tl.load(k_tile + arange_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                      mask=key_in[None, :], other=0.0)  # [D, N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        ok = _is_real(pad_row, offs_n, key_in, HAS_PAD)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay NaN-free
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_tile + arange_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=key_in[:, None], other=0.0)  # [N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_extra_keys(
    acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
    row_in, row_ok, m0, arange_m, offs_d, step, L, qk_scale,
):
    """Online-softmax update with the tile's own extra keys: row i sees key (ks, i) for ks in 1..step,
    one [BLOCK_M, D] slab per step reduced elementwise. q, the keys and the values stay in the input
    dtype; each product is formed in fp32."""
    # Software-pipelined (the loads of step ks + 1 overlap step ks). disable_licm keeps the fp32 upcast
    # of q (and dO) inside the loop instead of two hoisted fp32 [BLOCK_M, D] copies (Triton >= 3.9
    # honours it: dQ's spill at D = 128 fell from 200-232 to 80-152 B; older releases ignore it).
    for ks in tl.range(1, step + 1, num_stages=2, disable_licm=True):
        k_row0 = tl.cast(ks, tl.int64) * L + m0
        ke = tl.load(k_head + k_row0 * stride_kt + arange_m[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                     mask=row_in[:, None], other=0.0)
        ve = tl.load(v_head + k_row0 * stride_vt + arange_m[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                     mask=row_in[:, None], other=0.0)
        se = tl.where(row_ok, tl.sum(q.to(tl.float32) * ke.to(tl.float32), 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, se)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(se - m_use)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * ve.to(tl.float32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, PAD, Out, Lse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_pb,
    n_q_heads, group, L, first_q_step, Tq, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heaviest first: the last query tile walks the longest base prefix and the last step has the
    # most extra keys, so they launch first and the short tiles fill the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    q_step = tl.num_programs(1) - 1 - tl.program_id(1)  # local query step
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group
    step = first_q_step + q_step  # absolute step: the row sees extra steps 1..step

    m0 = pid_m * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + arange_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    row0 = q_step.to(tl.int64) * L + m0  # first query row of the tile, in [0, Tq)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row0 * stride_qt
                + arange_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_in[:, None], other=0.0)
    k_head = K + b * stride_kb + hk * stride_kh
    v_head = V + b * stride_vb + hk * stride_vh
    pad_row = PAD + b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Own extra keys first (the softmax merge is order-free): this loop then holds no tensor-core
    # state, and the base loop after it none of this loop's tiles.
    row_ok = _is_real(pad_row, offs_m, row_in, HAS_PAD)
    acc, l_i, m_i = _fwd_extra_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                                    row_in, row_ok, m0, arange_m, offs_d, step, L, qk_scale)

    # Base prefix: tiles strictly below the diagonal unmasked (but for padding), then the diagonal.
    diag_lo = pid_m * BLOCK_M
    diag_hi = tl.minimum(diag_lo + BLOCK_M, L)
    acc, l_i, m_i = _fwd_base_tiles(acc, l_i, m_i, q, k_head, v_head, pad_row,
                                    stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                                    0, diag_lo, L, qk_scale, BLOCK_N, HAS_PAD, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_base_tiles(acc, l_i, m_i, q, k_head, v_head, pad_row,
                                    stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                                    diag_lo, diag_hi, L, qk_scale, BLOCK_N, HAS_PAD, True, DOT_PRECISION)

    empty = l_i == 0.0  # padded rows with no real key at or before them: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Out + b * stride_ob + h * stride_oh + row0 * stride_ot
             + arange_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_in[:, None])
    tl.store(Lse + pid_bh * Tq + row0 + arange_m, lse, mask=row_in)
