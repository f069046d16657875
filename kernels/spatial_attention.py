"""Fused Triton spatial attention: GPS's pairwise geometric gate computed on the fly.

Semantics are those of `sparsegps.models.spatial_attention.reference_spatial_attention`: for
query object i and key object j of one scene, with D = c_i - c_j,

    f_ij   = [d / max_dist, dz / d, d2 / d, dy / d2, dx / d2]      (d = |D|, d2 = |D_xy|, +eps)
    z_hij  = w_h . f_ij + b_h            (w, b per query row for 'cond', shared for 'mul')
    logit  = q_i . k_j / sqrt(Dh) + log(max(gate(z), 1e-6))    gate = sigmoid | relu
    out_i  = softmax over the scene's valid keys of logit, times v

Nothing of size L x L is ever stored. Work is split FlashAttention-2 style:

* `_max_pair_distance_kernel`: per-scene max pair distance (partial maxima per row block).
* `_forward_kernel`: one program per (query block, batch*head); streams key blocks, recomputes
  f and the gate in registers, online softmax in base 2, stores out and the row log-sum-exp.
* `_backward_dkdv_kernel`: one program per key block; streams query blocks -> dK, dV.
* `_backward_dq_kernel`: one program per query block; streams key blocks -> dQ and the gate
  weight gradients, which are sums over keys and so stay in registers (no atomics: results are
  bitwise reproducible; 'mul' sums the per-row partials in torch).

Inputs may be fp32, fp16 or bf16; all accumulation is fp32. Softmax runs in base 2 with log2(e)
folded into the q.k scale; each distance and its inverse come from one rsqrt; the log of the gate
uses the GPU's lg2 instruction where available. On CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsegps.models.spatial_attention import (
    GATE_FLOOR,
    KERNEL_MAX_HEAD_DIM,
    NUM_GATE_WEIGHTS,
    PAIR_EPS,
    check_attention_inputs,
)

__all__ = ["spatial_attention", "INTERPRETED"]

_LOG2E = tl.constexpr(1.4426950408889634)
_PAIR_EPS = tl.constexpr(PAIR_EPS)
_GATE_FLOOR = tl.constexpr(GATE_FLOOR)
_LOG2_GATE_FLOOR = tl.constexpr(math.log2(GATE_FLOOR))
# exp2 argument cap in the sigmoid: beyond it the gate is far below its floor anyway, and the cap
# keeps exp2 finite.
_MAX_EXP2_ARG = tl.constexpr(64.0)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_centers(Centers, batch, offs, mask, seq_len):
    """x, y, z of objects `offs` of scene `batch` (centers are fp32 [B, L, 3] contiguous)."""
    ptrs = Centers + (batch.to(tl.int64) * seq_len + offs) * 3
    cx = tl.load(ptrs, mask=mask, other=0.0)
    cy = tl.load(ptrs + 1, mask=mask, other=0.0)
    cz = tl.load(ptrs + 2, mask=mask, other=0.0)
    return cx, cy, cz


@triton.jit
def _load_gate_weights(Weights, batch, head, offs_m, mask, stride_wb, stride_wl, stride_wh, stride_wm):
    """The six gate weights (bias, then one per feature) of query rows `offs_m` as fp32 vectors.

    'mul' passes stride_wb = stride_wl = 0, so every row reads the shared [H, 6] table.
    """
    ptrs = Weights + batch.to(tl.int64) * stride_wb + offs_m * stride_wl + head * stride_wh
    w_bias = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    w_dist = tl.load(ptrs + stride_wm, mask=mask, other=0.0).to(tl.float32)
    w_elev_sin = tl.load(ptrs + 2 * stride_wm, mask=mask, other=0.0).to(tl.float32)
    w_elev_cos = tl.load(ptrs + 3 * stride_wm, mask=mask, other=0.0).to(tl.float32)
    w_azim_sin = tl.load(ptrs + 4 * stride_wm, mask=mask, other=0.0).to(tl.float32)
    w_azim_cos = tl.load(ptrs + 5 * stride_wm, mask=mask, other=0.0).to(tl.float32)
    return w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos


@triton.jit
def _pair_features(cx_i, cy_i, cz_i, cx_j, cy_j, cz_j):
    """The pair features of broadcast query (i) and key (j) centers: distance d (not yet divided
    by max_dist: callers fold 1/max_dist into its weight) and sin/cos of elevation and azimuth.

    One rsqrt per distance gives both d and 1/d (d = d^2 * rsqrt(d^2)).
    """
    dx = cx_i - cx_j
    dy = cy_i - cy_j
    dz = cz_i - cz_j
    sq_dist_xy = dx * dx + dy * dy + _PAIR_EPS
    inv_dist_xy = tl.math.rsqrt(sq_dist_xy)
    sq_dist = sq_dist_xy + dz * dz
    inv_dist = tl.math.rsqrt(sq_dist)
    dist = sq_dist * inv_dist
    dist_xy = sq_dist_xy * inv_dist_xy
    return dist, dz * inv_dist, dist_xy * inv_dist, dy * inv_dist_xy, dx * inv_dist_xy


@triton.jit
def _gate_argument(w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos,
                   dist, elev_sin, elev_cos, azim_sin, azim_cos):
    """z = b + w . f (w_dist already scaled by 1/max_dist)."""
    return (w_bias + w_dist * dist + w_elev_sin * elev_sin + w_elev_cos * elev_cos
            + w_azim_sin * azim_sin + w_azim_cos * azim_cos)


@triton.jit
def _log2(x, FAST_LOG2: tl.constexpr):
    """log2 of positive x. Triton lowers tl.math.log2 to a ~35-instruction polynomial; on NVIDIA
    GPUs the hardware approximation (2 ulp) is one special-function op."""
    if FAST_LOG2:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.log2(x)


@triton.jit
def _log2_gate(z, IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr):
    """log2(max(gate(z), 1e-6)): the spatial term of the logit in base-2 units."""
    if IS_COND:
        # log2(sigmoid(z)) = -log2(1 + 2^(-z log2 e))
        log2_gate = -_log2(1.0 + tl.math.exp2(tl.minimum(-z * _LOG2E, _MAX_EXP2_ARG)), FAST_LOG2)
        log2_gate = tl.maximum(log2_gate, _LOG2_GATE_FLOOR)
    else:
        log2_gate = _log2(tl.maximum(z, _GATE_FLOOR), FAST_LOG2)  # relu then clamp == max(z, floor)
    return log2_gate


@triton.jit
def _log_gate_slope(z, log2_gate, IS_COND: tl.constexpr):
    """d log(max(gate(z), 1e-6)) / dz: 1 - sigmoid(z) or 1/z where the gate is above the floor."""
    if IS_COND:
        slope = tl.where(log2_gate > _LOG2_GATE_FLOOR, 1.0 - tl.math.exp2(log2_gate), 0.0)
    else:
        slope = tl.where(z > _GATE_FLOOR, 1.0 / tl.maximum(z, _GATE_FLOOR), 0.0)
    return slope


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _max_pair_distance_kernel(Centers, Lengths, PartialMax, seq_len, num_row_blocks, BLOCK: tl.constexpr):
    """PartialMax[b, row block] = max |c_i - c_j|^2 over valid i in the block and valid j."""
    pid_m = tl.program_id(0)
    batch = tl.program_id(1)
    num_objects = tl.load(Lengths + batch)
    offs_i = pid_m * BLOCK + tl.arange(0, BLOCK)
    row_mask = offs_i < num_objects
    cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_i, row_mask, seq_len)
    best = tl.zeros([BLOCK], dtype=tl.float32)
    key_end = tl.where(pid_m * BLOCK < num_objects, num_objects, 0)
    for start_n in range(0, key_end, BLOCK):
        offs_j = start_n + tl.arange(0, BLOCK)
        col_mask = offs_j < num_objects
        cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_j, col_mask, seq_len)
        dx = cx_i[:, None] - cx_j[None, :]
        dy = cy_i[:, None] - cy_j[None, :]
        dz = cz_i[:, None] - cz_j[None, :]
        sq_dist = dx * dx + dy * dy + dz * dz
        sq_dist = tl.where(row_mask[:, None] & col_mask[None, :], sq_dist, 0.0)
        best = tl.maximum(best, tl.max(sq_dist, axis=1))
    tl.store(PartialMax + batch * num_row_blocks + pid_m, tl.max(best, axis=0))


@triton.jit
def _forward_kernel(
    Q, K, V, Centers, Weights, Lengths, InvMaxDist, Out, Lse,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_wb, stride_wl, stride_wh, stride_wm,
    num_heads, seq_len, head_dim, qk_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    num_keys = tl.load(Lengths + batch)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seq_len
    d_mask = offs_d < head_dim

    q_ptrs = Q + batch.to(tl.int64) * stride_qb + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_m, row_mask, seq_len)
    w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos = _load_gate_weights(
        Weights, batch, head, offs_m, row_mask, stride_wb, stride_wl, stride_wh, stride_wm)
    w_dist = w_dist * inv_max_dist

    k_base = K + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head * stride_vh
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < num_keys
        kv_mask = col_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)
        dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
            cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])
        z = _gate_argument(w_bias[:, None], w_dist[:, None], w_elev_sin[:, None], w_elev_cos[:, None],
                           w_azim_sin[:, None], w_azim_cos[:, None], dist, elev_sin, elev_cos, azim_sin, azim_cos)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + _log2_gate(z, IS_COND, FAST_LOG2)
        scores = tl.where(col_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    has_keys = row_sum > 0.0  # False only for a scene without objects: its output is zero
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    lse = tl.where(has_keys, row_max + tl.math.log2(tl.where(has_keys, row_sum, 1.0)), 0.0)
    o_ptrs = Out + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_mask)


@triton.jit
def _backward_preprocess_kernel(
    Out, GradOut, Delta,
    stride_ob, stride_oh, stride_ol,
    stride_gb, stride_gh, stride_gl,
    num_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta[b, h, i] = sum_d dOut * Out: the row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(Out + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_len)


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, GradOut, Centers, Weights, Lengths, InvMaxDist, Lse, Delta, GradK, GradV,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_wb, stride_wl, stride_wh, stride_wm,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block; tiles are [keys, queries] (transposed scores)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    num_keys = tl.load(Lengths + batch)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < num_keys
    d_mask = offs_d < head_dim
    kv_mask = col_mask[:, None] & d_mask[None, :]
    k = tl.load(K + batch.to(tl.int64) * stride_kb + head * stride_kh + offs_n[:, None] * stride_kl
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + head * stride_vh + offs_n[:, None] * stride_vl
                + offs_d[None, :], mask=kv_mask, other=0.0)
    cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)

    q_base = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
    do_base = GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh
    row_stats_base = pid_bh.to(tl.int64) * seq_len
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Every query row (padding rows too) attends to the valid keys; padded keys get zero gradient.
    query_end = tl.where(pid_n * BLOCK_N < num_keys, seq_len, 0)
    for start_m in range(0, query_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seq_len
        q_t = tl.load(q_base + offs_m[None, :] * stride_ql + offs_d[:, None],
                      mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_gl + offs_d[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(Lse + row_stats_base + offs_m, mask=row_mask, other=0.0)
        delta = tl.load(Delta + row_stats_base + offs_m, mask=row_mask, other=0.0)
        cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_m, row_mask, seq_len)
        w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos = _load_gate_weights(
            Weights, batch, head, offs_m, row_mask, stride_wb, stride_wl, stride_wh, stride_wm)
        dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
            cx_i[None, :], cy_i[None, :], cz_i[None, :], cx_j[:, None], cy_j[:, None], cz_j[:, None])
        z = _gate_argument(w_bias[None, :], (w_dist * inv_max_dist)[None, :], w_elev_sin[None, :],
                           w_elev_cos[None, :], w_azim_sin[None, :], w_azim_cos[None, :],
                           dist, elev_sin, elev_cos, azim_sin, azim_cos)
        scores_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale + _log2_gate(z, IS_COND, FAST_LOG2)
        p_t = tl.math.exp2(scores_t - lse[None, :])
        p_t = tl.where(col_mask[:, None] & row_mask[None, :], p_t, 0.0)
        grad_v = tl.dot(p_t.to(do.dtype), do, grad_v, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        grad_k = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), grad_k, input_precision=DOT_PRECISION)

    grad_k = grad_k * sm_scale
    store_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
    tl.store(GradK + batch.to(tl.int64) * stride_dkb + head * stride_dkh + offs_n[:, None] * stride_dkl
             + offs_d[None, :], grad_k.to(GradK.dtype.element_ty), mask=store_mask)
    tl.store(GradV + batch.to(tl.int64) * stride_dvb + head * stride_dvh + offs_n[:, None] * stride_dvl
             + offs_d[None, :], grad_v.to(GradV.dtype.element_ty), mask=store_mask)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, GradOut, Centers, Weights, Lengths, InvMaxDist, Lse, Delta, GradQ, GradWeightRows,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    stride_dqb, stride_dqh, stride_dql,
    stride_wb, stride_wl, stride_wh, stride_wm,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ and the gate-weight gradient of one query block (GradWeightRows: fp32 [B, H, 6, L])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    num_keys = tl.load(Lengths + batch)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seq_len
    d_mask = offs_d < head_dim
    qo_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head * stride_qh + offs_m[:, None] * stride_ql
                + offs_d[None, :], mask=qo_mask, other=0.0)
    do = tl.load(GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :], mask=qo_mask, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_mask, other=0.0)
    cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_m, row_mask, seq_len)
    w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos = _load_gate_weights(
        Weights, batch, head, offs_m, row_mask, stride_wb, stride_wl, stride_wh, stride_wm)
    w_dist = w_dist * inv_max_dist

    k_base = K + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head * stride_vh
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    grad_bias = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_elev_sin = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_elev_cos = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_azim_sin = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_azim_cos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < num_keys
        kv_mask = col_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)
        dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
            cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])
        z = _gate_argument(w_bias[:, None], w_dist[:, None], w_elev_sin[:, None], w_elev_cos[:, None],
                           w_azim_sin[:, None], w_azim_cos[:, None], dist, elev_sin, elev_cos, azim_sin, azim_cos)
        log2_gate = _log2_gate(z, IS_COND, FAST_LOG2)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + log2_gate
        p = tl.math.exp2(scores - lse[:, None])
        p = tl.where(col_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # d loss / d logit (natural-log units)
        grad_q = tl.dot(ds.to(k.dtype), k, grad_q, input_precision=DOT_PRECISION)
        dz = ds * _log_gate_slope(z, log2_gate, IS_COND)
        grad_bias += tl.sum(dz, axis=1)
        grad_dist += tl.sum(dz * dist, axis=1)
        grad_elev_sin += tl.sum(dz * elev_sin, axis=1)
        grad_elev_cos += tl.sum(dz * elev_cos, axis=1)
        grad_azim_sin += tl.sum(dz * azim_sin, axis=1)
        grad_azim_cos += tl.sum(dz * azim_cos, axis=1)

    grad_q = grad_q * sm_scale
    grad_dist = grad_dist * inv_max_dist  # the distance feature is d / max_dist
    tl.store(GradQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dql
             + offs_d[None, :], grad_q.to(GradQ.dtype.element_ty), mask=qo_mask)
    gw_ptrs = GradWeightRows + pid_bh.to(tl.int64) * (6 * seq_len) + offs_m
    tl.store(gw_ptrs, grad_bias, mask=row_mask)
    tl.store(gw_ptrs + seq_len, grad_dist, mask=row_mask)
    tl.store(gw_ptrs + 2 * seq_len, grad_elev_sin, mask=row_mask)
    tl.store(gw_ptrs + 3 * seq_len, grad_elev_cos, mask=row_mask)
    tl.store(gw_ptrs + 4 * seq_len, grad_azim_sin, mask=row_mask)
    tl.store(gw_ptrs + 5 * seq_len, grad_azim_cos, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)
"""True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        # fp fusion (FMA contraction) stated explicitly: Triton's default for it is changing.
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)


