"""Fused Triton spatial attention: GPS's pairwise geometric gate computed on the fly.

Semantics are those of `sparsegps.models.spatial_attention.reference_spatial_attention`: for
query object i and key object j of one scene, with D = c_i - c_j,

    f_ij   = [d / max_dist, dz / d, d2 / d, dy / d2, dx / d2]      (d = |D|, d2 = |D_xy|, +eps)
    z_hij  = w_h . f_ij + b_h            (w, b per query row for 'cond', shared for 'mul')
    logit  = q_i . k_j / sqrt(Dh) + log(max(gate(z), 1e-6))    gate = sigmoid | relu
    out_i  = softmax over the scene's valid keys of logit, times v

Nothing of size L x L is ever stored. Two paths, chosen by the padded scene length L:

* Small scenes (L <= 128; GPS keeps at most 80 objects): every program holds all keys in one tile.
  `_small_forward_kernel`: one program per (query block, scene, head group) computes the pair
  geometry of its block once and reuses it for the heads of its group; the softmax needs no
  running rescale. `_small_backward_kernel`: one program per (scene, head group) computes the
  softmax's row term (Delta) inline, and dQ, dK, dV and the gate-weight gradients in one launch.
* Long scenes, FlashAttention-2 style: `_forward_kernel` streams key tiles with an online softmax;
  `_backward_preprocess_kernel` (Delta), `_backward_dkdv_kernel` (per key tile) and
  `_backward_dq_kernel` (per query tile, plus the gate-weight gradients).

`_inverse_max_distance_kernel` computes 1 / max_dist per scene in one launch; a network computes it
once per forward and passes it to every layer (`inv_max_dist`).

The ops are registered with `torch.library` (`sparsegps::spatial_attention_forward`,
`sparsegps::spatial_attention_backward`, `sparsegps::inverse_max_pair_distance`) with fake
implementations, so `torch.compile` and CUDA graphs capture them as single nodes.

Caveats:

* Inputs may be fp32, fp16 or bf16; all accumulation is fp32. fp32 inputs follow torch's TF32
  switch (TF32 when allowed, else 3xTF32).
* Every query row, padded rows included, attends to the scene's valid keys (the reference does
  the same), so padded rows' output gradients reach dK and dV: mask the loss, not the attention.
* Results are bitwise reproducible: tiles are fixed per problem size (no autotuning) and no
  gradient is accumulated with atomics ('mul' sums per-row partials in torch).
* The small-L backward recomputes the pair geometry per head: holding dK and dV of several heads
  across query blocks would not fit in registers; the geometry is a small part of its work.
* The head loops disable loop-invariant code motion: hoisting head-independent work out of them
  keeps it live across heads and spilled registers on sm_90.
* Tiles were chosen from sm_90 compiles (registers and spills, not timings): the small-L path
  uses 32-row query blocks (below wgmma's 64 rows: 64-row blocks spill at 128 keys); the long
  path keeps 64 rows on the M side of every dot. `make gpu-check` reports both on a real GPU.
* Launch grids limit scenes x heads to 65535. Lengths are clamped to [0, L] inside the kernels.
* On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before this module
  is imported); the interpreter cannot multiply bf16 tiles.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsegps.spatial_attention_spec import (
    GATE_FLOOR,
    KERNEL_MAX_HEAD_DIM,
    NUM_GATE_WEIGHTS,
    PAIR_EPS,
    check_attention_inputs,
)

__all__ = ["spatial_attention", "inverse_max_pair_distance", "INTERPRETED", "SMALL_L_MAX"]

_LOG2E = tl.constexpr(1.4426950408889634)
_PAIR_EPS = tl.constexpr(PAIR_EPS)
_GATE_FLOOR = tl.constexpr(GATE_FLOOR)
_LOG2_GATE_FLOOR = tl.constexpr(math.log2(GATE_FLOOR))
# exp2 argument cap in the sigmoid: beyond it the gate is far below its floor anyway, and the cap
# keeps exp2 finite.
_MAX_EXP2_ARG = tl.constexpr(64.0)

SMALL_L_MAX = 128
"""Scenes padded to at most this many objects take the single-key-tile path."""


# ----------------------------------------------------------------------------------------------
# Device helpers: loads, geometry, gate
# ----------------------------------------------------------------------------------------------


@triton.jit
def _num_valid_objects(Lengths, batch, seq_len):
    """key_lengths[batch] clamped to [0, seq_len] (any integer dtype)."""
    return tl.minimum(tl.maximum(tl.load(Lengths + batch).to(tl.int32), 0), seq_len)


@triton.jit
def _load_centers(Centers, batch, offs, mask, seq_len):
    """x, y, z of objects `offs` of scene `batch` (centers are fp32 [B, L, 3] contiguous)."""
    ptrs = Centers + (batch.to(tl.int64) * seq_len + offs) * 3
    cx = tl.load(ptrs, mask=mask, other=0.0)
    cy = tl.load(ptrs + 1, mask=mask, other=0.0)
    cz = tl.load(ptrs + 2, mask=mask, other=0.0)
    return cx, cy, cz


@triton.jit
def _load_tile(Base, offs_rows, offs_d, stride_row, mask_rows, mask_d):
    """A [rows, Dh] tile of one (scene, head) with unit stride along Dh."""
    return tl.load(Base + offs_rows[:, None] * stride_row + offs_d[None, :],
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _load_gate_weights(Weights, batch, head, offs_m, mask, stride_wb, stride_wl, stride_wh, stride_wm):
    """The six gate weights (bias, then one per feature) of query rows `offs_m` as fp32 vectors,
    read through the strides of [B, L, H, 6] ('cond') or, with stride_wb = stride_wl = 0, of the
    shared [H, 6] table ('mul')."""
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
def _row_gate_argument(w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos,
                       dist, elev_sin, elev_cos, azim_sin, azim_cos):
    """z of [queries, keys] tiles from per-query-row weights."""
    return _gate_argument(w_bias[:, None], w_dist[:, None], w_elev_sin[:, None], w_elev_cos[:, None],
                          w_azim_sin[:, None], w_azim_cos[:, None], dist, elev_sin, elev_cos, azim_sin, azim_cos)


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
# Device helpers: stores
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_tile(Base, values, offs_rows, offs_d, stride_row, mask_rows, mask_d):
    """Store a [rows, Dh] fp32 tile of one (scene, head) in the output's dtype."""
    tl.store(Base + offs_rows[:, None] * stride_row + offs_d[None, :], values.to(Base.dtype.element_ty),
             mask=mask_rows[:, None] & mask_d[None, :])


