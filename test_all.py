"""Shape and equivalence checks for every piece of the project.

    python test_all.py            # run everything, print "N passed, M failed"
    python test_all.py rope       # run only the tests whose name contains "rope"
    python -m pytest test_all.py  # also works, if pytest happens to be installed

Each test compares against an independent formulation (a closed form, a second implementation written
differently, or a known value), with fixed seeds and tolerances that mean something.
"""

import contextlib
import http.server
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections import Counter
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import eval as evaluation
import pitch
import train
from eval import cer, edit_distance, normalize, wer
from model import ASRModel, ModelConfig
from pitch import accumulate_phase, envelope, f0_autocorr, hilbert, pool_f0
from rope import BANDS, apply_rotary, mel_freqs, rope_angles, rope_radius, rotary_freqs, rotation, std_freqs

# one thread: the tests run small ops, where a second thread costs more than it saves, and under load
# (other processes on the same cores) waiting threads can slow small ops down a hundredfold
torch.set_num_threads(1)


def _raises(fn, errors, *words):
    """Run fn and expect one of `errors` whose message holds every word; return the message."""
    try:
        fn()
    except errors as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"{type(e).__name__} message {str(e)!r} lacks {missing}"
        return str(e)
    raise AssertionError(f"no error raised (expected {errors} mentioning {words})")


# ----------------------------------------------------------------------------------------------------
# pitch.py


