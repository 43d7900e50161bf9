"""Pitch (f0) by autocorrelation, the Hilbert envelope, and the glottal phase.

Framing (shared with data.log_mel): frame k is centred on sample k*hop, the wave is zero-padded at its
edges, and a wave of T samples has T // hop + 1 frames. f0 is in Hz, 0.0 on unvoiced or silent frames.
Every function is batched over leading dims and runs on its input's device.
"""
import math

import torch
import torch.nn.functional as F

_CHUNK = 512  # frames per FFT block on CPU: small blocks stay in cache (~4x faster than one huge block)


def _check_wave(wave, min_len=1, what="wave"):
    """A finite, real (..., T) tensor with T >= min_len, as float32 or float64.
    Integer PCM is converted to float32 as it is (f0 does not depend on scale); bool and complex are refused."""
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(wave).__name__}")
    if wave.dtype == torch.bool or wave.is_complex():
        raise TypeError(f"{what} must hold real samples, got dtype {wave.dtype}")
    if wave.dim() == 0 or wave.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(wave.shape)}), expected (..., T) samples")
    if wave.shape[-1] < min_len:
        raise ValueError(f"{what} has {wave.shape[-1]} samples, shorter than one analysis window ({min_len})")
    x = wave if wave.dtype in (torch.float32, torch.float64) else wave.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf samples")
    return x


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _fft_size(n):
    """Smallest 2^a * 3^b * 5^c >= n: a length the FFT handles fast."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@torch.no_grad()
def f0_autocorr(wave, sr=16000, hop=160, fmin=60.0, fmax=500.0, *,
                voicing=0.45, silence=0.03, octave_cost=0.01, octave_jump=0.35, candidates=3, context=20):
    """f0 in Hz per frame by Praat's autocorrelation method (Boersma 1993); 0.0 where unvoiced or silent.

    wave (..., T) -> (..., T // hop + 1); integer PCM is converted to float32. Frame k is the 3 periods of
    fmin around sample k*hop, local mean removed, times a Hann window w:
        r(tau) = [ac_x(tau) / ac_x(0)] / [ac_w(tau) / ac_w(0)]     autocorrelation, taper corrected
        peaks: local maxima of r at lags sr/fmax..sr/fmin, refined by the parabola through 3 lags
        score = r_peak - octave_cost * log2(fmax / f)              near-ties go to the higher octave
        voiced iff best score > voicing + max(0, 2 - (peak / item_peak) * (1 + voicing) / silence)
    with peak the frame's central |amplitude| and item_peak the item's max |x| (Praat's rule: frames below
    about 2 * silence / (1 + voicing) of the item's peak are unvoiced). Octave errors, a multiple of the
    period scoring best, come in short runs; Praat's Viterbi path avoids them by continuity, but a path is
    sequential over frames. Instead each voiced frame re-picks among its `candidates` best peaks by
        score - octave_jump * |log2(f / median f0 of the voiced frames within +-context frames)|
    """
    _check_count(hop, "hop")
    if not 0 < fmin < fmax:
        raise ValueError(f"need 0 < fmin < fmax, got fmin={fmin}, fmax={fmax}")
    if fmax > sr / 2:
        raise ValueError(f"fmax={fmax} Hz is above the Nyquist frequency sr/2={sr / 2} Hz")
    half = round(1.5 * sr / fmin)  # window of 2*half + 1 samples = 3 periods of fmin, centred
    W = 2 * half + 1
    x = _check_wave(wave, W)
    lead, T = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, T)
    B, n = x.shape[0], T // hop + 1
    lo, hi = math.ceil(sr / fmax), math.floor(sr / fmin)  # lag range of the candidates, in samples
    nfft = _fft_size(W + hi + 1)  # no wrap-around up to lag hi + 1

    # Each item gets a slot of m*hop samples, itself with zeros around; the slots, end to end, are framed
    # once: item b's frame k is row b*m + k, and the rows straddling two slots are computed and dropped.
    m = -(-(T + W) // hop)
    flat = x.new_zeros(B * m * hop + max(W - hop, 0))  # the tail completes the last slot's last frame
    flat[:B * m * hop].view(B, m * hop)[:, half:half + T] = x
    rows = flat.unfold(0, W, hop)  # B*m rows

    win = torch.hann_window(W + 2, periodic=False, dtype=x.dtype, device=x.device)[1:-1]
    ac_win = torch.fft.irfft(torch.fft.rfft(win, nfft).abs().square(), nfft)[:hi + 2]
    untaper = ac_win[0] / ac_win
    lags = torch.arange(lo, hi + 1, dtype=x.dtype, device=x.device)
    lag_cost = octave_cost * torch.log2(fmax / sr * lags)  # the octave cost at integer lags
    K = min(candidates, hi - lo + 1)

    cand_f, cand_score, peak = [], [], []
    chunk = _CHUNK if x.device.type == "cpu" else 32 * _CHUNK
    buf = x.new_zeros(min(chunk, len(rows)), nfft)  # windowed frames, zero-padded for the FFT
    for frames in rows.split(chunk):
        xw = buf[:len(frames), :W]
        local_mean = frames[:, half - hi:half + hi + 1].mean(1, keepdim=True)  # Praat: 2 periods of fmin
        torch.sub(frames, local_mean, out=xw).mul_(win)
        peak.append(xw[:, half - hi // 2:half + hi // 2 + 1].abs().amax(1))
        spec = torch.fft.rfft(buf[:len(frames)])
        ac = torch.fft.irfft(spec.mul_(spec.conj()), nfft)[:, :hi + 2]  # power spectrum -> autocorrelation
        r = ac * (untaper / ac[:, :1].clamp_min(torch.finfo(x.dtype).tiny))
        # every local maximum, refined by the parabola through it and its two neighbours:
        # with a = r[i] - r[i-1] > 0 and b = r[i] - r[i+1] >= 0, the vertex is (a - b)^2 / (8(a + b)) higher
        mid = r[:, lo:hi + 1]
        a, b = mid - r[:, lo - 1:hi], mid - r[:, lo + 1:hi + 2]
        score = mid + (a - b).square() / (8 * (a + b)) - lag_cost
        top, i = score.masked_fill_((a <= 0) | (b < 0), -math.inf).topk(K, 1)  # -inf: fewer than K maxima
        a, b = a.gather(1, i), b.gather(1, i)
        strength = top + lag_cost[i]
        strength = torch.where(strength > 1, 1 / strength, strength)  # as Praat: > 1 only from the taper
        f = (sr / (lags[i] + 0.5 * (a - b) / (a + b).clamp_min(1e-12))).clamp(fmin, fmax)
        cand_score.append(strength - octave_cost * torch.log2(fmax / f))
        cand_f.append(f)

    def per_item(chunks):  # rows -> (B, n, ...), dropping the rows between items
        return torch.cat(chunks).view(B, m, *chunks[0].shape[1:])[:, :n]

    cand_f, cand_score = per_item(cand_f), per_item(cand_score)  # (B, n, K), best first
    item_peak = x.abs().amax(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    intensity = (per_item(peak) / item_peak).clamp(max=1)
    voiced = cand_score[..., 0] > voicing + (2 - intensity * (1 + voicing) / silence).clamp(min=0)
    f0 = torch.where(voiced, cand_f[..., 0], 0.0)
    # continuity instead of a Viterbi path: re-pick each voiced frame's peak near its neighbours' median
    near = F.pad(f0, (context, context)).unfold(1, 2 * context + 1, 1)
    ref = near.masked_fill(near == 0, math.nan).nanmedian(-1).values
    best = (cand_score - octave_jump * torch.log2(cand_f / ref[..., None]).abs()).argmax(-1, keepdim=True)
    f0 = torch.where(voiced, cand_f.gather(-1, best)[..., 0], 0.0)
    return f0.reshape(*lead, n)


def hilbert(x):
    """Analytic signal x + i*H{x} over the last dim, as scipy.signal.hilbert: by FFT, the spectrum times
    h_k = 1 at DC (and at Nyquist for even N), 2 at positive frequencies, 0 at negative ones."""
    x = _check_wave(x, what="x")
    N = x.shape[-1]
    h = torch.full((N // 2 + 1,), 2.0, dtype=x.dtype, device=x.device)
    h[0] = 1.0
    if N % 2 == 0:
        h[-1] = 1.0
    return torch.fft.ifft(torch.fft.rfft(x) * h, n=N)  # n=N zero-fills the negative frequencies


def envelope(wave, hop=160):
    """Hilbert envelope |hilbert(x)| averaged over the hop samples centred on each frame:
    (..., T) -> (..., T // hop + 1). Edge frames average only the samples inside the wave."""
    _check_count(hop, "hop")
    env = hilbert(wave).abs()
    T, n, start = env.shape[-1], env.shape[-1] // hop + 1, hop // 2
    sums = F.pad(env, (start, n * hop - T - start)).unflatten(-1, (n, hop)).sum(-1)
    first = torch.arange(n, device=env.device) * hop - start  # frame k covers [first, first + hop)
    return sums / ((first + hop).clamp(max=T) - first.clamp(min=0))


def accumulate_phase(f0, hop_s, phi0=0.0):
    """Glottal phase phi_t = (phi0 + sum_{s<=t} 2*pi*f0_s*hop_s) mod 2*pi along the last dim.
    Summed in float64: over a long clip the unwrapped phase reaches 1e5 rad."""
    phase = (phi0 + (2 * math.pi * hop_s * f0.double()).cumsum(-1)) % (2 * math.pi)
    return phase.to(f0.dtype if f0.is_floating_point() else torch.get_default_dtype())


def pool_f0(f0, factor=2):
    """Mean of the voiced (> 0) frames in each group of `factor` frames, 0 if none:
    (..., T) -> (..., ceil(T / factor)); when factor does not divide T the last group is shorter."""
    _check_count(factor, "factor")
    G = -(-f0.shape[-1] // factor)
    groups = F.pad(f0, (0, G * factor - f0.shape[-1])).unflatten(-1, (G, factor))
    voiced = groups > 0
    return (groups * voiced).sum(-1) / voiced.sum(-1).clamp(min=1)


if __name__ == "__main__":
    sr, t = 16000, torch.arange(16000) / 16000
    glide = 100 * 2 ** t  # one octave up in one second
    wave = sum(torch.sin(2 * math.pi * h * torch.cumsum(glide, 0) / sr) / h for h in range(1, 8))
    f0 = f0_autocorr(wave, sr)
    print("a harmonic glide from 100 to 200 Hz, at 0.25, 0.5 and 0.75 s:")
    print("  true f0     ", [round(float(glide[k * 160]), 1) for k in (25, 50, 75)])
    print("  f0_autocorr ", [round(float(f0[k]), 1) for k in (25, 50, 75)])
