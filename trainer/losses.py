"""Training losses as pure tensor-in, tensor-out functions.

Time convention (REPA's, `sihyun-yu/REPA:loss.py`): t = 0 is data and t = 1 is noise. The linear
interpolant is

    x_t = alpha_t x + sigma_t eps,    alpha_t = 1 - t,  sigma_t = t,                      (1)

and the model regresses the velocity

    v = d/dt x_t = alpha'_t x + sigma'_t eps = eps - x.                                      (2)

The full U-REPA objective (recipe, "Alignment") is

    L = L_v + lam * (L_align + w * L_manifold),    lam = 0.5,  w = 3,                         (3)
    L_v        = mean over all elements of (v_pred - v)^2,                                    (4)
    L_align    = - mean_{b, n} cos(s_bn, t_bn),                                               (5)
    L_manifold = mean_{b, i, j} (cos(s_bi, s_bj) - cos(t_bi, t_bj))^2,                        (6)

with student (projected) tokens s and teacher tokens t of shape (B, N, D). The cross-sample
variant of (6) swaps the roles of batch and token axes: for each token position n it compares the
B x B cosine matrices across the batch, mean over (N, B, B); it is (6) applied to s and t
transposed to (N, B, D).

Cosines use F.normalize's convention with `EPS` = 1e-8: x_hat = x / max(||x||, EPS), so a
zero token has x_hat = 0 and cosine 0 with everything (no NaN in value or gradient).

Precision: losses are computed in float32 for half-precision inputs (bf16, fp16) and in float64
for float64 inputs ("at least float32").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

EPS = 1e-8


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalize(x: Tensor) -> Tensor:
    """x / max(||x||, EPS) over the last dimension."""
    return F.normalize(x, dim=-1, eps=EPS)


def interpolant(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Equation (1)'s coefficients and their time derivatives: (alpha, sigma, d_alpha, d_sigma).

    alpha = 1 - t, sigma = t, d_alpha = -1, d_sigma = 1, each with t's shape and dtype.
    """
    one = torch.ones_like(t)
    return 1 - t, t, -one, one


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """t of shape (B,) (or a scalar) reshaped to broadcast over x's non-batch dimensions."""
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Equation (1): x_t = alpha_t x + sigma_t eps, with t of shape (B,) or a scalar."""
    alpha, sigma, _, _ = interpolant(_per_sample(t, x))
    return alpha * x + sigma * eps


def velocity_target(x: Tensor, eps: Tensor) -> Tensor:
    """Equation (2): v = d_alpha x + d_sigma eps = eps - x (independent of t for the linear path)."""
    return eps - x


def velocity_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Equation (4): MSE averaged over all elements, in at least float32."""
    return F.mse_loss(_at_least_float32(pred), _at_least_float32(target))