def _pitch_voice(f0_of_t, seconds, voiced_spans, seed, jitter=0.02, snr_db=15.0, sr=16000):
    """A synthetic voice with a known f0 track, as a float32 tensor: harmonics 1/h up to 5 kHz of a
    phase that integrates f0 (with 2% per-cycle jitter), gated on during `voiced_spans` (5 ms ramps).
    The gaps hold silence or a fricative-like noise burst; white noise sits `snr_db` below the voice."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = f0_of_t(t)
    cycle = np.floor(np.cumsum(f) / sr).astype(int)
    f = f * (1 + jitter * rng.standard_normal(cycle[-1] + 1)[cycle])  # each glottal cycle a bit off
    phase = 2 * np.pi * np.cumsum(f) / sr
    voice = sum(np.sin(h * phase) / h * (h * f < 5000) for h in range(1, int(5000 / f.min()) + 1))
    gate = np.zeros_like(t)
    for i, (a, b) in enumerate(voiced_spans):  # syllables at different levels: 1, 0.3, 0.6, 1, ...
        gate = np.maximum(gate, (1, 0.3, 0.6)[i % 3] * np.clip(np.minimum(t - a, b - t) / 0.005, 0, 1))
    wave = voice * gate
    gaps = [(b, a2) for (_, b), (a2, _) in zip(voiced_spans[:-1], voiced_spans[1:])]
    for i, (a, b) in enumerate(gaps):
        if i % 2:  # every other gap: a fricative-like noise burst at a fifth of the voice's level
            burst = (t > a + 0.01) & (t < b - 0.01)
            wave[burst] += 0.2 * voice.std() * rng.standard_normal(burst.sum())
    wave += voice.std() * 10 ** (-snr_db / 20) * rng.standard_normal(len(t))
    return torch.tensor(wave, dtype=torch.float32)


def _pitch_scores(f0, f0_of_t, voiced_spans, seconds, hop=160, sr=16000, margin=0.030):
    """Gross pitch error (|f0 - true| > 20%) over frames voiced in truth and estimate, and voicing
    decision error over frames whose truth is clear: frames within `margin` (half the 50 ms window
    plus the 5 ms ramp) of a voicing boundary or of either end of the wave are left out."""
    t = np.arange(len(f0)) * hop / sr
    edges = [0.0, seconds] + [e for span in voiced_spans for e in span]
    clear = np.min(np.abs(t[:, None] - np.array(edges)[None]), axis=1) > margin
    truly_voiced = np.any([(t > a) & (t < b) for a, b in voiced_spans], axis=0)
    est = f0.numpy()
    both = clear & truly_voiced & (est > 0)
    gross = np.abs(est[both] - f0_of_t(t[both])) > 0.2 * f0_of_t(t[both])
    vde = np.mean((est[clear] > 0) != truly_voiced[clear])
    return gross.mean(), vde, both.sum()


def test_pitch_f0_synthetic_voices():
    spans = [(0.05, 0.65), (0.85, 1.45), (1.65, 2.25), (2.45, 2.95)]
    voices = {  # name: f0(t) in Hz
        "low 70 -> 85 Hz": lambda t: 70 + 5 * t,
        "male 120 Hz vibrato": lambda t: 120 * (1 + 0.05 * np.sin(2 * np.pi * 5.5 * t)),
        "female 200 -> 300 Hz glissando": lambda t: 200 * 1.5 ** (t / 3),
        "high 400 Hz vibrato": lambda t: 400 * (1 + 0.03 * np.sin(2 * np.pi * 6 * t)),
        "fall 250 -> 90 Hz": lambda t: 250 * (90 / 250) ** (t / 3),
    }
    for seed, (name, track) in enumerate(voices.items()):
        wave = _pitch_voice(track, 3.0, spans, seed)
        f0 = f0_autocorr(wave)
        gpe, vde, n = _pitch_scores(f0, track, spans, 3.0)
        assert n > 150, f"{name}: only {n} frames voiced in both"
        assert gpe <= 0.02, f"{name}: gross pitch error {gpe:.1%} > 2%"
        assert vde <= 0.05, f"{name}: voicing decision error {vde:.1%} > 5%"


def test_pitch_f0_silence_noise_and_clipping():
    g = torch.Generator().manual_seed(0)
    for name, wave in [("silence", torch.zeros(16000)), ("white noise", torch.randn(3, 16000, generator=g))]:
        f0 = f0_autocorr(wave)
        assert torch.equal(f0, torch.zeros_like(f0)), f"{name}: {int((f0 > 0).sum())} frames voiced, expected none"
    spans = [(0.0, 1.0)]
    track = lambda t: 150 + 0 * t
    wave = _pitch_voice(track, 1.0, spans, seed=1, jitter=0.0)
    clipped = (8 * wave / wave.abs().max()).clamp(-1, 1)  # hard clipping: a square-ish wave
    f0 = f0_autocorr(clipped)
    assert torch.isfinite(f0).all(), "clipped voice gave non-finite f0"
    gpe, vde, n = _pitch_scores(f0, track, spans, 1.0)
    assert gpe <= 0.02 and vde <= 0.05, f"clipped 150 Hz voice: GPE {gpe:.1%}, VDE {vde:.1%} over {n} frames"


def test_pitch_f0_batch_equals_single_and_framing():
    spans = [(0.1, 0.5), (0.6, 0.9)]
    items = [_pitch_voice(lambda t, f=f: f * (1 + 0.1 * t), 1.0, spans, seed)[:T]
             for seed, (f, T) in enumerate([(110, 16000), (230, 14401), (90, 9999)])]
    batch = torch.zeros(len(items), 16000)
    for i, item in enumerate(items):
        batch[i, :len(item)] = item
    f0_batch = f0_autocorr(batch)
    assert f0_batch.shape == (3, 16000 // 160 + 1), f"batch f0 shape {tuple(f0_batch.shape)}"
    for i, item in enumerate(items):
        alone = f0_autocorr(item)
        assert alone.shape == (len(item) // 160 + 1,), f"item {i}: {len(alone)} frames for {len(item)} samples"
        assert (alone > 0).sum() > 20, f"item {i}: too few voiced frames for a meaningful check"
        assert torch.allclose(f0_batch[i, :len(alone)], alone, rtol=1e-5, atol=0), \
            f"item {i}: f0 in a zero-padded batch differs from f0 alone"
    nested = f0_autocorr(batch[:2].reshape(2, 1, 16000).expand(2, 3, 16000))
    assert nested.shape == (2, 3, 101) and torch.allclose(nested[:, 1], f0_batch[:2], rtol=1e-5), \
        "leading dims are not handled as a batch"
    for T in (801, 959, 960, 961, 4000):
        assert f0_autocorr(torch.randn(T)).shape == (T // 160 + 1,), f"frame count for T={T}"
        assert f0_autocorr(torch.randn(T), hop=100).shape == (T // 100 + 1,), f"frame count for T={T}, hop=100"


def test_pitch_f0_integer_pcm_is_scale_free():
    wave = _pitch_voice(lambda t: 180 + 0 * t, 0.5, [(0.05, 0.45)], seed=3)
    pcm = (wave / wave.abs().max() * 16384).round().to(torch.int16)
    f0_pcm, f0_float = f0_autocorr(pcm), f0_autocorr(pcm.float() / 2 ** 15)
    assert f0_pcm.dtype == torch.float32, f"int16 input gave {f0_pcm.dtype}"
    assert torch.equal(f0_pcm, f0_float), "int16 PCM and the same samples scaled to [-1, 1] disagree"


def _pitch_hilbert_numpy(x):
    """scipy.signal.hilbert's formulation: full complex FFT, weights 1 (DC, Nyquist), 2, 0."""
    N = x.shape[-1]
    h = np.zeros(N)
    h[0] = 1
    h[1:(N + 1) // 2] = 2
    if N % 2 == 0:
        h[N // 2] = 1
    return np.fft.ifft(np.fft.fft(x, axis=-1) * h, axis=-1)


def test_pitch_hilbert_matches_references():
    rng = np.random.default_rng(0)
    for N in (1000, 1001, 2, 3):
        n = np.arange(N)
        # closed form: the analytic signal of a*cos(2 pi k n / N + p) is a*exp(i(...)) for 0 < k < N/2;
        # DC and (even N) the Nyquist cosine are their own analytic signal
        ks = [k for k in (1, 7, 100, 333) if k < N / 2]
        amps, phases = rng.uniform(0.2, 1, len(ks)), rng.uniform(0, 2 * np.pi, len(ks))
        x = 0.3 + sum(a * np.cos(2 * np.pi * k * n / N + p) for a, k, p in zip(amps, ks, phases))
        z = 0.3 + sum(a * np.exp(1j * (2 * np.pi * k * n / N + p)) for a, k, p in zip(amps, ks, phases))
        if N % 2 == 0:
            x, z = x + 0.5 * np.cos(np.pi * n), z + 0.5 * np.cos(np.pi * n)
        got = hilbert(torch.tensor(x)).numpy()
        assert np.abs(got - z).max() < 1e-5, f"N={N}: hilbert vs closed form, max err {np.abs(got - z).max():.2e}"
        noise = rng.standard_normal((2, N))
        got = hilbert(torch.tensor(noise, dtype=torch.float32)).numpy()
        err = np.abs(got - _pitch_hilbert_numpy(noise)).max()
        assert err < 1e-5, f"N={N}: float32 hilbert vs numpy full-FFT reference, max err {err:.2e}"


def test_pitch_envelope_of_am_tone():
    sr, T = 16000, 16000 + 77  # odd length: whole periods of neither tone nor modulation
    t = torch.arange(T, dtype=torch.float64) / sr
    modulation = 1 + 0.5 * torch.cos(2 * math.pi * 3 * t)
    env = envelope(torch.stack([modulation, 2 * modulation]) * torch.cos(2 * math.pi * 1000 * t))
    assert env.shape == (2, T // 160 + 1), f"envelope shape {tuple(env.shape)}"
    centre = modulation[::160]
    inner = slice(3, -3)  # the FFT's circular wrap disturbs the first and last few ms
    err = (env[0, inner] - centre[inner]).abs().max()
    assert err < 5e-3, f"envelope misses the 3 Hz modulation by {err:.2e}"
    assert torch.allclose(env[1], 2 * env[0]), "envelope is not linear in the amplitude"
    assert torch.equal(envelope(torch.zeros(1000)), torch.zeros(7)), "silence must give a zero envelope"


def test_pitch_accumulate_phase():
    f0 = torch.full((3, 200), 123.0, dtype=torch.float64)
    phase = accumulate_phase(f0, 0.01, phi0=0.3)
    linear = 0.3 + 2 * math.pi * 123.0 * 0.01 * torch.arange(1, 201, dtype=torch.float64)
    gap = torch.remainder(phase - linear + math.pi, 2 * math.pi) - math.pi
    assert gap.abs().max() < 1e-9, f"constant f0 is not a linear phase mod 2 pi (off by {gap.abs().max():.1e})"
    assert (phase >= 0).all() and (phase < 2 * math.pi).all(), "phase outside [0, 2 pi)"
    g = torch.Generator().manual_seed(0)
    f0 = (80 + 300 * torch.rand(2, 300, generator=g)) * (torch.rand(2, 300, generator=g) > 0.3)
    got = accumulate_phase(f0, 0.01, phi0=1.0)
    assert got.dtype == torch.float32 and got.shape == f0.shape, f"got {got.dtype} {tuple(got.shape)}"
    for b in range(2):
        phi = 1.0
        for t in range(300):
            phi = math.fmod(phi + 2 * math.pi * float(f0[b, t]) * 0.01, 2 * math.pi)
            diff = abs(float(got[b, t]) - phi)
            assert min(diff, 2 * math.pi - diff) < 1e-4, f"item {b} frame {t}: {float(got[b, t])} vs loop {phi}"


def test_pitch_pool_f0():
    got = pool_f0(torch.tensor([100.0, 200.0, 0.0, 0.0, 150.0]))
    assert torch.equal(got, torch.tensor([150.0, 0.0, 150.0])), f"pairs of [100,200,0,0,150] -> {got.tolist()}"
    got = pool_f0(torch.tensor([[0.0, 120.0, 130.0, 0.0, 0.0, 0.0, 90.0]] * 2), factor=3)
    assert torch.equal(got, torch.tensor([[125.0, 0.0, 90.0]] * 2)), f"groups of three -> {got.tolist()}"
    assert pool_f0(torch.zeros(2, 5, 101)).shape == (2, 5, 51), "pooled length must be ceil(T / 2)"


def test_pitch_bad_input_errors():
    ok = torch.randn(4000)
    _raises(lambda: f0_autocorr(ok.numpy()), TypeError, "torch.Tensor")
    _raises(lambda: f0_autocorr(ok > 0), TypeError, "real samples", "bool")
    _raises(lambda: f0_autocorr(ok.to(torch.complex64)), TypeError, "real samples")
    _raises(lambda: f0_autocorr(torch.zeros(0)), ValueError, "empty")
    _raises(lambda: f0_autocorr(torch.zeros(4, 0)), ValueError, "empty")
    _raises(lambda: f0_autocorr(torch.zeros(500)), ValueError, "500 samples", "analysis window")
    for bad in (math.nan, math.inf):
        _raises(lambda: f0_autocorr(torch.cat([ok, torch.tensor([bad])])), ValueError, "NaN or inf")
        _raises(lambda: hilbert(torch.tensor([0.0, bad])), ValueError, "NaN or inf")
    _raises(lambda: f0_autocorr(ok, fmin=300.0, fmax=200.0), ValueError, "fmin", "fmax")
    _raises(lambda: f0_autocorr(ok, fmin=0.0), ValueError, "fmin")
    _raises(lambda: f0_autocorr(ok, fmax=9000.0), ValueError, "Nyquist")
    for hop in (0, -160, 160.0, True):
        _raises(lambda: f0_autocorr(ok, hop=hop), ValueError, "hop")
    _raises(lambda: envelope(ok, hop=0), ValueError, "hop")
    _raises(lambda: pool_f0(ok, factor=0), ValueError, "factor")


# ----------------------------------------------------------------------------------------------------
# rope.py



def _rope_rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplying each pair by j, written in numpy."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def _rope_reference(x, angles):
    """Real-valued RoPE in float64 numpy: y = x * cos + rotate_pairs(x) * sin, angles repeated per pair."""
    cos = np.repeat(np.cos(angles), 2, axis=-1)
    sin = np.repeat(np.sin(angles), 2, axis=-1)
    return x * cos + _rope_rotate_pairs(x) * sin


def _rope_scores(q, k, rot):
    """Attention scores <R_t q_t, R_s k_s> for (B, H, T, D) queries and keys."""
    return apply_rotary(q, rot) @ apply_rotary(k, rot).transpose(-1, -2)


def test_rope_std_matches_real_cos_sin_reference():
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 50, 16
    x = torch.randn(B, H, T, D, generator=g)
    y = apply_rotary(x, rotation(rope_angles(T, D)))
    i = np.arange(D // 2)
    angles = np.arange(T)[:, None] * 10000.0 ** (-2.0 * i / D)  # closed form, float64
    ref = _rope_reference(x.double().numpy(), angles)
    err = np.abs(y.double().numpy() - ref).max()
    assert err < 1e-5, f"max |apply_rotary - cos/sin reference| = {err:.2e}"
    x_small = x[..., :8, :]  # small positions keep float32 rounding of the angles below 1e-6
    err_small = np.abs(apply_rotary(x_small, rotation(rope_angles(8, D))).double().numpy()
                       - _rope_reference(x_small.double().numpy(), angles[:8])).max()
    assert err_small < 1e-6, f"first 8 positions differ by {err_small:.2e}"


def test_rope_matches_rotate_half_after_permutation():
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 2, 20, 8
    x = torch.randn(B, H, T, D, generator=g)
    angles = rope_angles(T, D)
    # rotate_half pairs dim i with dim i + D/2; interleaved pairs (2i, 2i+1) map there by this permutation
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    xh = x[..., perm]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = torch.cat([-xh[..., D // 2:], xh[..., :D // 2]], dim=-1)
    yh = xh * cos + rotate_half * sin
    y = apply_rotary(x, rotation(angles))
    assert torch.allclose(y[..., perm], yh, atol=1e-6), (y[..., perm] - yh).abs().max()


def test_rope_relative_property_std_and_accumulated_but_not_absolute():
    g = torch.Generator().manual_seed(2)
    H, T, D, shift = 2, 30, 16, 7
    q, k = torch.randn(1, H, T, D, generator=g), torch.randn(1, H, T, D, generator=g)
    f0 = 100 + 150 * torch.rand(1, T, generator=g)
    f0[:, 10:14] = 0  # an unvoiced stretch
    prefix = 80 + 200 * torch.rand(1, shift, generator=g)  # any pitch before: a shift of both positions
    f0_shifted = torch.cat([prefix, f0], dim=-1)
    pad = torch.zeros(1, H, shift, D)
    qs, ks = torch.cat([pad, q], dim=2), torch.cat([pad, k], dim=2)
    for rope in ["std", "mel"]:
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope)))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope)))[..., shift:, shift:]
        assert torch.allclose(a, b, atol=1e-5), f"{rope}: plain RoPE scores changed by a shift"
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope, f0=f0, theta_mod="accumulate")))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope, f0=f0_shifted,
                                                      theta_mod="accumulate")))[..., shift:, shift:]
        assert torch.allclose(a, b, atol=1e-5), f"{rope}: accumulated-phase scores changed by a shift"
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope, f0=f0, theta_mod="absolute")))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope, f0=f0_shifted,
                                                      theta_mod="absolute")))[..., shift:, shift:]
        # with std freqs, theta + f0 moves w by only ~f0/theta, so the break is small but 100x the tolerance
        assert (a - b).abs().max() > 1e-3, f"{rope}: the seed's absolute form looked relative"


