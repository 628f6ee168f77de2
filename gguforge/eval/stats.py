"""The statistics of llama-perplexity's KL-divergence mode, computed as it computes them.

Everything here follows llama.cpp tools/perplexity/perplexity.cpp (the pinned tree), function by
function, in the same float32 / float64 arithmetic so that the printed figures agree to their precision:

- base side, `log_softmax(n_vocab, logits, uint16_t * log_prob, tok)`: per scored token the base
  log-probabilities are kept as uint16 codes over [min_logit, max_logit] with
  min_logit = max(min, max - 16), scale = (max - min_logit) / 65535 and the offset
  min_log_prob = min_logit - max - log(sum exp); code = nearest_int((logit - min_logit) / scale) for
  logits above min_logit, else 0. A code decodes as scale * code + min_log_prob (float32).
- candidate side, `log_softmax(n_vocab, logits, const uint16_t * base_log_prob, tok, kld)`: the KL
  sum runs only over vocabulary entries whose decoded base log-prob is > -16; nll, nll_base, Δp and
  "same top" per token; sums accumulated in double as `kl_divergence_result`.
- `kl_divergence`: `mean_and_uncertainty`, `covariance`, the `percentile` lambda (linear interpolation
  in float32 on the sorted values) and the median of the sorted values.

Only what the candidate side reads is kept (`BaseRecord`): the (index, code) pairs whose decoded value
passes the -16 cut-off, the target token's code, and the two floats. Nothing else of the base is ever
read by llama-perplexity's KLD pass, so nothing else is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
CUTOFF = F32(-16.0)  # `if (p_log_base > -16.f)` in log_softmax(..., const uint16_t *, ...)
SPAN = F32(16.0)  # min_logit = std::max(min_logit, max_logit - 16)
LEVELS = F32(65535.0)


def expf(x: np.ndarray) -> np.ndarray:
    """C's expf on float32 values: exp in float64 rounded once to float32 (glibc's expf is correctly
    rounded, numpy's float32 exp may differ in the last bit)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(F32)