def alignment_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Equation (5), REPA's token loss: minus the mean over (B, N) of cos(student_bn, teacher_bn).

    Inputs (B, N, D); computed in at least float32. Plain autograd; the trainer uses the fused
    `urepa_alignment`.
    """
    s, t = _normalize(_at_least_float32(student)), _normalize(_at_least_float32(teacher))
    return -(s * t).sum(-1).mean()


def manifold_loss(student: Tensor, teacher: Tensor, *, cross_sample: bool = False) -> Tensor:
    """Equation (6): mean over (B, N, N) of the squared difference of per-image token cosine matrices.

    With `cross_sample=True` the matrices are B x B, across the batch for each token position
    (equation (6) on inputs transposed to (N, B, D)). Plain autograd: holds both matrices; the
    trainer uses the fused `urepa_alignment`.
    """
    s, t = _normalize(_at_least_float32(student)), _normalize(_at_least_float32(teacher))
    if cross_sample:
        s, t = s.transpose(0, 1), t.transpose(0, 1)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).square().mean()


def _cosine_difference(s_hat: Tensor, t_hat: Tensor) -> Tensor:
    """D = s_hat s_hat^T - t_hat t_hat^T, built in one (B, N, N) buffer."""
    d = torch.bmm(s_hat, s_hat.transpose(1, 2))
    return d.baddbmm_(t_hat, t_hat.transpose(1, 2), alpha=-1)


class _URepaAlignment(torch.autograd.Function):
    """Equations (5) and (6) with one shared normalisation and one B x N x N matrix at a time.

    Forward: D = s_hat s_hat^T - t_hat t_hat^T, built in place in one buffer (bmm, then baddbmm_).
    Backward recomputes D from the saved normalised tensors (D is not saved) and uses, with
    M = B N^2 and D symmetric,

        dL/ds_hat = -g_align t_hat / (B N) + g_manifold (4 / M) D s_hat,
        dL/ds     = (dL/ds_hat - s_hat <dL/ds_hat, s_hat>) / ||s||    where ||s|| >  EPS,
                    dL/ds_hat / EPS                                  where ||s|| <= EPS,

    the second line being the derivative of s / max(||s||, EPS) exactly as autograd takes it for
    F.normalize (clamp_min passes no gradient at the boundary). The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        with torch.autocast(student.device.type, enabled=False):
            s = student.to(dtype)
            norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
            s_hat = s / norm.clamp_min(EPS)
            t_hat = _normalize(teacher.to(dtype))
            loss_align = -(s_hat * t_hat).sum(-1).mean()
            flat = _cosine_difference(s_hat, t_hat).view(-1)
            loss_manifold = torch.dot(flat, flat) / flat.numel()
        ctx.save_for_backward(s_hat, t_hat, norm)
        ctx.student_dtype = student.dtype
        return loss_align, loss_manifold

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_align: Tensor, g_manifold: Tensor) -> tuple[Tensor, None]:
        s_hat, t_hat, norm = ctx.saved_tensors
        b, n, _ = s_hat.shape
        with torch.autocast(s_hat.device.type, enabled=False):
            d = _cosine_difference(s_hat, t_hat)
            d.mul_(g_manifold.to(d.dtype) * (4.0 / (b * n * n)))
            g = torch.baddbmm(t_hat * (g_align.to(d.dtype) * (-1.0 / (b * n))), d, s_hat)
            del d
            inside = norm > EPS
            radial = torch.where(inside, (g * s_hat).sum(-1, keepdim=True), 0.0)
            grad = (g - s_hat * radial) / norm.clamp_min(EPS)
        return grad.to(ctx.student_dtype), None


def urepa_alignment(student: Tensor, teacher: Tensor, *, cross_sample: bool = False) -> tuple[Tensor, Tensor]:
    """Fused equations (5) and (6): (loss_align, loss_manifold) for student, teacher of shape (B, N, D).

    Same values as `alignment_loss` and `manifold_loss`, computed in at least float32 with autocast
    disabled inside (scalars in float32 for half-precision inputs); the student's gradient comes
    back in its own dtype. Forward and backward hold at most one B x N x N matrix (N x B x B with
    `cross_sample=True`), and only the normalised inputs and the student norms are saved. The
    teacher is cached, fixed features: one that requires grad is rejected (ValueError) rather
    than silently left without a gradient.
    """
    if teacher.requires_grad:
        raise ValueError("urepa_alignment: the teacher must not require grad (detach it)")
    if student.ndim != 3 or student.shape != teacher.shape:
        raise ValueError(f"urepa_alignment: need matching (B, N, D) inputs, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if cross_sample:
        student, teacher = student.transpose(0, 1), teacher.transpose(0, 1)
    return _URepaAlignment.apply(student, teacher)


def total_loss(loss_v: Tensor, loss_align: Tensor, loss_manifold: Tensor, *, lam: float = 0.5,
               w: float = 3.0) -> Tensor:
    """Equation (3): L = L_v + lam * (L_align + w * L_manifold)."""
    return loss_v + lam * (loss_align + w * loss_manifold)
