"""Distribution-Guided Calibration (DGC): which of the 2N raw CFG calibration sequences to keep.

The raw calibration set holds N class labels generated with classifier-free guidance, i.e. N conditional
and N unconditional sequences. DGC keeps N of the 2N. Each sequence is summarised by one feature vector:
the FP model's last-block output at token 0, shape [2N, C].

Modes of `dgc_select`:
    "entropy"  (default) keep the N rows with the largest Gaussian self-information ½·d_M², d_M measured
               against the pooled distribution of all 2N rows with a Ledoit–Wolf shrinkage covariance
               (well conditioned when 2N <= C). A per-sample selection; the cond fraction is reported.
    "official" the released code: per-branch pseudo-inverse Mahalanobis distances in float32 decide a
               cond ratio, then the first rows of each half of every collection chunk are kept.
               Degenerate for n <= C (all distances (n-1)/sqrt(n)): expect pct 0.5 or 1.0.
    "topk"     the official per-branch distances, but keeping the N largest rows themselves.
`pct=` overrides the ratio: keep round(pct·chunk) cond and chunk − round(pct·chunk) uncond rows per chunk.

Collection layout: rows come in consecutive chunks of 2·chunk rows, each with `chunk` conditional and
`chunk` unconditional rows (`is_cond` says which). VAR/PAR collect [cond 32, uncond 32] × 4 (chunk 32),
RAR/MAR one chunk [cond 128, uncond 128] (chunk None = N).
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger("quant.dgc")

MODES = ("entropy", "official", "topk")
# the released code's torch.allclose tolerance for "both branches carry the same information"
OFFICIAL_ATOL = 1e-3


@dataclass
class DGCResult:
    indices: torch.Tensor            # LongTensor [N], sorted rows of the 2N raw set to keep
    pct_cond: float                  # fraction of kept rows that are conditional (as realised)
    distances_cond: torch.Tensor     # [N] distance of each conditional row, in row order
    distances_uncond: torch.Tensor   # [N] distance of each unconditional row, in row order
    mode: str                        # "entropy", "official", "topk" or "pct_override"
    pct_decided: Optional[float] = None   # ratio modes: the cond ratio before per-chunk rounding


def cfg_chunk_mask(num_rows: int, chunk: Optional[int] = None) -> torch.Tensor:
    """is_cond mask of the collection layout [cond chunk, uncond chunk] repeated (chunk None: one chunk)."""
    if num_rows <= 0 or num_rows % 2:
        raise ValueError(f"num_rows must be a positive even number (N cond + N uncond), got {num_rows}")
    chunk = num_rows // 2 if chunk is None else chunk
    if chunk <= 0 or num_rows % (2 * chunk):
        raise ValueError(f"{num_rows} rows do not split into chunks of {chunk} cond + {chunk} uncond rows")
    return (torch.arange(num_rows) % (2 * chunk)) < chunk


# ----------------------------------------------------------------------------------------------
# distances

def official_mahalanobis(features: torch.Tensor) -> torch.Tensor:
    """The released code's distances, float32: d_j = sqrt((f_j − μ)ᵀ Σ⁺ (f_j − μ)).

    Σ = X_cᵀX_c/(n−1) (unbiased), Σ⁺ = torch.linalg.pinv(Σ) with its default tolerance. For n <= C and
    generic data every d_j equals (n−1)/sqrt(n): the hat matrix of centred data has diagonal 1 − 1/n.
    """
    x = features.float()
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    quadratic = ((centred @ torch.linalg.pinv(cov)) * centred).sum(dim=1)
    return quadratic.sqrt()


def _centred64(features: torch.Tensor) -> torch.Tensor:
    x = features.detach().to(torch.float64)
    return x - x.mean(dim=0)


def _ledoit_wolf_intensity(centred: torch.Tensor):
    """(ρ, μ) of Ledoit & Wolf (2004) for centred data [n, C], sample covariance S = XᵀX/n.

    Target μ·I with μ = tr(S)/C. With ‖·‖ the Frobenius norm scaled by 1/C:
        δ² = ‖S − μI‖²                       (how far S is from the target)
        β̄² = (1/n²) Σ_k ‖x_k x_kᵀ − S‖²      (how noisy S is)   = (Σ_k ‖x_k‖⁴ / n − ‖S‖²_F) / (n·C)
        ρ  = min(β̄², δ²) / δ²               (ρ = 1 when δ² = 0: S already is a multiple of I)
    Everything comes from the n×n Gram matrix (same non-zero spectrum as S), so no C×C matrix is needed.
    """
    n, channels = centred.shape
    gram = centred @ centred.T / n
    mu = gram.trace() / channels
    s_frob2 = (gram * gram).sum()
    delta2 = s_frob2 / channels - mu * mu
    row_norm4 = (n * gram.diagonal()).square().sum()
    beta_bar2 = (row_norm4 / n - s_frob2) / (n * channels)
    if delta2 <= 0:
        return torch.ones((), dtype=centred.dtype, device=centred.device), mu
    return (torch.minimum(beta_bar2.clamp_min(0), delta2) / delta2), mu


def ledoit_wolf_covariance(features: torch.Tensor):
    """Ledoit–Wolf shrinkage covariance (1 − ρ)·S + ρ·μ·I, float64, and ρ.

    Positive definite whenever ρ > 0 and the rows are not all identical, in particular for n < C where S
    itself is singular. Materialises a C×C matrix; `shrinkage_mahalanobis` does not need to.
    """
    centred = _centred64(features)
    n, channels = centred.shape
    rho, mu = _ledoit_wolf_intensity(centred)
    sample_cov = centred.T @ centred / n
    eye = torch.eye(channels, dtype=centred.dtype, device=centred.device)
    return (1 - rho) * sample_cov + rho * mu * eye, rho.item()


def shrinkage_mahalanobis(features: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every row to the rows' mean under the Ledoit–Wolf covariance, float64.

    Rows lie in the span of the centred data X_c = U·diag(σ)·Vᵀ, where the shrunk covariance has
    eigenvalues (1 − ρ)·σ_i²/n + ρ·μ, so d_j² = Σ_i (U_ji σ_i)² / ((1 − ρ)·σ_i²/n + ρ·μ): exact, cheap
    (thin SVD of [n, C]) and robust. All-identical rows have zero distance.
    """
    centred = _centred64(features)
    n = centred.shape[0]
    rho, mu = _ledoit_wolf_intensity(centred)
    u, sigma, _ = torch.linalg.svd(centred, full_matrices=False)
    variance = (1 - rho) * sigma.square() / n + rho * mu
    coords2 = (u * sigma).square()
    quadratic = torch.where(variance > 0, coords2 / variance.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.zeros_like(coords2)).sum(dim=1)
    return quadratic.sqrt()


