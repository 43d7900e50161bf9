"""Throughput figures for the README: features, training step per pitch configuration, greedy decoding.

    python bench.py                      # this machine's CPU
    python bench.py --device cuda        # a GPU (bf16 autocast for the training step)

Every figure is the median over repeats after warm-up iterations, measured in one run on one machine;
on CUDA each timing synchronises the device first.
"""
import argparse
import os
import platform
import resource
import statistics
import time
from dataclasses import replace

import torch

from data import SR, Tokenizer, log_mel
from model import ASRModel, ModelConfig
from pitch import envelope, f0_autocorr
from train import loss_fn

CONFIGS = {  # the ablation's five configurations, each adding one switch
    "std": dict(),
    "mel": dict(rope="mel"),
    "mel + radii": dict(rope="mel", radii=True),
    "mel + radii + theta_mod": dict(rope="mel", radii=True, theta_mod="accumulate"),
    "all + pitch_bias": dict(rope="mel", radii=True, theta_mod="accumulate", pitch_bias=True),
}


def machine(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def timed(fn, device, warmup=2, repeats=5):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speech_like(n, seconds, device, seed=0):
    """n clips of a harmonic tone at a gliding pitch with noise: a realistic load for the pitch tracker."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 100 + 100 * torch.rand(n, 1, generator=g) + 30 * torch.sin(2 * torch.pi * 0.5 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, dim=-1) / SR
    wave = sum(torch.sin(k * phase) / k for k in range(1, 8)) + 0.05 * torch.randn(n, len(t), generator=g)
    return (0.3 * wave).to(device)


def bench_features(device, n=100, seconds=4.0):
    waves = speech_like(n, seconds, device)
    audio = n * seconds
    rows = []
    for name, fn in [("log_mel", log_mel), ("f0_autocorr", f0_autocorr), ("envelope", envelope)]:
        batch = timed(lambda: fn(waves), device, warmup=1, repeats=3)
        single = timed(lambda: [fn(w) for w in waves], device, warmup=1, repeats=3)
        rows.append(f"| {name} | {audio / batch:,.0f}x | {audio / single:,.0f}x |")
    return [f"Feature extraction, {n} clips of {seconds:g} s (x real time = seconds of audio per second)",
            "| feature | as one batch | one clip at a time |", "|---|---|---|"] + rows


def batch_for(config, B, seconds, L, device):
    T = int(seconds * SR) // 160 + 1
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(B, config.n_mels, T, generator=g).to(device)
    f0 = (90 + 200 * torch.rand(B, T, generator=g)).masked_fill(torch.rand(B, T, generator=g) < 0.3, 0).to(device)
    tokens = torch.randint(4, config.vocab_size, (B, L + 1), generator=g).to(device)
    lengths = torch.full((B,), T, device=device)
    lengths[0] = T * 3 // 4  # one padded item, as in real batches
    return mel, f0, tokens, lengths


def bench_training(device, base, B, seconds, L, dtype):
    rows, ref = [], None
    for name, switches in CONFIGS.items():
        config = replace(base, **switches)
        torch.manual_seed(0)
        model = ASRModel(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mel, f0, tokens, lengths = batch_for(config, B, seconds, L, device)
        batch = dict(mel=mel, f0=f0, tokens=tokens, mel_lengths=lengths)

        def step():
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = loss_fn(model, batch, Tokenizer.pad_id)  # the training loss, decoder only
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, device)
        ref = ref or t
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else "-"
        rows.append(f"| {name} | {1000 * t:.0f} ms | {t / ref:.2f} | {peak} |")
    return [f"Training step (forward + backward + AdamW), batch {B} x {seconds:g} s, {L} tokens, {dtype}, "
            f"d_model {base.d_model}, {base.n_enc_layers}+{base.n_dec_layers} layers",
            "| configuration | step | / std | peak GPU memory |", "|---|---|---|---|"] + rows


def bench_decoding(device, base, B, seconds, tokens=100):
    # eos_id -1 is never produced, so every sequence decodes exactly `tokens` tokens
    config = replace(base, eos_id=-1, dropout=0.0, **CONFIGS["all + pitch_bias"])
    model = ASRModel(config).to(device).eval()
    mel, f0, _, lengths = batch_for(config, B, seconds, 1, device)
    cached = timed(lambda: model.generate(mel, f0, lengths, max_len=tokens), device, warmup=1, repeats=3)
    full = timed(lambda: model.generate(mel, f0, lengths, max_len=tokens, use_cache=False), device, warmup=1, repeats=3)
    return [f"Greedy decoding of {tokens} tokens, batch {B} x {seconds:g} s (full pitch-aware model)",
            "| decoder | time | tokens/s | speed-up |", "|---|---|---|---|",
            f"| KV cache | {cached:.2f} s | {B * tokens / cached:,.0f} | {full / cached:.1f}x |",
            f"| recompute the prefix | {full:.2f} s | {B * tokens / full:,.0f} | 1.0x |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="training/decoding batch (default 8 on CPU, 32 on CUDA)")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length for the training and decoding rows")
    ap.add_argument("--d_model", type=int, default=384)
    ap.add_argument("--n_heads", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each")
    ap.add_argument("--skip", nargs="*", default=[], choices=["features", "training", "decoding"])
    args = ap.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    B = args.batch or (32 if cuda else 8)
    base = ModelConfig(d_model=args.d_model, n_heads=args.n_heads, n_enc_layers=args.layers,
                       n_dec_layers=args.layers, vocab_size=40, dropout=0.0)
    print(f"machine: {machine(device)}")
    sections = []
    if "features" not in args.skip:
        sections.append(bench_features(device))
    if "training" not in args.skip:
        sections.append(bench_training(device, base, B, args.seconds, 60, "bf16" if cuda else "fp32"))
    if "decoding" not in args.skip:
        sections.append(bench_decoding(device, base, B, args.seconds))
    for lines in sections:
        print("\n" + "\n".join(lines))
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if cuda
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process peak)")
    print(f"\npeak memory: {peak}")


if __name__ == "__main__":
    main()