def test_rope_special_cases_collapse():
    T, D = 40, 16
    plain = rope_angles(T, D, "mel")
    zero = rope_angles(T, D, "mel", f0=torch.zeros(3, T), theta_mod="accumulate")
    assert torch.allclose(zero, plain.expand(3, T, D // 2), atol=1e-6), "f0 = 0 must mean no modulation"
    f0 = torch.full((T,), 180.0)
    acc = rope_angles(T, D, "std", theta=5000.0, f0=f0, theta_mod="accumulate").double()
    closed = np.arange(T)[:, None] * (5000.0 + 180.0) ** (-2.0 * np.arange(D // 2) / D)
    diff = np.angle(np.exp(1j * (acc.numpy() - closed)))  # compare on the circle
    assert np.abs(diff).max() < 1e-5, f"constant f0: accumulated phase != t*w(theta+f0), {np.abs(diff).max():.1e}"
    x = torch.randn(1, 2, T, D)
    unit = apply_rotary(x, rotation(rope_angles(T, D), radius=torch.ones(T)))
    assert torch.allclose(unit, apply_rotary(x, rotation(rope_angles(T, D))), atol=0), "radius 1 != plain RoPE"


def test_rope_mel_freqs_formula_per_band_and_aliasing():
    D = 32
    for name, (lo, hi) in BANDS.items():
        m = np.linspace(0.0, 2595.0 * np.log10(1.0 + hi / lo), D // 2)
        hz_above_lo = lo * (10.0 ** (m / 2595.0) - 1.0)
        for theta in [10000.0, 500.0]:
            ref = theta / 220.0 * hz_above_lo / 1000.0
            got = mel_freqs(D, theta, lo, hi).numpy()
            assert np.allclose(got, ref, rtol=1e-12, atol=0), f"band {name}, theta {theta}"
            assert got[0] == 0.0, "w_0 must be exactly 0 (one pair never rotates)"
        assert np.allclose(rotary_freqs(D, rope="mel", band=name).numpy(), mel_freqs(D, 10000.0, lo, hi).numpy())
    w = mel_freqs(D)  # default band, theta 1e4: the top frequency is 10000/220 * 4 = 181.8 rad/frame
    assert abs(w[-1].item() - 10000.0 / 220.0 * 4.0) < 1e-9 and w[-1] > math.pi
    # aliasing, shown rather than hidden: at integer positions w and w - 2*pi*n rotate identically
    t = torch.arange(50, dtype=torch.float64)
    aliased = w[-1] - 2 * math.pi * torch.floor(w[-1] / (2 * math.pi))
    assert torch.allclose(torch.polar(torch.ones(50, dtype=torch.float64), t * w[-1]),
                          torch.polar(torch.ones(50, dtype=torch.float64), t * aliased), atol=1e-9)


def test_rope_std_freqs_closed_form():
    for D in [2, 8, 64]:
        ref = np.array([10000.0 ** (-2.0 * i / D) for i in range(D // 2)])
        assert np.allclose(std_freqs(D).numpy(), ref, rtol=1e-12), D
    assert std_freqs(64)[-1] < 2e-4, "the exponent is 2i/D (not 2i/(D/2)): the slowest pair is ~theta^-1"


def test_rope_radius_relative_hz_and_logit_scaling():
    f0 = torch.tensor([[0.0, 100.0, 200.0, 0.0, 150.0, 0.0], [0.0] * 6])  # row 2: all unvoiced/padding
    r = rope_radius(f0)
    assert torch.allclose(r[0], torch.tensor([1.0, 100 / 150, 200 / 150, 1.0, 1.0, 1.0])), r[0]
    assert torch.equal(r[1], torch.ones(6)), "no voiced frame: every radius is 1"
    g = torch.Generator().manual_seed(3)
    T, D = 6, 8
    q, k = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    angles = rope_angles(T, D)
    unit = _rope_scores(q, k, rotation(angles))
    rr = rope_radius(f0[:1])[0]
    scaled = _rope_scores(q, k, rotation(angles, rr))
    assert torch.allclose(scaled, unit * rr[:, None] * rr[None, :], atol=1e-5), "q.k must scale by r_t*r_s"
    hz = _rope_scores(q, k, rotation(angles, rope_radius(f0[:1], mode="hz")[0]))
    voiced = f0[0] > 0
    ratio = (hz / unit)[0, 0][voiced][:, voiced]
    assert ratio.min() >= 1e4 - 1 and ratio.max() <= 4e4 + 1, "raw-Hz radius scales logits by f0_t*f0_s ~ 1e4"
    assert torch.equal(hz[0, 0][~voiced], torch.zeros(int((~voiced).sum()), T)), "raw Hz zeroes unvoiced q"
    assert torch.equal(hz[0, 0][:, ~voiced], torch.zeros(T, int((~voiced).sum()))), "raw Hz zeroes unvoiced k"


def test_rope_gradient_reaches_learnable_theta():
    for rope in ["std", "mel"]:
        for theta_mod in [None, "accumulate"]:
            log_theta = torch.tensor(math.log(10000.0), requires_grad=True)
            f0 = torch.full((2, 12), 120.0)
            angles = rope_angles(12, 8, rope, theta=log_theta.exp(), f0=f0, theta_mod=theta_mod)
            x = torch.randn(2, 1, 12, 8)
            apply_rotary(x, rotation(angles)).square().mul(torch.randn(2, 1, 12, 8)).sum().backward()
            assert log_theta.grad is not None and log_theta.grad.abs() > 0, (rope, theta_mod)


def test_rope_batched_f0_and_dtypes():
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 3, 2, 25, 16
    f0 = torch.stack([torch.full((T,), 100.0), torch.full((T,), 220.0), torch.zeros(T)])
    angles = rope_angles(T, D, "mel", f0=f0, theta_mod="accumulate")
    rot = rotation(angles, rope_radius(f0))
    assert angles.shape == (B, T, D // 2) and rot.shape == (B, T, D // 2) and rot.dtype == torch.complex64
    x = torch.randn(B, H, T, D, generator=g)
    y = apply_rotary(x, rot)
    for b in range(B):  # each item's rotation is its own
        alone = apply_rotary(x[b:b + 1], rotation(rope_angles(T, D, "mel", f0=f0[b:b + 1], theta_mod="accumulate"),
                                                  rope_radius(f0[b:b + 1])))
        assert torch.allclose(y[b:b + 1], alone, atol=1e-6), b
    assert not torch.allclose(y[0], y[1], atol=1e-3), "different pitch tracks must rotate differently"
    y16 = apply_rotary(x.bfloat16(), rot)
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16.float(), y, atol=0.05, rtol=0.02)


def test_rope_bad_input_errors():
    def raises(fn, words):
        _raises(fn, (ValueError, TypeError), words)
    raises(lambda: std_freqs(7), "head_dim")
    raises(lambda: mel_freqs(8, fmin=4000.0, fmax=200.0), "fmin < fmax")
    raises(lambda: rope_angles(5, 8, f0=torch.tensor([100.0, -1, 0, 0, 0]), theta_mod="accumulate"), "negative")
    raises(lambda: rope_angles(6, 8, f0=torch.zeros(5), theta_mod="accumulate"), "lengths must match")
    raises(lambda: rope_angles(5, 8, theta_mod="accumulate"), "needs an f0")
    raises(lambda: rope_angles(5, 8, rope="cos"), "rope must be")
    raises(lambda: rope_radius(torch.zeros(5), mode="db"), "radius mode")
    raises(lambda: apply_rotary(torch.zeros(1, 1, 5, 8), rotation(rope_angles(4, 8))), "does not match")


# ----------------------------------------------------------------------------------------------------
# model.py


_MODEL_PITCH_SWITCHES = dict(rope="mel", radii=True, theta_mod="accumulate", pitch_bias=True)


def _model_tiny(seed=0, **switches):
    torch.manual_seed(seed)
    c = ModelConfig(d_model=32, n_heads=4, n_enc_layers=2, n_dec_layers=2, vocab_size=24, max_text_len=32,
                    dropout=0.0, **switches)
    return ASRModel(c).eval()


def _model_inputs(B=3, T=41, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, 80, T, generator=g)
    f0 = 90 + 200 * torch.rand(B, T, generator=g)
    f0[:, T // 4:T // 3] = 0  # unvoiced stretch
    tokens = torch.randint(4, 24, (B, L), generator=g)
    tokens[:, 0] = 1
    return mel, f0, tokens


def _model_manual_attention(attn, x, rot_angles=None, additive=None, causal=False, source=None):
    """softmax(Q K^T / sqrt(d) + mask) V written out with the module's weights, rotary via cos/sin in float64."""
    H = attn.n_heads
    x, src = x.double(), (x if source is None else source).double()
    q = x @ attn.query.weight.double().T + attn.query.bias.double()
    k = src @ attn.key.weight.double().T
    v = src @ attn.value.weight.double().T + attn.value.bias.double()
    q, k, v = (t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2) for t in (q, k, v))
    if rot_angles is not None:
        q = torch.from_numpy(_rope_reference(q.numpy(), rot_angles.double().numpy()))
        k = torch.from_numpy(_rope_reference(k.numpy(), rot_angles.double().numpy()))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        logits = logits + additive.double()
    if causal:
        Tq = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(logits, -1) @ v
    y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return y @ attn.out.weight.double().T + attn.out.bias.double()


@torch.no_grad()
def test_model_sdpa_attention_matches_manual_softmax():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    attn = m.encoder[0].attn
    with torch.no_grad():
        attn.bias_gain.copy_(torch.tensor([0.5, 1.0, -2.0, 3.0]))
    g = torch.Generator().manual_seed(5)
    B, T = 2, 13
    x = torch.randn(B, T, 32, generator=g)
    angles = 2 * math.pi * torch.rand(B, T, 4, generator=g)
    bias = torch.rand(B, 1, T, T, generator=g)
    pad = torch.zeros(B, 1, 1, T)
    pad[1, ..., 9:] = float("-inf")
    y = attn(x, rot=rotation(angles), mask=pad, pitch_bias=bias)[0]
    ref = _model_manual_attention(attn, x, angles[:, None], attn.bias_gain.view(1, -1, 1, 1) * bias + pad)
    assert torch.allclose(y.double(), ref, atol=1e-5), (y.double() - ref).abs().max()
    dec = m.decoder[0].self_attn  # causal self-attention with plain RoPE
    y = dec(x, rot=m.dec_rot[:T], causal=True)[0]
    i = np.arange(4)
    plain = torch.from_numpy(np.arange(T)[:, None] * 10000.0 ** (-2.0 * i / 8))
    ref = _model_manual_attention(dec, x, plain, causal=True)
    assert torch.allclose(y.double(), ref, atol=1e-5), (y.double() - ref).abs().max()


def _model_manual_encoder(m, mel):
    """The encoder as a plain RoPE transformer, written with functional ops and the model's weights."""
    x = F.gelu(F.conv1d(mel.double(), m.conv1.weight.double(), m.conv1.bias.double(), padding=1))
    x = F.gelu(F.conv1d(x, m.conv2.weight.double(), m.conv2.bias.double(), stride=2, padding=1)).transpose(1, 2)
    T, D = x.shape[1], m.head_dim
    angles = torch.from_numpy(np.arange(T)[:, None] * 10000.0 ** (-2.0 * np.arange(D // 2) / D))
    ln = lambda t, mod: F.layer_norm(t, t.shape[-1:], mod.weight.double(), mod.bias.double())
    for blk in m.encoder:
        x = x + _model_manual_attention(blk.attn, ln(x, blk.ln1), angles)
        h = F.gelu(ln(x, blk.ln2) @ blk.mlp[0].weight.double().T + blk.mlp[0].bias.double())
        x = x + h @ blk.mlp[2].weight.double().T + blk.mlp[2].bias.double()
    return ln(x, m.ln_enc)


@torch.no_grad()
def test_model_plain_encoder_ignores_pitch_and_each_switch_uses_it():
    mel, f0, _ = _model_inputs(B=2, T=33)
    other_f0 = f0.flip(-1) * 1.3
    m = _model_tiny()
    enc = m.encode(mel, f0)[0]
    assert torch.allclose(enc.double(), _model_manual_encoder(m, mel), atol=1e-5), "not a plain RoPE transformer"
    assert torch.equal(enc, m.encode(mel, other_f0)[0]), "with every pitch switch off, f0 must not matter"
    # std frequencies barely move with theta + f0 at theta 1e4 (w_i changes by ~(2i/D) f0/theta), so the
    # std case uses a small theta; mel frequencies are proportional to theta and large, so they move a lot
    for switch in [dict(rope="mel", theta_mod="accumulate"), dict(theta_mod="accumulate", theta=300.0), dict(radii=True),
                   dict(pitch_bias=True), dict(rope="mel", theta_mod="absolute"), dict(radii=True, radius_mode="hz")]:
        m = _model_tiny(**switch)
        diff = (m.encode(mel, f0)[0] - m.encode(mel, other_f0)[0]).abs().max()
        assert diff > 1e-5, f"{switch}: f0 had no effect ({diff:.1e})"  # 100x float32 noise at this scale


def test_model_decoder_never_sees_the_future():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    mel, f0, tokens = _model_inputs(L=12)
    base = m(mel, f0, tokens)
    for t in [0, 4, 10]:
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(4, 24, changed[:, t + 1:].shape)
        out = m(mel, f0, changed)
        assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), f"position <= {t} saw a later token"
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3), "later positions should change"


def test_model_kv_cache_matches_full_forward():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    with torch.no_grad():  # a sharper random output layer makes greedy choices unambiguous
        m.embed.weight.mul_(20)
    mel, f0, tokens = _model_inputs(L=10)
    lengths = torch.tensor([41, 30, 17])
    with torch.no_grad():
        enc, mask = m.encode(mel, f0, lengths)
        full = m.decode(tokens, enc, mask)
        cache = []
        steps = torch.cat([m.decode(tokens[:, t:t + 1], enc, mask, cache=cache) for t in range(10)], dim=1)
        assert torch.allclose(steps, full, atol=1e-4), f"one token at a time: {(steps - full).abs().max():.1e}"
        cache = []
        chunks = torch.cat([m.decode(tokens[:, :6], enc, mask, cache=cache),
                            m.decode(tokens[:, 6:], enc, mask, cache=cache)], dim=1)
        assert torch.allclose(chunks, full, atol=1e-4), "a prefix then a chunk must match too"
        # greedy decoding by full recomputation, written here, against generate() with its cache
        seqs = torch.ones(3, 1, dtype=torch.long)
        for _ in range(15):
            seqs = torch.cat([seqs, m(mel, f0, seqs, lengths)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = []
    for row in seqs[:, 1:].tolist():
        expected.append(row[:row.index(2)] if 2 in row else row)
    assert m.generate(mel, f0, lengths, max_len=15) == expected
    assert m.generate(mel, f0, lengths, max_len=15, use_cache=False) == expected


def test_model_padding_changes_nothing_real():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    mel, f0, tokens = _model_inputs(B=3, T=41)
    lengths = [41, 28, 17]
    with torch.no_grad():
        enc, mask = m.encode(mel, f0, torch.tensor(lengths))
        logits = m.decode(tokens, enc, mask)
        for b, n in enumerate(lengths):
            enc1, _ = m.encode(mel[b:b + 1, :, :n], f0[b:b + 1, :n])
            ne = (n + 1) // 2
            assert torch.allclose(enc[b, :ne], enc1[0], atol=1e-4), f"item {b}: encoder states changed"
            assert torch.allclose(logits[b], m.decode(tokens[b:b + 1], enc1)[0], atol=1e-4), f"item {b}: logits"
        # padding frames filled with anything (here large noise) must not matter either
        noisy = mel.clone()
        noisy[1, :, 28:] = 100 * torch.randn(80, 13)
        assert torch.allclose(m(noisy, f0, tokens, torch.tensor(lengths)), logits, atol=1e-4)


def test_model_shapes_odd_lengths_and_bf16_autocast():
    for B, T in [(1, 1), (1, 7), (3, 40), (3, 51)]:
        m = _model_tiny(**_MODEL_PITCH_SWITCHES)
        mel, f0, tokens = _model_inputs(B=B, T=T, L=5)
        enc, _ = m.encode(mel, f0)
        assert enc.shape == (B, (T + 1) // 2, 32), enc.shape
        assert m(mel, f0, tokens).shape == (B, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(mel, f0, tokens, torch.tensor([51, 40, 33]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = m(mel, f0, tokens, torch.tensor([51, 40, 33]))
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max(), "bf16 result far from float32"


def test_model_default_config_and_learnable_theta():
    m = ASRModel(ModelConfig())
    c = m.config
    assert (c.d_model, c.n_heads, c.n_enc_layers, c.n_dec_layers) == (384, 6, 4, 4)
    per_block = 4 * 384 * 384 + 3 * 384 + 2 * 4 * 384 * 384 + 5 * 384 + 4 * 384  # attention, MLP, 2 LayerNorms
    expected = (80 * 384 * 3 + 384 + 384 * 384 * 3 + 384 + 4 * per_block + 2 * 384
                + 64 * 384 + 4 * (per_block + 4 * 384 * 384 + 3 * 384 + 2 * 384) + 2 * 384)
    assert m.num_params() == expected, (m.num_params(), expected)
    m = _model_tiny(rope="mel", learn_theta=True, theta_mod="accumulate")
    mel, f0, tokens = _model_inputs()
    m(mel, f0, tokens).square().mean().backward()
    assert m.log_theta.grad is not None and m.log_theta.grad.abs() > 0


def test_model_tiny_model_memorises_synthetic_utterances_through_generate():
    corpus = data.synth_corpus(4, seed=7)
    tok = data.Tokenizer.build(corpus.texts)
    batch = data.make_batch(corpus, [0, 1, 2, 3], tok)
    torch.manual_seed(0)
    m = ASRModel(ModelConfig(d_model=64, n_heads=4, n_enc_layers=2, n_dec_layers=2, vocab_size=tok.vocab_size,
                             max_text_len=64, dropout=0.0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    tokens = batch["tokens"]
    targets = [tok.encode(t) for t in corpus.texts]
    for step in range(1, 401):
        logits = m(batch["mel"], batch["f0"], tokens[:, :-1], batch["mel_lengths"])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=tok.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            m.eval()
            hyps = m.generate(batch["mel"], batch["f0"], batch["mel_lengths"], max_len=40)
            m.train()
            if hyps == targets:
                break
    assert hyps == targets, f"after {step} steps generate() gave {[tok.decode(h) for h in hyps]}, not {corpus.texts}"


def test_model_ctc_loss_strips_bos_eos_and_padding():
    m = _model_tiny(ctc=True)
    mel, f0, _ = _model_inputs(B=3, T=41)
    chars = [[5, 6, 7, 7, 8], [9], [10, 11, 12]]
    tokens = torch.zeros(3, 8, dtype=torch.long)
    for b, c in enumerate(chars):
        tokens[b, :len(c) + 2] = torch.tensor([1, *c, 2])
    lengths = torch.tensor([41, 30, 17])
    batch = dict(mel=mel, f0=f0, tokens=tokens, mel_lengths=lengths)
    enc, mask = m.encode(mel, f0, lengths)
    ce = F.cross_entropy(m.decode(tokens[:, :-1], enc, mask).flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
    log_probs = m.ctc_log_probs(enc)
    assert log_probs.shape == (21, 3, 24) and torch.allclose(log_probs.exp().sum(-1), torch.ones(21, 3))
    # CTC with the targets written out as one concatenated sequence (the other layout F.ctc_loss accepts)
    ctc = F.ctc_loss(log_probs, torch.tensor(sum(chars, [])), torch.tensor([21, 15, 9]),
                     torch.tensor([len(c) for c in chars]), blank=0)
    got = train.loss_fn(m, batch, pad_id=0, ctc_weight=0.25)
    assert torch.allclose(got, 0.75 * ce + 0.25 * ctc, atol=1e-5), (got, 0.75 * ce + 0.25 * ctc)
    assert torch.allclose(train.loss_fn(m, batch, pad_id=0), ce, atol=1e-6)


def test_model_bad_input_errors():
    m = _model_tiny()
    mel, f0, tokens = _model_inputs()
    for args, words in [((mel, f0[:, :-1], tokens), "f0 must be"), ((mel, f0, tokens + 30), "tokens must be"),
                        ((mel[:, :40], f0, tokens), "n_mels"), ((mel, f0, tokens.float()), "tokens must be")]:
        _raises(lambda: m(*args), ValueError, words)
    _raises(lambda: ASRModel(ModelConfig(d_model=30, n_heads=4)), ValueError, "heads")


# ----------------------------------------------------------------------------------------------------
# data.py: FLEURS download and preparation (over a real local HTTP server), log-mel, resampling,
# synthetic speech, tokenizer, batches


def _data_wav(x, sr=16000, subtype="PCM_16"):
    """Bytes of a WAV file holding x ((T,) or (T, channels))."""
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _data_targz(path, members):
    """Write a tar.gz of members: name -> bytes (a file), or name -> (TarInfo type,) (a link or a device)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = content[0], "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def _data_tree(root, rows, members, lang="en_us", split="train"):
    """A FLEURS-layout tree: root/data/{lang}/{split}.tsv (rows: lists of columns) + audio/{split}.tar.gz."""
    folder = os.path.join(root, "data", lang)
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    _data_targz(os.path.join(folder, "audio", f"{split}.tar.gz"), members)
    return root


def _data_row(i, name, text, n, gender="FEMALE"):
    spelling = " ".join("|" if c == " " else c for c in text) + " |"
    return [i, name, text.capitalize() + ".", text, spelling, n, gender]


def _data_good_tree(root, n=4, seconds=0.5):
    """n noise WAVs (incompressible, so the archive is big enough to cut half-way) with their rows."""
    rng = np.random.default_rng(0)
    waves = [(0.3 * rng.standard_normal(int(seconds * 16000))).clip(-1, 1) for _ in range(n)]
    members = {f"train/utt{i}.wav": _data_wav(w) for i, w in enumerate(waves)}
    rows = [_data_row(i, f"utt{i}.wav", f"word number {i}", len(w)) for i, w in enumerate(waves)]
    return _data_tree(root, rows, members), waves


@contextlib.contextmanager
def _data_server(directory):
    """A threaded HTTP server on 127.0.0.1 (free port) serving `directory`, with Range support and hooks:
    paths in state['cut'] are cut half-way once, state['ignore_range'] answers Range requests with the
    whole file (status 200); state['log'] lists (path, Range header), state['sent'] counts body bytes."""
    state = dict(log=[], sent=Counter(), cut=set(), ignore_range=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["log"].append((self.path, self.headers.get("Range")))
            path = os.path.join(directory, self.path.lstrip("/"))
            if not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, "rb") as f:
                content = f.read()
            asked = self.headers.get("Range")
            start = 0 if asked is None or state["ignore_range"] else int(asked.split("=")[1].split("-")[0])
            body = content[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state["cut"]:  # promise the whole body, send half, hang up
                state["cut"].discard(self.path)
                body = body[:len(body) // 2]
            self.wfile.write(body)
            state["sent"][self.path] += len(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    try:
        yield state, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


_DATA_ARCHIVE = "/data/en_us/audio/train.tar.gz"


def test_data_download_resumes_a_cut_transfer_and_skips_done_work():
    with tempfile.TemporaryDirectory() as tmp:
        src, waves = _data_good_tree(os.path.join(tmp, "server"))
        size = os.path.getsize(src + _DATA_ARCHIVE)
        with _data_server(src) as (state, url):
            state["cut"].add(_DATA_ARCHIVE)
            folder = data.download_fleurs("en_us", os.path.join(tmp, "data"), ("train",), url, backoff=0.01)
            asked = [r for p, r in state["log"] if p == _DATA_ARCHIVE]
            assert asked == [None, f"bytes={size // 2}-"], f"expected a GET, then a resume from {size // 2}: {asked}"
            sent = state["sent"][_DATA_ARCHIVE]
            assert sent == size, f"{sent} bytes sent for a {size}-byte archive: restarted instead of resumed?"
            for i, w in enumerate(waves):
                x, sr = sf.read(os.path.join(folder, "audio", "train", f"utt{i}.wav"))
                assert sr == 16000 and np.abs(x - w).max() < 1 / 32767, f"utt{i}.wav differs from what was served"
            assert not os.path.exists(os.path.join(folder, "audio", "train.tar.gz")), "archive kept after extraction"
            n = len(state["log"])
            assert data.download_fleurs("en_us", os.path.join(tmp, "data"), ("train",), url) == folder
            assert len(state["log"]) == n, f"a second call made requests: {state['log'][n:]}"


def test_data_download_resumes_across_runs_and_restarts_if_range_is_ignored():
    with tempfile.TemporaryDirectory() as tmp:
        src, _ = _data_good_tree(os.path.join(tmp, "server"))
        size = os.path.getsize(src + _DATA_ARCHIVE)
        root = os.path.join(tmp, "data")
        with _data_server(src) as (state, url):
            state["cut"].add(_DATA_ARCHIVE)  # a run that dies half-way (no retries left) ...
            _raises(lambda: data.download_fleurs("en_us", root, ("train",), url, retries=0), data.DataError,
                    "train.tar.gz")
            part = os.path.join(root, "en_us", "audio", "train.tar.gz.part")
            assert os.path.getsize(part) == size // 2, "the partial download was not kept"
            state["ignore_range"] = True  # ... and a server that then ignores Range: start over, cleanly
            data.download_fleurs("en_us", root, ("train",), url, retries=0)
            assert state["log"][-1] == (_DATA_ARCHIVE, f"bytes={size // 2}-"), f"no resume asked: {state['log'][-1]}"
            assert len(os.listdir(os.path.join(root, "en_us", "audio", "train"))) == 4 + 1, "WAVs + marker expected"


def test_data_corrupt_archive_is_reported_and_not_trusted():
    with tempfile.TemporaryDirectory() as tmp:
        src, _ = _data_good_tree(os.path.join(tmp, "server"))
        with open(src + _DATA_ARCHIVE, "rb") as f:
            good = f.read()
        bad = bytearray(good)
        bad[len(bad) // 2:len(bad) // 2 + 64] = bytes(64)
        with open(src + _DATA_ARCHIVE, "wb") as f:
            f.write(bad)
        root = os.path.join(tmp, "data")
        with _data_server(src) as (state, url):
            _raises(lambda: data.download_fleurs("en_us", root, ("train",), url), data.DataError,
                    "train.tar.gz", "corrupt")
            audio = os.path.join(root, "en_us", "audio")
            assert sorted(os.listdir(audio)) == [], f"something of the corrupt archive was left: {os.listdir(audio)}"
            with open(src + _DATA_ARCHIVE, "wb") as f:  # the mirror is fixed: the next run fetches the archive again
                f.write(good)
            c = data.load_split("fleurs", "train", root, base_url=url)
            assert [p for p, _ in state["log"]].count(_DATA_ARCHIVE) == 2 and len(c) == 4, "not downloaded afresh"


def test_data_unsafe_tar_members_are_refused():
    for member in ("../evil.wav", "/tmp/evil.wav", "train/../../evil.wav", tarfile.SYMTYPE, tarfile.CHRTYPE):
        with tempfile.TemporaryDirectory() as tmp:
            name = member if isinstance(member, str) else "train/link.wav"
            bad = b"RIFF" if isinstance(member, str) else (member,)
            members = {"train/ok.wav": _data_wav(np.zeros(1600)), name: bad}
            src = _data_tree(os.path.join(tmp, "server"), [_data_row(0, "ok.wav", "ok", 1600)], members)
            root = os.path.join(tmp, "deep", "data")
            with _data_server(src) as (state, url):
                _raises(lambda: data.download_fleurs("en_us", root, ("train",), url), data.DataError,
                        "refusing", repr(name))
            written = [os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f == "evil.wav"]
            assert not written, f"{name!r}: wrote {written}"
            assert not os.path.exists(os.path.join(root, "en_us", "audio", "train")), f"{name!r}: split trusted"


def test_data_bad_rows_and_audio_are_counted_not_fatal():
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1)
        good = [(0.2 * rng.standard_normal(n)).clip(-1, 1) for n in (8000, 12000, 30000)]
        t = np.arange(22050) / 44100
        stereo = np.stack([0.6 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], 1)
        nan = np.full(4000, np.nan)
        members = {**{f"train/g{i}.wav": _data_wav(w) for i, w in enumerate(good)},
                   "train/stereo.wav": _data_wav(stereo, 44100), "train/empty.wav": _data_wav(np.zeros(0)),
                   "train/nan.wav": _data_wav(nan, subtype="FLOAT"), "train/junk.wav": b"not a wav at all",
                   "train/tiny.wav": _data_wav(np.zeros(800))}
        rows = [_data_row(i, f"g{i}.wav", f"good {i}", len(w)) for i, w in enumerate(good)]
        rows += [_data_row(3, "stereo.wav", "two channels", 8000), ["4", "short.wav", "too few columns"],
                 _data_row(5, "gone.wav", "no audio", 100), _data_row(6, "empty.wav", "empty", 0),
                 _data_row(7, "nan.wav", "nan", 4000), _data_row(8, "junk.wav", "junk", 10),
                 _data_row(9, "tiny.wav", "tiny", 800)]
        src = _data_tree(os.path.join(tmp, "server"), rows, members)
        root = os.path.join(tmp, "data")
        with _data_server(src) as (state, url):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                c = data.load_split("fleurs", "train", root, base_url=url, max_seconds=1.5)
            want = {"malformed row": 1, "missing audio": 1, "empty audio": 1, "NaN samples": 1,
                    "unreadable audio": 1, "longer than 1.5 s": 1, "shorter than 0.1 s": 1}
            assert dict(c.dropped) == want, f"dropped {dict(c.dropped)}, expected {want}"
            for line, reason in ((5, "malformed"), (6, "missing"), (7, "empty"), (8, "NaN"), (9, "unreadable")):
                assert f"train.tsv line {line}" in out.getvalue() and reason in out.getvalue(), out.getvalue()
            assert c.texts == ["good 0", "good 1", "two channels"], c.texts
            assert np.abs(c.wave(1).numpy() - good[1]).max() <= 1 / 32768, "cached audio differs from the WAV"
            assert c.lengths[2] == 8000 and c.wave(2).dim() == 1, "stereo 44.1 kHz should become 8000 mono samples"
            n = len(state["log"])
            with contextlib.redirect_stdout(io.StringIO()):
                again = data.load_split("fleurs", "train", root, base_url=url)  # from the cache, no network
            assert len(state["log"]) == n and len(again) == 4, "a second load should read the cache only"
            tsv = os.path.join(root, "en_us", "train.tsv")
            with open(tsv, "a") as f:  # the source changed: the cache is rebuilt
                f.write("\t".join(map(str, _data_row(9, "g0.wav", "good again", 8000))) + "\n")
            with contextlib.redirect_stdout(io.StringIO()):
                assert len(data.load_split("fleurs", "train", root, base_url=url)) == 5, "stale cache was used"


def test_data_download_errors_are_clear():
    with tempfile.TemporaryDirectory() as tmp:
        src, _ = _data_good_tree(os.path.join(tmp, "server"))
        with _data_server(src) as (state, url):
            os.environ["FLEURS_BASE_URL"] = url  # the mirror comes from the environment here
            try:
                msg = _raises(lambda: data.download_fleurs("xx_yy", os.path.join(tmp, "data")), data.DataError,
                              "'xx_yy'", "language code", "404")
                assert url in msg, f"the env var's base URL was not used: {msg}"
            finally:
                del os.environ["FLEURS_BASE_URL"]
        with socket.socket() as s:  # a port with nobody listening
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}"
        offline = lambda: data.download_fleurs("en_us", os.path.join(tmp, "data"), ("train",), closed, retries=1,
                                               backoff=0.01)
        _raises(offline, data.DataError, "could not download", "--data synth", "FLEURS_BASE_URL")
        blocker = os.path.join(tmp, "a_file")
        open(blocker, "w").close()
        bad_root = os.path.join(blocker, "data")  # under a plain file: unwritable even for root
        _raises(lambda: data.download_fleurs("en_us", bad_root, ("train",), closed), data.DataError,
                repr(bad_root), "--root")


def _data_numpy_log_mel(x):
    """Independent float64 log-mel: frames by slicing, periodic Hann, rfft, Slaney triangles by np.interp."""
    n_fft, hop, sr = 400, 160, 16000
    xp = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.stack([xp[k * hop:k * hop + n_fft] for k in range(len(x) // hop + 1)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    to_mel = lambda f: f / (200 / 3) if f < 1000 else 15 + np.log(f / 1000) / (np.log(6.4) / 27)
    to_hz = lambda m: m * 200 / 3 if m < 15 else 1000 * np.exp((m - 15) * np.log(6.4) / 27)
    pts = [to_hz(m) for m in np.linspace(to_mel(0.0), to_mel(sr / 2), 82)]
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.stack([np.interp(bins, pts[i:i + 3], [0, 1, 0]) * 2 / (pts[i + 2] - pts[i]) for i in range(80)])
    L = np.log10(np.maximum(fb @ power.T, 1e-10))
    return (np.maximum(L, L.max() - 8) + 4) / 4


def test_data_log_mel_matches_numpy_reference():
    rng = np.random.default_rng(2)
    T = 16000 + 37
    t = np.arange(T) / 16000
    a = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(T)
    b = 0.01 * rng.standard_normal(T) * (t > 0.4)  # quiet, with a silent start: exercises the floor
    got = data.log_mel(torch.tensor(np.stack([a, b]), dtype=torch.float32))
    assert got.shape == (2, 80, T // 160 + 1), got.shape
    for x, g in zip((a, b), got):
        err = np.abs(g.double().numpy() - _data_numpy_log_mel(x)).max()
        assert err < 1e-4, f"log_mel differs from the numpy reference by {err:.2e}"
    assert data.log_mel(torch.zeros(3, 1, 1000)).shape == (3, 1, 80, 7), "leading dims should be kept"
    fb = data.mel_filters().double()  # entries of Whisper's own mel_80 filterbank (its assets/mel_filters.npz)
    assert abs(fb[0, 1] - 0.0248625949) < 1e-8 and int((fb[0] > 0).sum()) == 1, fb[0, :3]
    assert torch.allclose(fb[40, 42:45], torch.tensor([0.0054111048, 0.0147355665, 0.0065181898], dtype=fb.dtype),
                          atol=1e-8) and int((fb[40] > 0).sum()) == 3, fb[40, 40:46]


def test_data_resample_keeps_tone_and_stereo_becomes_mono():
    n = np.arange(44100)
    y = data.resample(torch.tensor(0.5 * np.sin(2 * np.pi * 1000 * n / 44100), dtype=torch.float32), 44100, 16000)
    assert y.shape == (16000,), y.shape
    k = np.arange(16000)
    ideal = 0.5 * np.sin(2 * np.pi * 1000 * k / 16000)
    err = np.abs(y.numpy() - ideal)[500:-500].max()  # away from the edges, where the filter sees zeros
    assert err < 2e-3, f"44.1 kHz -> 16 kHz tone off the ideal by {err:.1e}"
    assert np.abs(np.fft.rfft(y.numpy())).argmax() == 1000, "the tone's frequency moved"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stereo.wav")
        tone = np.sin(2 * np.pi * 440 * n / 44100)
        sf.write(path, np.stack([0.6 * tone, 0.2 * tone], 1), 44100, subtype="FLOAT")
        x = data.load_audio(path)
        assert x.shape == (16000,) and x.dtype == np.float32, (x.shape, x.dtype)
        mono = 0.4 * np.sin(2 * np.pi * 440 * k / 16000)
        assert np.abs(x - mono)[500:-500].max() < 2e-3, "stereo should average to mono (then resample)"


def test_data_synth_f0_is_recovered_by_pitch_tracker():
    c = data.synth_corpus(20, seed=123)
    both = gross = truth_voiced = 0
    for i in range(len(c)):
        est, ref = pitch.f0_autocorr(c.wave(i)), c.f0[i]
        assert ref.shape == est.shape == (c.lengths[i] // 160 + 1,), (ref.shape, est.shape)
        v = (est > 0) & (ref > 0)
        both, truth_voiced = both + int(v.sum()), truth_voiced + int((ref > 0).sum())
        gross += int(((est[v] - ref[v]).abs() > 0.2 * ref[v]).sum())
        assert 60 < ref[ref > 0].min() and ref.max() < 400, "f0 outside the speaker range"
    assert both > 0.8 * truth_voiced, f"only {both} of {truth_voiced} voiced frames found voiced"
    assert gross <= 0.05 * both, f"gross f0 errors on {gross / both:.1%} of {both} frames voiced in both"


def test_data_synth_is_deterministic_and_splits_are_disjoint():
    a, b, other = data.synth_corpus(6, 7), data.synth_corpus(6, 7), data.synth_corpus(6, 8)
    assert a.texts == b.texts and np.array_equal(a.audio, b.audio), "same seed, different corpus"
    assert all(torch.equal(x, y) for x, y in zip(a.f0, b.f0)), "same seed, different f0 tracks"
    assert not np.array_equal(a.audio[:8000], other.audio[:8000]), "different seeds gave the same audio"
    assert all(2 <= len(t.split()) <= 4 and set(t.split()) <= set(data.SYNTH_WORDS) for t in a.texts), a.texts
    assert all(0.5 < n / 16000 < 3 for n in a.lengths) and np.abs(a.audio).max() <= 1, "durations or levels off"
    splits = {s: data.load_split("synth", s, n=30) for s in ("train", "dev", "test")}
    assert len(set(data.SYNTH_SEEDS.values())) == 3, "splits must have their own seeds"
    firsts = {s: [c.wave(i)[:4000].numpy().tobytes() for i in range(len(c))] for s, c in splits.items()}
    for s in firsts:
        for r in firsts:
            assert s == r or not set(firsts[s]) & set(firsts[r]), f"{s} and {r} share an utterance"


def test_data_tokenizer_round_trip_and_unknowns():
    tok = data.Tokenizer.build(["hello world", "abc"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + len(set("hello worldabc")), tok.vocab_size
    assert tok.decode(tok.encode("a cold bell")) == "a cold bell" and tok.unk_count == 0
    ids = tok.encode("héllo!")
    assert ids.count(tok.unk_id) == 2 and tok.unk_count == 2, f"unknowns not mapped/counted: {ids}"
    assert tok.decode(ids) == "hllo", "decode should skip specials"
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, *tok.encode("c")]) == "ab", "stop at EOS"
    again = data.Tokenizer.from_state_dict(tok.state_dict())
    assert again.encode("cab old") == tok.encode("cab old") and again.vocab_size == tok.vocab_size


def test_data_batch_indices_cover_everything_once_deterministically():
    lengths = np.random.default_rng(3).integers(1000, 50000, 1003)
    for shuffle in (True, False):
        batches = data.batch_indices(lengths, 16, shuffle=shuffle, seed=5)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003)), "every index exactly once"
        assert all(1 <= len(b) <= 16 for b in batches)
        assert batches == data.batch_indices(lengths, 16, shuffle=shuffle, seed=5), "not deterministic"
    assert data.batch_indices(lengths, 16, seed=5) != data.batch_indices(lengths, 16, seed=6), "seed ignored"
    pad = lambda bs: sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)
    random_batches = np.array_split(np.random.default_rng(0).permutation(1003), 63)
    assert pad(data.batch_indices(lengths, 16, seed=5)) < 0.2 * pad(random_batches), "batches not length-bucketed"


def test_data_make_batch_pads_and_measures_correctly():
    c = data.synth_corpus(4, seed=11)
    tok = data.Tokenizer.build(c.texts)
    idx = [2, 0, 3]
    b = data.make_batch(c, idx, tok, envelope=True)
    Tm = int(c.lengths[idx].max()) // 160 + 1
    assert b["mel"].shape == (3, 80, Tm) and b["f0"].shape == b["env"].shape == (3, Tm), b["mel"].shape
    assert b["mel_lengths"].tolist() == [int(c.lengths[i]) // 160 + 1 for i in idx], b["mel_lengths"]
    assert b["texts"] == [c.texts[i] for i in idx], b["texts"]
    for row, i in zip(b["tokens"].tolist(), idx):
        want = [1, *tok.encode(c.texts[i]), 2]
        assert row == want + [0] * (len(row) - len(want)), f"tokens {row} for {c.texts[i]!r}"
    for k, i in enumerate(idx):  # padding must not leak into an item's own frames
        n, alone = int(b["mel_lengths"][k]), c.wave(i)
        err = (b["mel"][k, :, :n - 2] - data.log_mel(alone)[:, :n - 2]).abs().max()  # last frames see padding
        assert err < 1e-5, f"item {i}: batched log-mel differs from the item alone by {err:.1e}"
        assert torch.allclose(b["f0"][k, :n], pitch.f0_autocorr(alone), atol=1e-3), f"item {i}: f0 changed by padding"
    g = lambda: torch.Generator().manual_seed(0)
    x, y = (data.make_batch(c, idx, tok, specaugment=True, generator=g())["mel"] for _ in range(2))
    assert torch.equal(x, y), "SpecAugment should be reproducible from the generator"
    masked = (x == 0) & (b["mel"] != 0)
    assert masked.any() and torch.equal(x[~masked], b["mel"][~masked]), "SpecAugment should only zero some cells"


# ----------------------------------------------------------------------------------------------------
# eval.py


def test_eval_wer_cer_hand_computed():
    assert wer("this is a test", "this test") == 0.5  # two deletions / four words
    assert cer("this is a test", "this test") == 5 / 14  # "is a " deleted: five characters / fourteen
    assert wer(["a b", "c d e f"], ["a", "c d e f g"]) == 2 / 6, "corpus level: total edits / total words"
    assert wer("the cat sat", "the bat sat on") == 2 / 3  # one substitution, one insertion
    assert cer("kitten", "sitting") == 3 / 6  # the textbook Levenshtein example
    assert wer("naïve café", "naive café") == 1 / 2 and cer("naïve café", "naive café") == 1 / 10
    assert cer("日本語", "日本") == 1 / 3
    # empty strings as jiwer 4 treats them: no division by zero; with no reference words the rate is
    # the number of edits
    assert wer("", "") == 0.0 and cer("", "") == 0.0
    assert wer("", "a b c") == 3 and cer("", "ab c") == 4
    assert wer("a b", "") == 1.0 and cer("ab", "") == 1.0
    assert wer(["a b", ""], ["a b", "c d"]) == 1.0
    _raises(lambda: wer(["a"], ["a", "b"]), ValueError, "hypotheses")


def _eval_levenshtein_recursive(a, b):
    """Edit distance by the textbook recursion with memoisation: an independent formulation."""

    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_eval_edit_distance_matches_recursive_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc "), size=rng.integers(0, 12)))
        b = "".join(rng.choice(list("abc "), size=rng.integers(0, 12)))
        assert edit_distance(a, b) == _eval_levenshtein_recursive(a, b), (a, b)
        assert edit_distance(a.split(), b.split()) == _eval_levenshtein_recursive(tuple(a.split()), tuple(b.split()))


def test_eval_normalize():
    assert normalize("Hello,  World!  It's\tme.") == "hello world its me"
    assert normalize("  «Ça va?» — oui…  ") == "ça va oui"
    assert normalize("") == ""
    assert normalize("state-of-the-art 3.5") == "stateoftheart 35", "punctuation is deleted, not spaced"


# ----------------------------------------------------------------------------------------------------
# train.py (end to end on synthetic speech, tiny settings)


_TRAIN_TINY = ["--data", "synth", "--synth_train", "24", "--synth_dev", "6", "--synth_test", "6",
               "--d_model", "32", "--n_heads", "2", "--n_enc_layers", "1", "--n_dec_layers", "1",
               "--dropout", "0.1", "--batch_size", "4", "--warmup", "2", "--lr", "3e-3", "--log_interval", "1",
               "--eval_utts", "6", "--device", "cpu"]


def _train_run(argv):
    """Run train.main in-process -> (exit message or None, captured stdout+stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            train.main(argv)
        except SystemExit as e:
            return str(e.code), buf.getvalue()
    return None, buf.getvalue()


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_train_resume_equals_uninterrupted_and_eval_runs():
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        common = _TRAIN_TINY + ["--steps", "8", "--eval_interval", "4", "--rope", "mel", "--radii",
                                "--theta_mod", "--pitch_bias", "--seed", "3"]
        err, out = _train_run(common + ["--out_dir", a])
        assert err is None, out
        real_lr_at = train.lr_at

        def interrupt(run_dir, at, stop):  # stop() during the step after `at` steps are done
            train.lr_at = lambda step, cfg: (stop() if step == at and not train.STOP else None, real_lr_at(step, cfg))[1]
            try:
                return _train_run(common + ["--out_dir", run_dir, "--save_interval", "3"])
            finally:
                train.lr_at = real_lr_at

        def crash():
            raise RuntimeError("killed")
        # b: SIGTERM (what `kill` sends; Ctrl-C takes the same handler) in step 6: finish it, save, exit
        handler_before = signal.getsignal(signal.SIGTERM)
        err, out = interrupt(b, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert err and "interrupted at step 6" in err, (err, out)
        assert torch.load(os.path.join(b, "last.pt"), weights_only=False)["step"] == 6
        assert signal.getsignal(signal.SIGTERM) == handler_before, "the run's handler outlived it"
        # c: killed without warning in step 8: the last.pt of step 6 (save_interval 3, not an eval step) survives
        c = os.path.join(tmp, "c")
        try:
            interrupt(c, 7, crash)
        except RuntimeError:
            pass
        assert torch.load(os.path.join(c, "last.pt"), weights_only=False)["step"] == 6
        la = _train_losses(a)
        assert sorted(la) == list(range(1, 9)), la
        for run in (b, c):
            err, out = _train_run(["--resume", "--out_dir", run])  # settings come from the checkpoint
            assert err is None, out
            with open(os.path.join(run, "log.jsonl")) as f:
                steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
            assert steps == list(range(1, 9)), f"{run}: log.jsonl holds steps {steps}; each should appear once"
            lr = _train_losses(run)
            for step in range(1, 9):
                assert abs(la[step] - lr[step]) < 1e-4, f"{run} step {step}: {la[step]} uninterrupted vs {lr[step]}"
        config = json.load(open(os.path.join(b, "config.json")))
        assert config["resumed"][0]["step"] == 6 and "--resume" in config["resumed"][0]["command"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            evaluation.main(["--ckpt", os.path.join(b, "best.pt"), "--split", "test", "--device", "cpu"])
        summary = json.load(open(os.path.join(b, "eval_test_best.json")))
        assert summary["utterances"] == 6 and 0 <= summary["cer"] and "WER" in buf.getvalue()
        lines = open(os.path.join(b, "eval_test_best.tsv")).read().splitlines()
        assert len(lines) == 7 and lines[0].startswith("reference\thypothesis")
        table = evaluation.compare([a, b])
        assert table.count("\n") == 2, "two runs of one configuration pool into one row"
        row = table.splitlines()[2].split(" | ")  # only b was decoded on test: its cells say n=1
        assert "mel" in row and "+-" in row[10] and "(n=" not in row[10] and row[-1].endswith("(n=1) |"), row
        unfinished = os.path.join(tmp, "d")  # started, never evaluated: counted as a seed, but no numbers
        os.makedirs(unfinished)
        shutil.copy(os.path.join(a, "config.json"), unfinished)
        row = evaluation.compare([a, b, unfinished]).splitlines()[2].split(" | ")
        assert row[8] == "3" and row[10].endswith("(n=2)") and row[-1].endswith("(n=1) |"), row


def test_train_skips_non_finite_losses_then_gives_up():
    real_loss_fn = train.loss_fn
    calls = []

    def flaky(*args, **kwargs):  # NaN on the second step only, then (second run) on every step
        calls.append(1)
        loss = real_loss_fn(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 or len(calls) > 100 else loss
    train.loss_fn = flaky
    try:
        with tempfile.TemporaryDirectory() as tmp:
            err, out = _train_run(_TRAIN_TINY + ["--steps", "4", "--eval_interval", "4", "--out_dir", f"{tmp}/a"])
            assert err is None and "step 1: loss is nan, step skipped" in out, out
            losses = _train_losses(f"{tmp}/a")
            assert math.isnan(losses[2]) and all(math.isfinite(losses[k]) for k in (1, 3, 4)), losses
            calls.extend([1] * 100)
            err, out = _train_run(_TRAIN_TINY + ["--steps", "20", "--eval_interval", "20", "--out_dir", f"{tmp}/b"])
            assert err and "5 non-finite losses in a row" in err, (err, out)
            assert torch.load(f"{tmp}/b/last.pt", weights_only=False)["step"] == 4
    finally:
        train.loss_fn = real_loss_fn


def test_train_bad_input_gives_one_line_errors_and_overwrites_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        err, out = _train_run(_TRAIN_TINY + ["--steps", "2", "--eval_interval", "2", "--out_dir", run])
        assert err is None, out
        last = os.path.join(run, "last.pt")
        before = open(last, "rb").read()
        cases = [
            (["--steps", "2", "--out_dir", run], "already holds a run"),
            (["--resume", "--out_dir", run, "--d_model", "64", "--n_heads", "2"], "different model config"),
            (["--resume", "--out_dir", os.path.join(tmp, "nothing")], "no checkpoint"),
            (["--out_dir", os.path.join(last, "sub")], "cannot write to out_dir"),
            (["--stepz", "3"], "unrecognized arguments"),
            (["--steps", "three"], "invalid int value"),
            (["--rope", "cosine"], "invalid choice"),
        ]
        for argv, words in cases:
            err, out = _train_run(_TRAIN_TINY + argv)
            text = (err or "") + out
            assert words in text, f"{argv}: expected {words!r} in {text!r}"
            assert "Traceback" not in text and len([l for l in text.splitlines() if "error" in l]) == 1, text
        with open(os.path.join(tmp, "corrupt.pt"), "wb") as f:
            f.write(before[:len(before) // 3])
        for path, words in [(os.path.join(tmp, "corrupt.pt"), "not a readable checkpoint"),
                            (os.path.join(tmp, "missing.pt"), "no checkpoint")]:
            try:
                evaluation.load_checkpoint(path)
            except SystemExit as e:
                assert words in str(e) and "\n" not in str(e), str(e)
            else:
                raise AssertionError(f"{path} accepted")
        assert open(last, "rb").read() == before, "a refused command overwrote last.pt"


# ----------------------------------------------------------------------------------------------------
# harness

def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    passed = failed = 0
    t_start = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failing test must not stop the others
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"FAIL {name}: {type(e).__name__}: {e} (line {where.lineno})", flush=True)
    print(f"total {time.time() - t_start:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