def _max_and_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: float32 max and float32 log(sum expf(l - max)) with the sum in double."""
    mx = logits.max(axis=1)
    sum_exp = np.empty(len(logits), dtype=np.float64)
    for a in range(0, len(logits), 32):  # row blocks: float64 temporaries stay small for a 152k vocabulary
        b = a + 32
        sum_exp[a:b] = expf(logits[a:b] - mx[a:b, None]).astype(np.float64).sum(axis=1)
    return mx, np.log(sum_exp).astype(F32)


@dataclass
class BaseRecord:
    """The base side of one chunk: per scored token what the KLD pass reads (CSR layout)."""

    scale: np.ndarray  # float32 [n]
    min_log_prob: np.ndarray  # float32 [n]
    q_target: np.ndarray  # uint16 [n]: code of the next (actual) token
    offsets: np.ndarray  # int64 [n + 1]: entries of token t are idx[offsets[t]:offsets[t+1]]
    idx: np.ndarray  # int32: vocabulary indices whose decoded base log-prob > -16, ascending
    q: np.ndarray  # uint16: their codes
    n_vocab: int = 0

    @property
    def n(self) -> int:
        return len(self.scale)


def encode_base(logits: np.ndarray, targets: np.ndarray) -> BaseRecord:
    """llama-perplexity's uint16 base log-probs (log_softmax with uint16_t *) of logits [n, n_vocab]
    (float32), reduced to what the KLD pass reads."""
    logits = np.ascontiguousarray(logits, dtype=F32)
    n = logits.shape[0]
    mx, lse = _max_and_lse(logits)
    mn = np.maximum(logits.min(axis=1), mx - SPAN)
    min_log_prob = ((mn - mx) - lse).astype(F32)
    scale = ((mx - mn) / LEVELS).astype(F32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    idx_parts, q_parts = [], []
    q_target = np.zeros(n, dtype=np.uint16)
    for t in range(n):
        row = logits[t]
        if scale[t]:
            inv = F32(1) / scale[t]
            # nearest_int: round half to even (the 1.5 * 2^23 trick) of the float32 product
            codes = np.rint(inv * (row - mn[t])).astype(np.int64)
            codes = np.where(row > mn[t], codes, 0).astype(np.uint16)
        else:
            codes = np.zeros(row.shape[0], dtype=np.uint16)
        q_target[t] = codes[targets[t]]
        decoded = scale[t] * codes.astype(F32) + min_log_prob[t]
        keep = np.flatnonzero(decoded > CUTOFF)
        idx_parts.append(keep.astype(np.int32))
        q_parts.append(codes[keep])
        offsets[t + 1] = offsets[t] + len(keep)
    return BaseRecord(scale, min_log_prob, q_target, offsets,
                      np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int32),
                      np.concatenate(q_parts) if q_parts else np.zeros(0, np.uint16), logits.shape[1])


@dataclass
class KldSums:
    """kl_divergence_result: running sums in double, plus the per-token KLD and Δp values (float)."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    def add_chunk(self, logits: np.ndarray, targets: np.ndarray, base: BaseRecord) -> None:
        """The candidate's logits [n, n_vocab] of one chunk's scored positions against the base."""
        logits = np.ascontiguousarray(logits, dtype=F32)
        mx, lse = _max_and_lse(logits)
        imax = logits.argmax(axis=1)  # first maximum, as the strict > scan
        rows = np.arange(len(targets))
        nll = ((mx + lse) - logits[rows, targets]).astype(F32)
        nll_base = -(base.scale * base.q_target.astype(F32) + base.min_log_prob).astype(F32)
        top = (mx + lse).astype(F32)  # max_logit += log_sum_exp
        kld = np.empty(len(targets), dtype=np.float64)
        same = 0
        for t in range(len(targets)):
            a, b = base.offsets[t], base.offsets[t + 1]
            idx = base.idx[a:b]
            p_log_base = base.scale[t] * base.q[a:b].astype(F32) + base.min_log_prob[t]
            p_base = expf(p_log_base)
            terms = p_base * ((p_log_base - logits[t, idx]) + top[t])
            kld[t] = terms.astype(np.float64).sum()
            # imax_base: the first index of the largest decoded value; entries left out are <= -16,
            # below the top one, so the kept ones decide.
            same += int(len(idx) > 0 and idx[int(np.argmax(p_log_base))] == imax[t])
        p_diff = (expf(-nll) - expf(-nll_base)).astype(F32)
        p_diff2 = (p_diff * p_diff).astype(np.float64)
        nll64, nllb64 = nll.astype(np.float64), nll_base.astype(np.float64)
        self.sum_nll += float(nll64.sum())
        self.sum_nll2 += float((nll * nll).astype(np.float64).sum())
        self.sum_nll_base += float(nllb64.sum())
        self.sum_nll_base2 += float((nll_base * nll_base).astype(np.float64).sum())
        self.sum_nll_nll_base += float((nll * nll_base).astype(np.float64).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_p_diff += float(p_diff.astype(np.float64).sum())
        self.sum_p_diff2 += float(p_diff2.sum())
        self.sum_p_diff4 += float((p_diff2 * p_diff2).sum())
        self.n_same_top += same
        self.count += len(targets)
        self.kld_values.append(kld.astype(F32))
        self.p_diff_values.append(p_diff)


def mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    """perplexity.cpp kl_divergence: the `mean_and_uncertainty` lambda."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def covariance(sa: float, sb: float, sab: float, count: int) -> float:
    """perplexity.cpp kl_divergence: the `covariance` lambda."""
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp kl_divergence: the `percentile` lambda, in float32 on sorted values."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = F32(F32(fraction) * F32(len(values) - 1))
    ip = int(p)
    p = F32(p - F32(ip))
    hi = values[min(ip + 1, len(values) - 1)]
    return float(F32(F32(F32(1) - p) * values[ip]) + F32(p * hi))


def median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2 == 0:
        return float(F32(0.5) * F32(values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


MIN_COUNT = 100  # `if (kld.count < 100) return;`: no statistics on fewer tokens

KLD_PERCENTILES = (("kld_p99_9", 0.999), ("kld_p99", 0.990), ("kld_p95", 0.950), ("kld_p90", 0.900),
                   ("kld_p10", 0.100), ("kld_p5", 0.050), ("kld_p1", 0.010), ("kld_p0_1", 0.001))
DP_PERCENTILES = (("dp_p99_9", 0.999), ("dp_p99", 0.990), ("dp_p95", 0.950), ("dp_p90", 0.900),
                  ("dp_p75", 0.750), ("dp_p25", 0.250), ("dp_p10", 0.100), ("dp_p5", 0.050),
                  ("dp_p1", 0.010), ("dp_p0_1", 0.001))


def _sqrt(x: float) -> float:
    """C's sqrt: NaN for a negative argument (llama-perplexity prints it as it comes)."""
    return math.sqrt(x) if x >= 0 else float("nan")


def summarize(k: KldSums) -> dict[str, float]:
    """The final statistics of kl_divergence(), as numbers (Δp and same-top in percent, as printed)."""
    n = k.count
    log_ppl, log_ppl_err = mean_and_uncertainty(k.sum_nll, k.sum_nll2, n)
    log_base, log_base_err = mean_and_uncertainty(k.sum_nll_base, k.sum_nll_base2, n)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    cov = covariance(k.sum_nll, k.sum_nll_base, k.sum_nll_nll_base, n)
    denom = log_ppl_err * log_base_err
    ratio = log_ppl - log_base
    ratio_err = _sqrt(log_ppl_err ** 2 + log_base_err ** 2 - 2.0 * cov)
    ppl_err, ppl_base_err = ppl * log_ppl_err, ppl_base * log_base_err
    ppl_cov = ppl * ppl_base * cov
    kld, kld_err = mean_and_uncertainty(k.sum_kld, k.sum_kld2, n)
    kv = np.sort(np.concatenate(k.kld_values)) if k.kld_values else np.zeros(0, F32)
    dv = np.sort(np.concatenate(k.p_diff_values)) if k.p_diff_values else np.zeros(0, F32)
    dp, dp_err = mean_and_uncertainty(k.sum_p_diff, k.sum_p_diff2, n)
    mse, mse_err = mean_and_uncertainty(k.sum_p_diff2, k.sum_p_diff4, n)
    rms = math.sqrt(mse)
    same = k.n_same_top / n if n else 0.0
    out = {
        "n_tokens": n,
        "ppl_q": ppl, "ppl_q_err": ppl_err,
        "ppl_base": ppl_base, "ppl_base_err": ppl_base_err,
        "cor_ln_ppl": 100.0 * cov / denom if denom else float("nan"),
        "ln_ppl_ratio": ratio, "ln_ppl_ratio_err": ratio_err,
        "ppl_ratio": math.exp(ratio), "ppl_ratio_err": math.exp(ratio) * ratio_err,
        "ppl_diff": ppl - ppl_base,
        "ppl_diff_err": _sqrt(ppl_err ** 2 + ppl_base_err ** 2 - 2.0 * ppl_cov),
        "kld_mean": kld, "kld_mean_err": kld_err,
    }
    if n:
        out["kld_max"] = float(kv[-1])
        out.update({name: percentile(kv, f) for name, f in KLD_PERCENTILES[:4]})
        out["kld_median"] = median(kv)
        out.update({name: percentile(kv, f) for name, f in KLD_PERCENTILES[4:]})
        out["kld_min"] = float(kv[0])
    out.update({"dp_mean": 100.0 * dp, "dp_mean_err": 100.0 * dp_err})
    if n:
        out["dp_max"] = 100.0 * float(dv[-1])
        out.update({name: 100.0 * percentile(dv, f) for name, f in DP_PERCENTILES[:5]})
        out["dp_median"] = 100.0 * median(dv)
        out.update({name: 100.0 * percentile(dv, f) for name, f in DP_PERCENTILES[5:]})
        out["dp_min"] = 100.0 * float(dv[0])
    out["dp_rms"] = 100.0 * rms
    out["dp_rms_err"] = 100.0 * (0.5 / rms * mse_err if rms else 0.0)
    out["same_top_p"] = 100.0 * same
    out["same_top_p_err"] = 100.0 * math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0
    return out


# The final block of llama-perplexity's printout: (label, key, format, err key or None, suffix).
PRINTED = (
    ("Mean PPL(Q)                   :", "ppl_q", "%10.6f", "ppl_q_err", "%10.6f", ""),
    ("Mean PPL(base)                :", "ppl_base", "%10.6f", "ppl_base_err", "%10.6f", ""),
    ("Cor(ln(PPL(Q)), ln(PPL(base))):", "cor_ln_ppl", "%6.2f", None, None, "%"),
    ("Mean ln(PPL(Q)/PPL(base))     :", "ln_ppl_ratio", "%10.6f", "ln_ppl_ratio_err", "%10.6f", ""),
    ("Mean PPL(Q)/PPL(base)         :", "ppl_ratio", "%10.6f", "ppl_ratio_err", "%10.6f", ""),
    ("Mean PPL(Q)-PPL(base)         :", "ppl_diff", "%10.6f", "ppl_diff_err", "%10.6f", ""),
    ("Mean    KLD:", "kld_mean", "%10.6f", "kld_mean_err", "%10.6f", ""),
    ("Maximum KLD:", "kld_max", "%10.6f", None, None, ""),
    ("99.9%   KLD:", "kld_p99_9", "%10.6f", None, None, ""),
    ("99.0%   KLD:", "kld_p99", "%10.6f", None, None, ""),
    ("95.0%   KLD:", "kld_p95", "%10.6f", None, None, ""),
    ("90.0%   KLD:", "kld_p90", "%10.6f", None, None, ""),
    ("Median  KLD:", "kld_median", "%10.6f", None, None, ""),
    ("10.0%   KLD:", "kld_p10", "%10.6f", None, None, ""),
    (" 5.0%   KLD:", "kld_p5", "%10.6f", None, None, ""),
    (" 1.0%   KLD:", "kld_p1", "%10.6f", None, None, ""),
    (" 0.1%   KLD:", "kld_p0_1", "%10.6f", None, None, ""),
    ("Minimum KLD:", "kld_min", "%10.6f", None, None, ""),
    ("Mean    Δp:", "dp_mean", "%6.3f", "dp_mean_err", "%5.3f", " %"),
    ("Maximum Δp:", "dp_max", "%6.3f", None, None, "%"),
    ("99.9%   Δp:", "dp_p99_9", "%6.3f", None, None, "%"),
    ("99.0%   Δp:", "dp_p99", "%6.3f", None, None, "%"),
    ("95.0%   Δp:", "dp_p95", "%6.3f", None, None, "%"),
    ("90.0%   Δp:", "dp_p90", "%6.3f", None, None, "%"),
    ("75.0%   Δp:", "dp_p75", "%6.3f", None, None, "%"),
    ("Median  Δp:", "dp_median", "%6.3f", None, None, "%"),
    ("25.0%   Δp:", "dp_p25", "%6.3f", None, None, "%"),
    ("10.0%   Δp:", "dp_p10", "%6.3f", None, None, "%"),
    (" 5.0%   Δp:", "dp_p5", "%6.3f", None, None, "%"),
    (" 1.0%   Δp:", "dp_p1", "%6.3f", None, None, "%"),
    (" 0.1%   Δp:", "dp_p0_1", "%6.3f", None, None, "%"),
    ("Minimum Δp:", "dp_min", "%6.3f", None, None, "%"),
    ("RMS Δp    :", "dp_rms", "%6.3f", "dp_rms_err", "%5.3f", " %"),
    ("Same top p:", "same_top_p", "%6.3f", "same_top_p_err", "%5.3f", " %"),
)


def printed_lines(stats: dict) -> list[str]:
    """The statistics formatted as llama-perplexity prints them (same labels, formats and order)."""
    lines = []
    for label, key, fmt, err, efmt, suffix in PRINTED:
        if key not in stats:
            continue
        text = f"{label} {fmt % stats[key]}"
        if err:
            text += f" ± {efmt % stats[err]}"
        lines.append(text + suffix)
    return lines