@triton.jit
def _store_softmax_stats(Out, Lse, pid_bh, batch, head, offs_m, offs_d, row_mask, d_mask,
                         stride_ob, stride_oh, stride_ol, seq_len, acc, row_max, row_sum):
    """out = acc / row_sum and the base-2 log-sum-exp of one (scene, head)'s query rows; a scene
    without objects (row_sum 0) gets zeros."""
    has_keys = row_sum > 0.0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, row_max + tl.math.log2(safe_sum), 0.0)
    _store_tile(Out + batch.to(tl.int64) * stride_ob + head * stride_oh, acc / safe_sum[:, None],
                offs_m, offs_d, stride_ol, row_mask, d_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_mask)


@triton.jit
def _store_gate_grads(GradW, batch, head, offs_m, mask, stride_gwb, stride_gwl, stride_gwh,
                      g_bias, g_dist, g_elev_sin, g_elev_cos, g_azim_sin, g_azim_cos):
    """The six gate-weight gradients of query rows `offs_m` into GradW [B, L, H, 6] (last dim
    contiguous), in GradW's dtype."""
    ptrs = GradW + batch.to(tl.int64) * stride_gwb + offs_m * stride_gwl + head * stride_gwh
    ty = GradW.dtype.element_ty
    tl.store(ptrs, g_bias.to(ty), mask=mask)
    tl.store(ptrs + 1, g_dist.to(ty), mask=mask)
    tl.store(ptrs + 2, g_elev_sin.to(ty), mask=mask)
    tl.store(ptrs + 3, g_elev_cos.to(ty), mask=mask)
    tl.store(ptrs + 4, g_azim_sin.to(ty), mask=mask)
    tl.store(ptrs + 5, g_azim_cos.to(ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _inverse_max_distance_kernel(Centers, Lengths, InvMaxDist, seq_len, BLOCK: tl.constexpr):
    """InvMaxDist[b] = 1 / max over valid pairs of sqrt(|c_i - c_j|^2 + eps); 1 without objects."""
    batch = tl.program_id(0)
    num_objects = _num_valid_objects(Lengths, batch, seq_len)
    best = tl.zeros([BLOCK], dtype=tl.float32)
    for start_m in range(0, num_objects, BLOCK):
        offs_i = start_m + tl.arange(0, BLOCK)
        row_mask = offs_i < num_objects
        cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_i, row_mask, seq_len)
        for start_n in range(0, num_objects, BLOCK):
            offs_j = start_n + tl.arange(0, BLOCK)
            col_mask = offs_j < num_objects
            cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_j, col_mask, seq_len)
            dx = cx_i[:, None] - cx_j[None, :]
            dy = cy_i[:, None] - cy_j[None, :]
            dz = cz_i[:, None] - cz_j[None, :]
            sq_dist = dx * dx + dy * dy + dz * dz
            sq_dist = tl.where(row_mask[:, None] & col_mask[None, :], sq_dist, 0.0)
            best = tl.maximum(best, tl.max(sq_dist, axis=1))
    max_dist = tl.sqrt_rn(tl.max(best, axis=0) + _PAIR_EPS)
    tl.store(InvMaxDist + batch, tl.where(num_objects > 0, 1.0 / max_dist, 1.0))