# ----------------------------------------------------------------------------------------------
# selection

def select_by_ratio(is_cond: torch.Tensor, chunk: int, pct: float) -> torch.Tensor:
    """First round(pct·chunk) cond rows and first chunk − round(pct·chunk) uncond rows of every chunk.

    `round` is Python's (half to even), as in the released code. Returns sorted row indices.
    """
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"pct is the fraction of conditional rows to keep and must lie in [0, 1], got {pct}")
    num_cond = round(pct * chunk)
    num_uncond = chunk - num_cond
    blocks = is_cond.view(-1, 2 * chunk)
    rank_cond = blocks.cumsum(dim=1) - 1            # position of each cond row among its chunk's cond rows
    rank_uncond = (~blocks).cumsum(dim=1) - 1
    keep = (blocks & (rank_cond < num_cond)) | (~blocks & (rank_uncond < num_uncond))
    return keep.flatten().nonzero().squeeze(1)


def _check_inputs(features: torch.Tensor, is_cond, chunk: Optional[int]):
    if features.dim() != 2:
        raise ValueError(f"features must be [2N, C] (one vector per sequence, e.g. the last block's "
                         f"output at token 0: hidden[:, 0]), got shape {tuple(features.shape)}")
    rows = features.shape[0]
    is_cond = torch.as_tensor(is_cond, device="cpu")
    if is_cond.dtype != torch.bool or is_cond.shape != (rows,):
        raise ValueError(f"is_cond must be a bool mask with one entry per feature row ({rows}), got "
                         f"{is_cond.dtype} of shape {tuple(is_cond.shape)}")
    if rows == 0 or rows % 2:
        raise ValueError(f"DGC needs 2N rows (N cond + N uncond), got an odd or empty count: {rows}")
    n = rows // 2
    num_cond = int(is_cond.sum())
    if num_cond != n:
        raise ValueError(f"DGC needs as many cond as uncond rows; is_cond marks {num_cond} of {rows} rows")
    chunk = n if chunk is None else chunk
    if chunk <= 0 or rows % (2 * chunk):
        raise ValueError(f"{rows} rows do not split into collection chunks of {chunk} cond + {chunk} uncond "
                         f"rows; pass the chunk size used at collection (or None for a single chunk)")
    cond_per_chunk = is_cond.view(-1, 2 * chunk).sum(dim=1)
    if (cond_per_chunk != chunk).any():
        raise ValueError(f"every collection chunk of {2 * chunk} rows must hold {chunk} cond rows; counts "
                         f"per chunk are {cond_per_chunk.tolist()} (is_cond does not match chunk={chunk})")
    return is_cond, n, chunk