@dataclass(frozen=True)
class LaunchConfigs:
    """One tile configuration per kernel of a call."""

    forward: TileConfig
    backward_dkdv: TileConfig
    backward_dq: TileConfig


def launch_configs(seq_len: int, head_dim: int) -> LaunchConfigs:
    """Tiles per problem size; fixed rather than autotuned so results are bitwise reproducible
    across processes too.

    Short scenes (GPS pads to 80 objects) take 64-row query tiles for more programs. The gate
    math keeps several fp32 score-sized tiles live besides the accumulators, so tiles are sized
    to stay within 255 registers without spilling when compiled for sm_90 (128-wide heads get
    narrower key tiles). The interpreter gets 32 x 32 tiles: small test scenes still span
    several blocks, and fewer programs keep it fast.
    """
    if INTERPRETED:
        tile = TileConfig(32, 32, 1, 1)
        return LaunchConfigs(tile, tile, tile)
    short = seq_len <= 128
    if head_dim <= 64:
        if short:
            return LaunchConfigs(TileConfig(64, 64, 4, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2))
        return LaunchConfigs(TileConfig(128, 64, 8, 3), TileConfig(32, 128, 8, 3), TileConfig(128, 32, 8, 2))
    forward = TileConfig(64, 32, 4, 2) if short else TileConfig(128, 32, 8, 2)
    return LaunchConfigs(forward, TileConfig(32, 32, 4, 2), TileConfig(64, 16, 4, 2))