@triton.jit
def _small_forward_kernel(
    Q, K, V, Centers, Weights, Lengths, InvMaxDist, Out, Lse,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_wb, stride_wl, stride_wh, stride_wm,
    num_heads, seq_len, head_dim, qk_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block of one scene for HEADS_PER_PROGRAM heads; all keys fit one BLOCK_N tile."""
    pid_m = tl.program_id(0)
    batch = tl.program_id(1)
    first_head = tl.program_id(2) * HEADS_PER_PROGRAM
    num_keys = _num_valid_objects(Lengths, batch, seq_len)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seq_len
    col_mask = offs_n < num_keys
    d_mask = offs_d < head_dim

    # the pair geometry of this block, shared by every head of the group
    cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_m, row_mask, seq_len)
    cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)
    dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
        cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])

    for h in tl.range(0, HEADS_PER_PROGRAM, disable_licm=True):  # hoisting per-head work spills
        head = first_head + h
        q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh, offs_m, offs_d, stride_ql,
                       row_mask, d_mask)
        k = _load_tile(K + batch.to(tl.int64) * stride_kb + head * stride_kh, offs_n, offs_d, stride_kl,
                       col_mask, d_mask)
        v = _load_tile(V + batch.to(tl.int64) * stride_vb + head * stride_vh, offs_n, offs_d, stride_vl,
                       col_mask, d_mask)
        w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos = _load_gate_weights(
            Weights, batch, head, offs_m, row_mask, stride_wb, stride_wl, stride_wh, stride_wm)
        z = _row_gate_argument(w_bias, w_dist * inv_max_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos,
                               dist, elev_sin, elev_cos, azim_sin, azim_cos)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + _log2_gate(z, IS_COND, FAST_LOG2)
        scores = tl.where(col_mask[None, :], scores, float("-inf"))
        row_max = tl.max(scores, axis=1)
        p = tl.math.exp2(scores - tl.where(num_keys > 0, row_max, 0.0)[:, None])  # no keys: all zeros
        row_sum = tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        _store_softmax_stats(Out, Lse, batch * num_heads + head, batch, head, offs_m, offs_d, row_mask, d_mask,
                             stride_ob, stride_oh, stride_ol, seq_len, acc, row_max, row_sum)


@triton.jit
def _small_backward_kernel(
    Q, K, V, Out, GradOut, Centers, Weights, Lengths, InvMaxDist, Lse, GradQ, GradK, GradV, GradW,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_gb, stride_gh, stride_gl,
    stride_dqb, stride_dqh, stride_dql,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_wb, stride_wl, stride_wh, stride_wm,
    stride_gwb, stride_gwl, stride_gwh,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_GRAD_Q: tl.constexpr, NEED_GRAD_KV: tl.constexpr, NEED_GRAD_W: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Every gradient of one scene for HEADS_PER_PROGRAM heads: dK, dV accumulate in registers
    over the query blocks, dQ and the gate-weight gradients are complete per query block (all keys
    sit in one tile), and Delta = rowsum(dOut * Out) is computed where it is used."""
    batch = tl.program_id(0)
    first_head = tl.program_id(1) * HEADS_PER_PROGRAM
    num_keys = _num_valid_objects(Lengths, batch, seq_len)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < num_keys
    d_mask = offs_d < head_dim
    key_store_mask = offs_n < seq_len  # padded keys get explicit zeros
    cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)

    for h in tl.range(0, HEADS_PER_PROGRAM, disable_licm=True):  # hoisting per-head work spills
        head = first_head + h
        k = _load_tile(K + batch.to(tl.int64) * stride_kb + head * stride_kh, offs_n, offs_d, stride_kl,
                       col_mask, d_mask)
        v = _load_tile(V + batch.to(tl.int64) * stride_vb + head * stride_vh, offs_n, offs_d, stride_vl,
                       col_mask, d_mask)
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        row_stats = Lse + (batch * num_heads + head).to(tl.int64) * seq_len
        # every query row, padded ones too, attends to the valid keys; none when the scene is empty
        query_end = tl.where(num_keys > 0, seq_len, 0)
        for start_m in range(0, query_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_mask = offs_m < seq_len
            q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh, offs_m, offs_d, stride_ql,
                           row_mask, d_mask)
            do = _load_tile(GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh, offs_m, offs_d,
                            stride_gl, row_mask, d_mask)
            o = _load_tile(Out + batch.to(tl.int64) * stride_ob + head * stride_oh, offs_m, offs_d, stride_ol,
                           row_mask, d_mask)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
            lse = tl.load(row_stats + offs_m, mask=row_mask, other=0.0)
            cx_i, cy_i, cz_i = _load_centers(Centers, batch, offs_m, row_mask, seq_len)
            dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
                cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])
            w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos = _load_gate_weights(
                Weights, batch, head, offs_m, row_mask, stride_wb, stride_wl, stride_wh, stride_wm)
            z = _row_gate_argument(w_bias, w_dist * inv_max_dist, w_elev_sin, w_elev_cos, w_azim_sin,
                                   w_azim_cos, dist, elev_sin, elev_cos, azim_sin, azim_cos)
            log2_gate = _log2_gate(z, IS_COND, FAST_LOG2)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + log2_gate
            p = tl.math.exp2(scores - lse[:, None])
            p = tl.where(col_mask[None, :] & row_mask[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])  # d loss / d logit (natural-log units)
            if NEED_GRAD_KV:
                grad_v = tl.dot(tl.trans(p.to(do.dtype)), do, grad_v, input_precision=DOT_PRECISION)
                grad_k = tl.dot(tl.trans(ds.to(q.dtype)), q, grad_k, input_precision=DOT_PRECISION)
            if NEED_GRAD_Q:
                grad_q = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
                _store_tile(GradQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh, grad_q, offs_m, offs_d,
                            stride_dql, row_mask, d_mask)
            if NEED_GRAD_W:
                dz = ds * _log_gate_slope(z, log2_gate, IS_COND)
                _store_gate_grads(GradW, batch, head, offs_m, row_mask, stride_gwb, stride_gwl, stride_gwh,
                                  tl.sum(dz, axis=1), tl.sum(dz * dist, axis=1) * inv_max_dist,
                                  tl.sum(dz * elev_sin, axis=1), tl.sum(dz * elev_cos, axis=1),
                                  tl.sum(dz * azim_sin, axis=1), tl.sum(dz * azim_cos, axis=1))
        if num_keys == 0:  # nothing attended: dQ and the gate-weight gradients are zero too
            for start_m in range(0, seq_len, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_mask = offs_m < seq_len
                zeros_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
                if NEED_GRAD_Q:
                    _store_tile(GradQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh,
                                tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), offs_m, offs_d, stride_dql,
                                row_mask, d_mask)
                if NEED_GRAD_W:
                    _store_gate_grads(GradW, batch, head, offs_m, row_mask, stride_gwb, stride_gwl, stride_gwh,
                                      zeros_rows, zeros_rows, zeros_rows, zeros_rows, zeros_rows, zeros_rows)
        if NEED_GRAD_KV:
            _store_tile(GradK + batch.to(tl.int64) * stride_dkb + head * stride_dkh, grad_k * sm_scale, offs_n,
                        offs_d, stride_dkl, key_store_mask, d_mask)
            _store_tile(GradV + batch.to(tl.int64) * stride_dvb + head * stride_dvh, grad_v, offs_n, offs_d,
                        stride_dvl, key_store_mask, d_mask)


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
    """One query block of one (scene, head): streams key blocks with an online softmax."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    num_keys = _num_valid_objects(Lengths, batch, seq_len)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seq_len
    d_mask = offs_d < head_dim

    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh, offs_m, offs_d, stride_ql, row_mask, d_mask)
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
        k = _load_tile(k_base, offs_n, offs_d, stride_kl, col_mask, d_mask)
        v = _load_tile(v_base, offs_n, offs_d, stride_vl, col_mask, d_mask)
        cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)
        dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
            cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])
        z = _row_gate_argument(w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos,
                               dist, elev_sin, elev_cos, azim_sin, azim_cos)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + _log2_gate(z, IS_COND, FAST_LOG2)
        scores = tl.where(col_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
    _store_softmax_stats(Out, Lse, pid_bh, batch, head, offs_m, offs_d, row_mask, d_mask,
                         stride_ob, stride_oh, stride_ol, seq_len, acc, row_max, row_sum)


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
    row_mask = offs_m < seq_len
    d_mask = offs_d < head_dim
    o = _load_tile(Out + batch.to(tl.int64) * stride_ob + head * stride_oh, offs_m, offs_d, stride_ol,
                   row_mask, d_mask).to(tl.float32)
    do = _load_tile(GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh, offs_m, offs_d, stride_gl,
                    row_mask, d_mask).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=row_mask)


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
    num_keys = _num_valid_objects(Lengths, batch, seq_len)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < num_keys
    d_mask = offs_d < head_dim
    k = _load_tile(K + batch.to(tl.int64) * stride_kb + head * stride_kh, offs_n, offs_d, stride_kl, col_mask, d_mask)
    v = _load_tile(V + batch.to(tl.int64) * stride_vb + head * stride_vh, offs_n, offs_d, stride_vl, col_mask, d_mask)
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
        do = _load_tile(do_base, offs_m, offs_d, stride_gl, row_mask, d_mask)
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

    store_mask = offs_n < seq_len
    _store_tile(GradK + batch.to(tl.int64) * stride_dkb + head * stride_dkh, grad_k * sm_scale, offs_n, offs_d,
                stride_dkl, store_mask, d_mask)
    _store_tile(GradV + batch.to(tl.int64) * stride_dvb + head * stride_dvh, grad_v, offs_n, offs_d,
                stride_dvl, store_mask, d_mask)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, GradOut, Centers, Weights, Lengths, InvMaxDist, Lse, Delta, GradQ, GradW,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    stride_dqb, stride_dqh, stride_dql,
    stride_wb, stride_wl, stride_wh, stride_wm,
    stride_gwb, stride_gwl, stride_gwh,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    IS_COND: tl.constexpr, FAST_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_GRAD_Q: tl.constexpr, NEED_GRAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ and the gate-weight gradients of one query block; the weight gradients are sums over
    keys and stay in registers (no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    num_keys = _num_valid_objects(Lengths, batch, seq_len)
    inv_max_dist = tl.load(InvMaxDist + batch)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seq_len
    d_mask = offs_d < head_dim
    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh, offs_m, offs_d, stride_ql, row_mask, d_mask)
    do = _load_tile(GradOut + batch.to(tl.int64) * stride_gb + head * stride_gh, offs_m, offs_d, stride_gl,
                    row_mask, d_mask)
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
        k = _load_tile(k_base, offs_n, offs_d, stride_kl, col_mask, d_mask)
        v = _load_tile(v_base, offs_n, offs_d, stride_vl, col_mask, d_mask)
        cx_j, cy_j, cz_j = _load_centers(Centers, batch, offs_n, col_mask, seq_len)
        dist, elev_sin, elev_cos, azim_sin, azim_cos = _pair_features(
            cx_i[:, None], cy_i[:, None], cz_i[:, None], cx_j[None, :], cy_j[None, :], cz_j[None, :])
        z = _row_gate_argument(w_bias, w_dist, w_elev_sin, w_elev_cos, w_azim_sin, w_azim_cos,
                               dist, elev_sin, elev_cos, azim_sin, azim_cos)
        log2_gate = _log2_gate(z, IS_COND, FAST_LOG2)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + log2_gate
        p = tl.math.exp2(scores - lse[:, None])
        p = tl.where(col_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # d loss / d logit (natural-log units)
        if NEED_GRAD_Q:
            grad_q = tl.dot(ds.to(k.dtype), k, grad_q, input_precision=DOT_PRECISION)
        if NEED_GRAD_W:
            dz = ds * _log_gate_slope(z, log2_gate, IS_COND)
            grad_bias += tl.sum(dz, axis=1)
            grad_dist += tl.sum(dz * dist, axis=1)
            grad_elev_sin += tl.sum(dz * elev_sin, axis=1)
            grad_elev_cos += tl.sum(dz * elev_cos, axis=1)
            grad_azim_sin += tl.sum(dz * azim_sin, axis=1)
            grad_azim_cos += tl.sum(dz * azim_cos, axis=1)

    if NEED_GRAD_Q:
        _store_tile(GradQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh, grad_q * sm_scale, offs_m, offs_d,
                    stride_dql, row_mask, d_mask)
    if NEED_GRAD_W:  # the distance feature is d / max_dist
        _store_gate_grads(GradW, batch, head, offs_m, row_mask, stride_gwb, stride_gwl, stride_gwh,
                          grad_bias, grad_dist * inv_max_dist, grad_elev_sin, grad_elev_cos,
                          grad_azim_sin, grad_azim_cos)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)
"""True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one kernel. heads_per_program applies to the small-L
    kernels (block_n then covers every key)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    heads_per_program: int = 1

    def launch_options(self) -> dict:
        # fp fusion (FMA contraction) stated explicitly: Triton's default for it is changing.
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)