def dgc_select(features: torch.Tensor, is_cond, *, mode: str = "entropy", chunk: Optional[int] = None,
               pct: Optional[float] = None, pooled: bool = True) -> DGCResult:
    """Choose N of the 2N raw calibration rows.

    features: [2N, C] token-0 features of the FP model's last block, one row per raw sequence.
    is_cond:  bool [2N], True for conditional rows (N of them).
    mode:     "entropy" | "official" | "topk" (module docstring).
    chunk:    cond (= uncond) rows per collection chunk, used by the ratio selection; None = N.
    pct:      if given, keep this cond fraction by the ratio rule (first rows of each half per chunk)
              instead of deciding it from the distances; the mode's distances are still reported.
    pooled:   "entropy" only. True (default): one Gaussian fitted to all 2N rows, so self-information
              ½·d² + const has the same constant for every row and ranking by d is ranking by
              self-information. False: a Gaussian per branch, like the released code; a branch of
              near-identical rows then looks as spread as any other (Mahalanobis is scale-free).

    Why Ledoit–Wolf rather than a PCA rank cutoff: with 2N <= C the sample covariance is singular and
    its pseudo-inverse gives every row the same distance; a rank cutoff fixes that only through an
    arbitrary rank. Ledoit–Wolf shrinks towards μ·I with a closed-form, data-driven intensity,
    is always positive definite for non-constant data and damps the noisy low-variance directions, so
    rows that are far out along well-estimated directions (outliers) rank first.
    """
    if mode not in MODES:
        raise ValueError(f"unknown DGC mode '{mode}'; choose one of {MODES}")
    is_cond, n, chunk = _check_inputs(features, is_cond, chunk)
    cond_rows, uncond_rows = is_cond.nonzero().squeeze(1), (~is_cond).nonzero().squeeze(1)
    features = features.detach()

    if mode == "entropy" and pooled:
        distances = shrinkage_mahalanobis(features).cpu()
        d_cond, d_uncond = distances[cond_rows], distances[uncond_rows]
    else:
        measure = shrinkage_mahalanobis if mode == "entropy" else official_mahalanobis
        d_cond = measure(features[cond_rows.to(features.device)]).cpu()
        d_uncond = measure(features[uncond_rows.to(features.device)]).cpu()

    if pct is not None:
        indices, label = select_by_ratio(is_cond, chunk, pct), "pct_override"
    elif mode == "official":
        if torch.allclose(d_cond, d_uncond, atol=OFFICIAL_ATOL):
            pct = 0.5
            logger.info("DGC official: cond and uncond distances agree within atol %g -> pct 0.5",
                        OFFICIAL_ATOL)
        else:
            top = torch.topk(torch.cat([d_cond, d_uncond]), n).indices
            pct = (top < n).sum().item() / n
        indices, label = select_by_ratio(is_cond, chunk, pct), "official"
    else:
        distances = torch.empty(2 * n, dtype=d_cond.dtype)
        distances[cond_rows], distances[uncond_rows] = d_cond, d_uncond
        # stable sort: ties (e.g. the degenerate constant distances) keep the earlier row
        order = torch.sort(distances.nan_to_num(0.0), descending=True, stable=True).indices[:n]
        indices, label = order.sort().values, mode

    pct_cond = is_cond[indices].float().mean().item()
    if label != mode or mode == "official":
        logger.info("DGC %s: pct %.4f -> %d cond + %d uncond rows per chunk of %d", label, pct,
                    round(pct * chunk), chunk - round(pct * chunk), chunk)
    logger.info("DGC %s: kept %d of %d rows, cond fraction %.4f (%d cond, %d uncond); distances cond "
                "mean %.4g std %.4g, uncond mean %.4g std %.4g", label, n, 2 * n, pct_cond,
                int(is_cond[indices].sum()), n - int(is_cond[indices].sum()), d_cond.mean(),
                d_cond.std(), d_uncond.mean(), d_uncond.std())
    logger.info("DGC %s selected rows: %s", label, indices.tolist())
    return DGCResult(indices=indices, pct_cond=pct_cond, distances_cond=d_cond,
                     distances_uncond=d_uncond, mode=label, pct_decided=pct)