_MAX_DIST_BLOCK = 32 if INTERPRETED else 64
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul TF32 switch: plain TF32 when allowed, else 3xTF32 (close
    to fp32 accuracy on tensor cores; "ieee" would spill heavily). Half types ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _has_ptx_log2(t: torch.Tensor) -> bool:
    """The hardware lg2 (inline PTX) exists on NVIDIA GPUs only, not under ROCm or the interpreter."""
    return t.is_cuda and torch.version.hip is None and not INTERPRETED


def _row_major_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dimension with unit stride; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _weight_strides(weights: torch.Tensor, is_cond: bool) -> tuple[int, int, int, int]:
    """(batch, row, head, item) strides of the kernel's view of the gate weights."""
    if is_cond:  # [B, H, 6, L]
        return weights.stride(0), weights.stride(3), weights.stride(1), weights.stride(2)
    return 0, 0, weights.stride(0), weights.stride(1)  # [H, 6], shared by every row


def _max_pair_distance(centers: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """max over valid pairs of sqrt(|c_i - c_j|^2 + eps) per scene, [B] fp32."""
    batch, seq_len, _ = centers.shape
    num_row_blocks = triton.cdiv(seq_len, _MAX_DIST_BLOCK)
    partial = torch.empty(batch, num_row_blocks, device=centers.device, dtype=torch.float32)
    _max_pair_distance_kernel[(num_row_blocks, batch)](
        centers, lengths, partial, seq_len, num_row_blocks, BLOCK=_MAX_DIST_BLOCK, enable_fp_fusion=True)
    return torch.sqrt(partial.amax(dim=1) + PAIR_EPS)


class _SpatialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, centers, weights, key_lengths, mode):
        q, k, v = _row_major_last(q), _row_major_last(k), _row_major_last(v)
        batch, num_heads, seq_len, head_dim = q.shape
        is_cond = mode == "cond"
        centers = centers.detach().to(device=q.device, dtype=torch.float32).contiguous()
        lengths = key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, seq_len).contiguous()
        # cond weights go to [B, H, 6, L] so each gate weight loads as one contiguous row vector
        kernel_weights = weights.detach().permute(0, 2, 3, 1).contiguous() if is_cond else weights.detach()
        configs = launch_configs(seq_len, head_dim)
        block_d = _head_dim_block(head_dim)
        precision = _dot_precision(q.dtype)
        fast_log2 = _has_ptx_log2(q)
        sm_scale = 1.0 / math.sqrt(head_dim)

        out = torch.empty_like(q)
        lse = torch.empty(batch, num_heads, seq_len, device=q.device, dtype=torch.float32)
        with _device_guard(q):
            inv_max_dist = 1.0 / _max_pair_distance(centers, lengths)
            tile = configs.forward
            grid = (triton.cdiv(seq_len, tile.block_m), batch * num_heads)
            _forward_kernel[grid](
                q, k, v, centers, kernel_weights, lengths, inv_max_dist, out, lse,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
                *_weight_strides(kernel_weights, is_cond),
                num_heads, seq_len, head_dim, sm_scale * 1.4426950408889634,
                IS_COND=is_cond, FAST_LOG2=fast_log2, DOT_PRECISION=precision,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d, **tile.launch_options(),
            )
        ctx.save_for_backward(q, k, v, out, lse, centers, kernel_weights, lengths, inv_max_dist)
        ctx.mode = mode
        ctx.weights_dtype = weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, centers, kernel_weights, lengths, inv_max_dist = ctx.saved_tensors
        grad_out = _row_major_last(grad_out)
        batch, num_heads, seq_len, head_dim = q.shape
        is_cond = ctx.mode == "cond"
        configs = launch_configs(seq_len, head_dim)
        block_d = _head_dim_block(head_dim)
        precision = _dot_precision(q.dtype)
        fast_log2 = _has_ptx_log2(q)
        sm_scale = 1.0 / math.sqrt(head_dim)
        qk_scale = sm_scale * 1.4426950408889634
        weight_strides = _weight_strides(kernel_weights, is_cond)

        delta = torch.empty_like(lse)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_weight_rows = torch.empty(batch, num_heads, NUM_GATE_WEIGHTS, seq_len, device=q.device,
                                       dtype=torch.float32)
        with _device_guard(q):
            tile = configs.backward_dq
            _backward_preprocess_kernel[(triton.cdiv(seq_len, tile.block_m), batch * num_heads)](
                out, grad_out, delta, *_strides3(out), *_strides3(grad_out),
                num_heads, seq_len, head_dim, BLOCK_M=tile.block_m, BLOCK_D=block_d, enable_fp_fusion=True,
            )
            tile = configs.backward_dkdv
            _backward_dkdv_kernel[(triton.cdiv(seq_len, tile.block_n), batch * num_heads)](
                q, k, v, grad_out, centers, kernel_weights, lengths, inv_max_dist, lse, delta, grad_k, grad_v,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
                *_strides3(grad_k), *_strides3(grad_v), *weight_strides,
                num_heads, seq_len, head_dim, qk_scale, sm_scale,
                IS_COND=is_cond, FAST_LOG2=fast_log2, DOT_PRECISION=precision,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d, **tile.launch_options(),
            )
            tile = configs.backward_dq
            _backward_dq_kernel[(triton.cdiv(seq_len, tile.block_m), batch * num_heads)](
                q, k, v, grad_out, centers, kernel_weights, lengths, inv_max_dist, lse, delta, grad_q,
                grad_weight_rows,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(grad_q),
                *weight_strides,
                num_heads, seq_len, head_dim, qk_scale, sm_scale,
                IS_COND=is_cond, FAST_LOG2=fast_log2, DOT_PRECISION=precision,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d, **tile.launch_options(),
            )
        if is_cond:
            grad_weights = grad_weight_rows.permute(0, 3, 1, 2)  # [B, L, H, 6]
        else:  # shared weights: a fixed-order torch reduction of the per-row partials
            grad_weights = grad_weight_rows.sum(dim=(0, 3))
        return grad_q, grad_k, grad_v, None, grad_weights.to(ctx.weights_dtype), None, None


def spatial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centers: torch.Tensor,
    weights: torch.Tensor,
    key_lengths: torch.Tensor,
    mode: str = "cond",
) -> torch.Tensor:
    """Fused pairwise spatial attention; same arguments and result as
    `sparsegps.models.spatial_attention.reference_spatial_attention`.

    q, k, v: [B, H, L, Dh] fp32/fp16/bf16 with Dh <= 128; centers [B, L, 3]; weights [B, L, H, 6]
    ('cond') or [H, 6] ('mul'); key_lengths [B]. Differentiable in q, k, v and weights.
    """
    check_attention_inputs(q, k, v, centers, weights, key_lengths, mode)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must be fp32, fp16 or bf16, got {q.dtype}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds the kernel's maximum of {KERNEL_MAX_HEAD_DIM}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"spatial_attention runs on CUDA tensors (got {q.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing sparsegps.kernels")
    if q.shape[1] * q.shape[0] > 65535:
        raise ValueError(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the launch grid limit 65535")
    if q.numel() == 0:  # no scenes, objects or channels: nothing to launch; q * 0 keeps the graph
        return q * 0
    return _SpatialAttention.apply(q, k, v, centers, weights, key_lengths, mode)