@dataclass(frozen=True)
class LaunchConfigs:
    """The tiles of one call: small-L calls use `forward` and `backward_dq` (the single backward
    kernel); long ones all three."""

    small: bool
    forward: TileConfig
    backward_dkdv: TileConfig
    backward_dq: TileConfig


def heads_per_program(num_heads: int, most: int) -> int:
    """The largest divisor of num_heads that is at most `most`."""
    return max(g for g in range(1, most + 1) if num_heads % g == 0)


def launch_configs(seq_len: int, head_dim: int, num_heads: int) -> LaunchConfigs:
    """Tiles per problem size; fixed rather than autotuned so results are bitwise reproducible
    across processes too.

    Chosen from sm_90 compiles (Triton 3.9, bf16; registers and spills read from the cubins, see
    benchmarks/RESULTS.md): small scenes (L <= 128) hold all keys in one tile of next_pow2(L)
    columns and take 32-row query blocks with 8 warps (64-row blocks spill at 128 keys). The
    forward shares the pair geometry across 4 heads per program, except for 128-wide heads with
    more than 64 keys, where sharing spills; the backward, which shares nothing across heads,
    takes one head per program (more programs). Long scenes keep the 64-row side that Hopper's
    wgmma wants on every dot. The interpreter gets 32-row tiles and groups heads (4 forward, 2
    backward) so that CPU tests cover both.
    """
    block_keys = max(16, triton.next_power_of_2(seq_len))
    if seq_len <= SMALL_L_MAX:
        if INTERPRETED:
            fwd = TileConfig(min(32, block_keys), block_keys, 1, 1, heads_per_program(num_heads, 4))
            bwd = TileConfig(min(32, block_keys), block_keys, 1, 1, heads_per_program(num_heads, 2))
        else:
            share = 1 if head_dim > 64 and block_keys > 64 else 4
            fwd = TileConfig(min(32, block_keys), block_keys, 8, 1, heads_per_program(num_heads, share))
            bwd = TileConfig(min(32, block_keys), block_keys, 8, 1, 1)
        return LaunchConfigs(True, fwd, bwd, bwd)
    if INTERPRETED:
        tile = TileConfig(32, 32, 1, 1)
        return LaunchConfigs(False, tile, tile, tile)
    if head_dim <= 64:
        return LaunchConfigs(False, TileConfig(128, 64, 8, 3), TileConfig(32, 128, 8, 3), TileConfig(128, 32, 8, 2))
    # Dh 128: 64 keys per dK/dV program and 64 queries per dQ program (the M side of their dots)
    return LaunchConfigs(False, TileConfig(128, 32, 8, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 16, 8, 2))


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
    """(batch, row, head, item) strides of the gate weights: [B, L, H, 6] read in place for
    'cond'; the shared [H, 6] table for 'mul'."""
    if is_cond:
        return weights.stride(0), weights.stride(1), weights.stride(2), weights.stride(3)
    return 0, 0, weights.stride(0), weights.stride(1)


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------


