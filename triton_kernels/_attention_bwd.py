"""The backward @triton.jit kernels of the fused thought attention: recomputation from the saved
log-sum-exp (preprocess, dK/dV over base and extra keys, dQ). ``_attention_fwd.py`` states the
conventions (log2 scores, int64 bases with int32 lane offsets, register pressure) they share."""

import triton
import triton.language as tl

from ._attention_fwd import _is_real


@triton.jit
def _bwd_preprocess(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt, stride_gd,
    n_q_heads, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE  (dLSE folds in because d lse / d s = p)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    m0 = pid_m.to(tl.int64) * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = m0 + arange_m < Tq
    o = tl.load(Out + b * stride_ob + h * stride_oh + m0 * stride_ot + arange_m[:, None] * stride_ot
                + offs_d[None, :] * stride_od, mask=row_in[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_gb + h * stride_gh + m0 * stride_gt + arange_m[:, None] * stride_gt
                 + offs_d[None, :] * stride_gd, mask=row_in[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh * Tq + m0
    if HAS_DLSE:
        delta = delta - tl.load(DLse + row + arange_m, mask=row_in, other=0.0)
    tl.store(Delta + row + arange_m, delta, mask=row_in)


@triton.jit
def _bwd_dkdv_base_tiles(
    dk, dv, k, v, key_real, q_head, do_head, lse_row, delta_row,
    stride_qt, stride_qd, stride_gt, stride_gd,
    offs_n, offs_d, lo, hi, L, qk_scale,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK/dV of one base key tile over query tiles [lo, hi) of one (head, step)."""
    arange_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + arange_m
        row_in = offs_m < L
        q_tile = q_head + tl.cast(start_m, tl.int64) * stride_qt
        do_tile = do_head + tl.cast(start_m, tl.int64) * stride_gt
        q_t = tl.load(q_tile + arange_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                      mask=row_in[None, :], other=0.0)  # [D, M]
        lse = tl.load(lse_row + offs_m, mask=row_in, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        ok = key_real[:, None] & row_in[None, :]
        if CAUSAL:
            ok = ok & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.exp2(tl.where(ok, s_t - lse2[None, :], float("-inf")))
        do = tl.load(do_tile + arange_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                     mask=row_in[:, None], other=0.0)  # [M, D]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_row + offs_m, mask=row_in, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_base(
    Q, K, V, PAD, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_pb,
    n_q_heads, n_kv_heads, group, L, n_q_steps, Tq, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)  # tile 0 has the most query tiles below it: it launches first
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * Hkv
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    n0 = pid_n * BLOCK_N
    arange_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + arange_n
    offs_d = tl.arange(0, HEAD_DIM)
    key_in = offs_n < L
    key_real = _is_real(PAD + b * stride_pb, offs_n, key_in, HAS_PAD)
    k_tile = K + b * stride_kb + hk * stride_kh + n0.to(tl.int64) * stride_kt
    v_tile = V + b * stride_vb + hk * stride_vh + n0.to(tl.int64) * stride_vt
    k = tl.load(k_tile + arange_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=key_in[:, None], other=0.0)
    v = tl.load(v_tile + arange_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=key_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Every query step sees the base prefix; only query positions >= this key tile contribute.
    diag_lo = pid_n * BLOCK_N
    for g in range(group):
        h = hk * group + g
        for t in range(n_q_steps):
            row0 = tl.cast(t, tl.int64) * L
            q_head = Q + b * stride_qb + h * stride_qh + row0 * stride_qt
            do_head = DOut + b * stride_gb + h * stride_gh + row0 * stride_gt
            lse_row = Lse + (b * n_q_heads + h) * Tq + row0
            delta_row = Delta + (b * n_q_heads + h) * Tq + row0
            # One loop with the causal mask on every tile, not a diagonal loop and an unmasked one: the
            # second software-pipelined copy of the loop body spilled 400-500 B per thread at D = 128.
            dk, dv = _bwd_dkdv_base_tiles(dk, dv, k, v, key_real, q_head, do_head, lse_row, delta_row,
                                          stride_qt, stride_qd, stride_gt, stride_gd, offs_n, offs_d,
                                          diag_lo, L, L, qk_scale, BLOCK_M, True, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + n0.to(tl.int64) * stride_dkt + arange_n[:, None] * stride_dkt
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=key_in[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + n0.to(tl.int64) * stride_dvt + arange_n[:, None] * stride_dvt
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=key_in[:, None])


@triton.jit
def _bwd_dq_base_tiles(
    dq, q, do, lse2, delta, k_head, v_head, pad_row,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, L, qk_scale,
    BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    arange_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + arange_n
        key_in = offs_n < L
        k_tile = k_head + tl.cast(start_n, tl.int64) * stride_kt
        v_tile = v_head + tl.cast(start_n, tl.int64) * stride_vt
        k_t = tl.load(k_tile + arange_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                      mask=key_in[None, :], other=0.0)  # [D, N]
        v_t = tl.load(v_tile + arange_n[None, :] * stride_vt + offs_d[:, None] * stride_vd,
                      mask=key_in[None, :], other=0.0)  # [D, N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        ok = _is_real(pad_row, offs_n, key_in, HAS_PAD)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        p = tl.exp2(tl.where(ok, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_extra_keys(
    q, do, lse2, delta, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
    row_in, row_ok, m0, arange_m, offs_d, step, L, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """dQ from the tile's own extra keys (input-dtype tiles, fp32 products), as a fresh accumulator."""
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Software-pipelined (the loads of step ks + 1 overlap step ks). disable_licm keeps the fp32 upcast
    # of q (and dO) inside the loop instead of two hoisted fp32 [BLOCK_M, D] copies (Triton >= 3.9
    # honours it: dQ's spill at D = 128 fell from 200-232 to 80-152 B; older releases ignore it).
    for ks in tl.range(1, step + 1, num_stages=2, disable_licm=True):
        k_row0 = tl.cast(ks, tl.int64) * L + m0
        ke = tl.load(k_head + k_row0 * stride_kt + arange_m[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                     mask=row_in[:, None], other=0.0)
        ve = tl.load(v_head + k_row0 * stride_vt + arange_m[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                     mask=row_in[:, None], other=0.0)
        se = tl.sum(q.to(tl.float32) * ke.to(tl.float32), 1) * qk_scale
        pe = tl.exp2(tl.where(row_ok, se - lse2, float("-inf")))
        dse = pe * (tl.sum(do.to(tl.float32) * ve.to(tl.float32), 1) - delta)
        dq += dse[:, None] * ke.to(tl.float32)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, PAD, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_pb,
    n_q_heads, group, L, first_q_step, Tq, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first, as in the forward
    q_step = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group
    step = first_q_step + q_step

    m0 = pid_m * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + arange_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    row0 = q_step.to(tl.int64) * L + m0
    q = tl.load(Q + b * stride_qb + h * stride_qh + row0 * stride_qt
                + arange_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_in[:, None], other=0.0)
    do = tl.load(DOut + b * stride_gb + h * stride_gh + row0 * stride_gt
                 + arange_m[:, None] * stride_gt + offs_d[None, :] * stride_gd, mask=row_in[:, None], other=0.0)
    lse = tl.load(Lse + pid_bh * Tq + row0 + arange_m, mask=row_in, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * Tq + row0 + arange_m, mask=row_in, other=0.0)
    k_head = K + b * stride_kb + hk * stride_kh
    v_head = V + b * stride_vb + hk * stride_vh
    pad_row = PAD + b * stride_pb

    # Own extra keys first, as in the forward.
    row_ok = _is_real(pad_row, offs_m, row_in, HAS_PAD)
    dq = _dq_extra_keys(q, do, lse2, delta, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                        row_in, row_ok, m0, arange_m, offs_d, step, L, qk_scale, BLOCK_M, HEAD_DIM)
    diag_lo = pid_m * BLOCK_M
    diag_hi = tl.minimum(diag_lo + BLOCK_M, L)
    # One loop with the causal mask on every tile (as in dK/dV): a second pipelined copy of the loop
    # body for the diagonal tiles cost 70-150 B more of spills at D = 128.
    dq = _bwd_dq_base_tiles(dq, q, do, lse2, delta, k_head, v_head, pad_row,
                            stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                            0, diag_hi, L, qk_scale, BLOCK_N, HAS_PAD, True, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqt
             + arange_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_in[:, None])


@triton.jit
def _attn_bwd_dkdv_extra(
    Q, K, V, PAD, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_pb,
    n_q_heads, n_kv_heads, group, L, first_q_step, n_key_steps, Tq, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr,
):
    """dK/dV of extra key (s', j): seen only by queries (s, j), s >= s', of the same kv group."""
    pid_n = tl.program_id(0)
    k_step = tl.program_id(1) + 1
    pid_bh = tl.program_id(2).to(tl.int64)  # over B * Hkv
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    n0 = pid_n * BLOCK_N
    arange_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + arange_n
    offs_d = tl.arange(0, HEAD_DIM)
    key_in = offs_n < L
    key_real = _is_real(PAD + b * stride_pb, offs_n, key_in, HAS_PAD)
    k_row0 = k_step.to(tl.int64) * L + n0
    ke = tl.load(K + b * stride_kb + hk * stride_kh + k_row0 * stride_kt + arange_n[:, None] * stride_kt
                 + offs_d[None, :] * stride_kd, mask=key_in[:, None], other=0.0)
    ve = tl.load(V + b * stride_vb + hk * stride_vh + k_row0 * stride_vt + arange_n[:, None] * stride_vt
                 + offs_d[None, :] * stride_vd, mask=key_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first_s = tl.maximum(k_step, first_q_step)
    for g in range(group):
        h = hk * group + g
        # Software-pipelined (loads of the next step overlap this one); input-dtype tiles, fp32 products.
        for s in tl.range(first_s, n_key_steps, num_stages=2):
            q_row0 = (s - first_q_step).to(tl.int64) * L + n0
            q = tl.load(Q + b * stride_qb + h * stride_qh + q_row0 * stride_qt + arange_n[:, None] * stride_qt
                        + offs_d[None, :] * stride_qd, mask=key_in[:, None], other=0.0)
            do = tl.load(DOut + b * stride_gb + h * stride_gh + q_row0 * stride_gt + arange_n[:, None] * stride_gt
                         + offs_d[None, :] * stride_gd, mask=key_in[:, None], other=0.0)
            row = (b * n_q_heads + h) * Tq + q_row0
            lse = tl.load(Lse + row + arange_n, mask=key_in, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
            delta = tl.load(Delta + row + arange_n, mask=key_in, other=0.0)
            se = tl.sum(q.to(tl.float32) * ke.to(tl.float32), 1) * qk_scale
            pe = tl.exp2(tl.where(key_real, se - lse2, float("-inf")))
            dv += pe[:, None] * do.to(tl.float32)
            dse = pe * (tl.sum(do.to(tl.float32) * ve.to(tl.float32), 1) - delta)
            dk += dse[:, None] * q.to(tl.float32)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + k_row0 * stride_dkt + arange_n[:, None] * stride_dkt
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=key_in[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + k_row0 * stride_dvt + arange_n[:, None] * stride_dvt
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=key_in[:, None])