def _launch_inverse_max_distance(centers: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    batch, seq_len, _ = centers.shape
    inv_max_dist = torch.empty(batch, device=centers.device, dtype=torch.float32)
    if batch:
        with _device_guard(centers):
            _inverse_max_distance_kernel[(batch,)](centers, lengths, inv_max_dist, seq_len, BLOCK=_MAX_DIST_BLOCK,
                                                   enable_fp_fusion=True)
    return inv_max_dist


def _launch_forward(q, k, v, centers, weights, lengths, inv_max_dist, is_cond: bool):
    """out [B, H, L, Dh] in q's dtype and the base-2 row log-sum-exp [B, H, L] fp32."""
    batch, num_heads, seq_len, head_dim = q.shape
    configs = launch_configs(seq_len, head_dim, num_heads)
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, seq_len, device=q.device, dtype=torch.float32)
    args = (q, k, v, centers, weights, lengths, inv_max_dist, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_weight_strides(weights, is_cond),
            num_heads, seq_len, head_dim, 1.4426950408889634 / math.sqrt(head_dim))
    flags = dict(IS_COND=is_cond, FAST_LOG2=_has_ptx_log2(q), DOT_PRECISION=_dot_precision(q.dtype),
                 BLOCK_D=_head_dim_block(head_dim))
    tile = configs.forward
    with _device_guard(q):
        if configs.small:
            grid = (triton.cdiv(seq_len, tile.block_m), batch, num_heads // tile.heads_per_program)
            _small_forward_kernel[grid](*args, **flags, HEADS_PER_PROGRAM=tile.heads_per_program,
                                        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **tile.launch_options())
        else:
            grid = (triton.cdiv(seq_len, tile.block_m), batch * num_heads)
            _forward_kernel[grid](*args, **flags, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                  **tile.launch_options())
    return out, lse


def _launch_backward(grad_out, q, k, v, out, lse, centers, weights, lengths, inv_max_dist, is_cond: bool,
                     need_grad_q: bool, need_grad_kv: bool, need_grad_weights: bool):
    """dQ, dK, dV (empty when not needed) and the gate-weight gradients in weights' layout."""
    batch, num_heads, seq_len, head_dim = q.shape
    configs = launch_configs(seq_len, head_dim, num_heads)
    grad_q = torch.empty_like(q) if need_grad_q else q.new_empty(0)
    grad_k = torch.empty_like(k) if need_grad_kv else k.new_empty(0)
    grad_v = torch.empty_like(v) if need_grad_kv else v.new_empty(0)
    # 'cond': straight into [B, L, H, 6]; 'mul': per-row fp32 partials, summed in a fixed order below
    grad_rows = torch.empty(batch, seq_len, num_heads, NUM_GATE_WEIGHTS, device=q.device,
                            dtype=weights.dtype if is_cond else torch.float32)
    # Pointers of unneeded outputs are never dereferenced; pass a live tensor of the right dtype.
    dq_arg = grad_q if need_grad_q else q
    dk_arg, dv_arg = (grad_k, grad_v) if need_grad_kv else (k, v)
    gw_strides = grad_rows.stride(0), grad_rows.stride(1), grad_rows.stride(2)
    qk_scale = 1.4426950408889634 / math.sqrt(head_dim)
    sm_scale = 1.0 / math.sqrt(head_dim)
    flags = dict(IS_COND=is_cond, FAST_LOG2=_has_ptx_log2(q), DOT_PRECISION=_dot_precision(q.dtype),
                 BLOCK_D=_head_dim_block(head_dim))
    with _device_guard(q):
        if configs.small:
            tile = configs.backward_dq
            _small_backward_kernel[(batch, num_heads // tile.heads_per_program)](
                q, k, v, out, grad_out, centers, weights, lengths, inv_max_dist, lse, dq_arg, dk_arg, dv_arg,
                grad_rows,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(grad_out),
                *_strides3(dq_arg), *_strides3(dk_arg), *_strides3(dv_arg), *_weight_strides(weights, is_cond),
                *gw_strides, num_heads, seq_len, head_dim, qk_scale, sm_scale, **flags,
                NEED_GRAD_Q=need_grad_q, NEED_GRAD_KV=need_grad_kv, NEED_GRAD_W=need_grad_weights,
                HEADS_PER_PROGRAM=tile.heads_per_program, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                **tile.launch_options(),
            )
        else:
            delta = torch.empty_like(lse)
            tile = configs.backward_dq
            _backward_preprocess_kernel[(triton.cdiv(seq_len, tile.block_m), batch * num_heads)](
                out, grad_out, delta, *_strides3(out), *_strides3(grad_out), num_heads, seq_len, head_dim,
                BLOCK_M=tile.block_m, BLOCK_D=flags["BLOCK_D"], enable_fp_fusion=True,
            )
            if need_grad_kv:
                tile = configs.backward_dkdv
                _backward_dkdv_kernel[(triton.cdiv(seq_len, tile.block_n), batch * num_heads)](
                    q, k, v, grad_out, centers, weights, lengths, inv_max_dist, lse, delta, grad_k, grad_v,
                    *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
                    *_strides3(grad_k), *_strides3(grad_v), *_weight_strides(weights, is_cond),
                    num_heads, seq_len, head_dim, qk_scale, sm_scale, **flags,
                    BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **tile.launch_options(),
                )
            if need_grad_q or need_grad_weights:
                tile = configs.backward_dq
                _backward_dq_kernel[(triton.cdiv(seq_len, tile.block_m), batch * num_heads)](
                    q, k, v, grad_out, centers, weights, lengths, inv_max_dist, lse, delta, dq_arg, grad_rows,
                    *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(dq_arg),
                    *_weight_strides(weights, is_cond), *gw_strides,
                    num_heads, seq_len, head_dim, qk_scale, sm_scale, **flags,
                    NEED_GRAD_Q=need_grad_q, NEED_GRAD_W=need_grad_weights,
                    BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **tile.launch_options(),
                )
    if not need_grad_weights:
        grad_weights = weights.new_empty(0)
    elif is_cond:
        grad_weights = grad_rows
    else:
        grad_weights = grad_rows.sum(dim=(0, 1)).to(weights.dtype)
    return grad_q, grad_k, grad_v, grad_weights


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsegps::inverse_max_pair_distance", mutates_args=())
def _inverse_max_pair_distance_op(centers: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    return _launch_inverse_max_distance(centers, key_lengths)


@_inverse_max_pair_distance_op.register_fake
def _(centers, key_lengths):
    return centers.new_empty(centers.shape[0], dtype=torch.float32)


@torch.library.custom_op("sparsegps::spatial_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centers: torch.Tensor, weights: torch.Tensor,
                key_lengths: torch.Tensor, inv_max_dist: torch.Tensor,
                is_cond: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, centers, weights, key_lengths, inv_max_dist, is_cond)


@_forward_op.register_fake
def _(q, k, v, centers, weights, key_lengths, inv_max_dist, is_cond):
    batch, heads, seq_len, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("sparsegps::spatial_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, centers: torch.Tensor, weights: torch.Tensor, key_lengths: torch.Tensor,
                 inv_max_dist: torch.Tensor, is_cond: bool, need_grad_q: bool, need_grad_kv: bool,
                 need_grad_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(_row_major_last(grad_out), q, k, v, out, lse, centers, weights, key_lengths,
                            inv_max_dist, is_cond, need_grad_q, need_grad_kv, need_grad_weights)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, centers, weights, key_lengths, inv_max_dist, is_cond, need_grad_q,
      need_grad_kv, need_grad_weights):
    return (torch.empty_like(q) if need_grad_q else q.new_empty(0),
            torch.empty_like(k) if need_grad_kv else k.new_empty(0),
            torch.empty_like(v) if need_grad_kv else v.new_empty(0),
            weights.new_empty(weights.shape) if need_grad_weights else weights.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, centers, weights, key_lengths, inv_max_dist, is_cond = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, centers, weights, key_lengths, inv_max_dist)
    ctx.is_cond = is_cond


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, centers, weights, key_lengths, inv_max_dist = ctx.saved_tensors
    need_q, need_k, need_v, _, need_w = ctx.needs_input_grad[:5]
    grad_q, grad_k, grad_v, grad_w = _backward_op(grad_out, q, k, v, out, lse, centers, weights, key_lengths,
                                                  inv_max_dist, ctx.is_cond, need_q, need_k or need_v, need_w)
    return (grad_q if need_q else None, grad_k if need_k else None, grad_v if need_v else None, None,
            grad_w if need_w else None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the spatial attention kernels run on CUDA tensors (got {t.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing sparsegps.kernels")


def inverse_max_pair_distance(centers: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    """1 / max pair distance per scene, fp32 [B] (one launch); see
    `sparsegps.models.spatial_attention.inverse_max_pair_distance`."""
    if centers.dim() != 3 or centers.shape[-1] != 3:
        raise ValueError(f"centers must be [B, L, 3], got {tuple(centers.shape)}")
    if key_lengths.shape != centers.shape[:1] or key_lengths.dtype.is_floating_point:
        raise ValueError(f"key_lengths must be an integer tensor [B] = [{centers.shape[0]}], "
                         f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")
    _check_runnable(centers)
    centers = centers.detach().to(dtype=torch.float32).contiguous()
    return _inverse_max_pair_distance_op(centers, key_lengths.to(centers.device))


def spatial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centers: torch.Tensor,
    weights: torch.Tensor,
    key_lengths: torch.Tensor,
    mode: str = "cond",
    inv_max_dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused pairwise spatial attention; same arguments and result as
    `sparsegps.models.spatial_attention.reference_spatial_attention`.

    q, k, v: [B, H, L, Dh] fp32/fp16/bf16 with Dh <= 128; centers [B, L, 3]; weights [B, L, H, 6]
    ('cond') or [H, 6] ('mul'); key_lengths [B]; inv_max_dist [B] from `inverse_max_pair_distance`
    (computed here when None). Differentiable in q, k, v and weights.
    """
    check_attention_inputs(q, k, v, centers, weights, key_lengths, mode, inv_max_dist)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must be fp32, fp16 or bf16, got {q.dtype}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds the kernel's maximum of {KERNEL_MAX_HEAD_DIM}")
    _check_runnable(q)
    if q.shape[1] * q.shape[0] > 65535:
        raise ValueError(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the launch grid limit 65535")
    if q.numel() == 0:  # no scenes, objects or channels: nothing to launch; q * 0 keeps the graph
        return q * 0
    centers = centers.detach().to(device=q.device, dtype=torch.float32).contiguous()
    key_lengths = key_lengths.to(q.device)
    if inv_max_dist is None:
        inv_max_dist = _inverse_max_pair_distance_op(centers, key_lengths)
    inv_max_dist = inv_max_dist.detach().to(device=q.device, dtype=torch.float32)
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    out, _ = _forward_op(_row_major_last(q), _row_major_last(k), _row_major_last(v), centers, weights,
                         key_lengths, inv_max_dist, mode == "cond")
    return out
