"""Train the pitch-aware speech recogniser.

    python train.py --rope mel --radii                 # FLEURS en_us, one CUDA GPU (downloaded once)
    python train.py --data synth --preset quick        # CPU quick start on built-in synthetic speech, ~4 min
    python train.py --resume --out_dir out/run         # continue an interrupted run exactly

Defaults live in DEFAULTS below (nanoGPT style); every one of them is a --flag. A run directory holds
config.json (all settings and the command line), log.jsonl (one line per log/eval), last.pt and best.pt
(lowest dev WER). last.pt is written every save_interval steps and on Ctrl-C or SIGTERM before exiting.
"""
import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, Tokenizer, batch_indices, load_split, make_batch
from eval import evaluate, load_checkpoint
from model import ASRModel, ModelConfig

DEFAULTS = dict(
    # data
    data="fleurs", lang="en_us", data_dir="data", base_url=None, max_seconds=30.0, specaugment=True,
    synth_train=4000, synth_dev=200, synth_test=200,  # utterances per split with --data synth
    # the pitch switches (all off: a plain RoPE transformer)
    rope="std", band="200-4000", theta=10000.0, learn_theta=False, radii=False, radius_mode="relative",
    theta_mod=None, pitch_bias=False,
    # model
    d_model=384, n_heads=6, n_enc_layers=4, n_dec_layers=4, dropout=0.1,
    # optimisation
    batch_size=32, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup=500, steps=20000, grad_clip=1.0,
    ctc_weight=0.3,  # CTC on the encoder beside the decoder's loss (hybrid CTC/attention): on small data
                     # it gives the encoder a direct signal, and the decoder finds the alignment sooner
    # logging and evaluation
    log_interval=50, eval_interval=1000, eval_utts=200, out_dir="out/run",
    save_interval=250,  # last.pt this often too, so a run killed without warning loses little
    # system
    device="cuda" if torch.cuda.is_available() else "cpu", dtype=None, compile=False, seed=0, resume=False,
)
# The CPU quick start: a small model that learns the synthetic speech in a few minutes on 2 cores.
PRESETS = {"quick": dict(data="synth", d_model=192, n_heads=4, n_enc_layers=2, n_dec_layers=2, dropout=0.0,
                         batch_size=32, lr=2e-3, warmup=100, steps=600, eval_interval=300, eval_utts=100,
                         synth_train=2000, ctc_weight=0.0, out_dir="out/quick"),  # CTC slows it down here
           # the CPU ablation's model: about 14 minutes a run on one core (ablation.sh runs two at once)
           "small": dict(d_model=128, n_heads=4, n_enc_layers=2, n_dec_layers=2, batch_size=16, lr=3e-3,
                         warmup=100, steps=1200, eval_interval=1200, eval_utts=150, out_dir="out/small")}
CHOICES = dict(data=["fleurs", "synth"], rope=["std", "mel"], band=["200-4000", "150-6000", "80-2000", "700-8000"],
               radius_mode=["relative", "hz"], dtype=["fp32", "bf16"])
HELP = dict(ctc_weight="weight of the encoder's CTC loss (0: none; decoding always uses the decoder)",
            theta_mod="pitch-modulated theta: 'accumulate' (default when given, relative) or the seed's 'absolute'",
            preset="start from a preset (quick: CPU quick start on synthetic speech; small: the ablation's model)",
            resume="continue from out_dir/last.pt with its settings",
            save_interval="also write last.pt every this many steps (it is always written at each evaluation)",
            dtype="bf16 autocast (default on CUDA) or fp32 (default on CPU)", base_url="FLEURS mirror")
MAX_BAD_STEPS = 5  # non-finite losses in a row before giving up
SYSTEM = ("device", "dtype", "compile")  # machine settings: never inherited from a resumed run


def parse_args(argv):
    """-> (config, explicit): the full configuration, and the flags given on the command line."""
    ap = argparse.ArgumentParser(description="Train the pitch-aware speech recogniser.")
    ap.add_argument("--preset", choices=sorted(PRESETS), help=HELP["preset"])
    for name, default in DEFAULTS.items():
        flag = "--" + name
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(name))
        elif name == "theta_mod":
            ap.add_argument(flag, nargs="?", const="accumulate", choices=["accumulate", "absolute"], help=HELP[name])
        else:
            kind = type(default) if default is not None else str
            ap.add_argument(flag, type=kind, choices=CHOICES.get(name), default=None, help=HELP.get(name),
                            metavar=None if name in CHOICES else kind.__name__.upper())
    args = vars(ap.parse_args(argv))
    preset = PRESETS.get(args.pop("preset") or "", {})
    explicit = dict(preset, **{k: v for k, v in args.items() if v is not None})
    cfg = dict(DEFAULTS, **explicit)
    cfg["dtype"] = cfg["dtype"] or ("bf16" if cfg["device"].startswith("cuda") else "fp32")
    return cfg, explicit


def model_config(cfg, vocab_size):
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in cfg.items() if k in names}, vocab_size=vocab_size,
                       ctc=cfg["ctc_weight"] > 0)


def lr_at(step, cfg):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    progress = min(1.0, (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"]))
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg):
    """AdamW; weight decay only on matrices and conv kernels, not on norms, biases, embeddings or gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed") else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.98), fused=cfg["device"].startswith("cuda"))


def loss_fn(model, batch, pad_id, ctc_weight=0.0):
    """Teacher-forced cross-entropy of the decoder (predict tokens[1:] from tokens[:-1], padding ignored),
    mixed with CTC on the encoder when ctc_weight > 0: (1 - w) * CE + w * CTC."""
    tokens, lengths = batch["tokens"], batch["mel_lengths"]
    enc, enc_mask = model.encode(batch["mel"], batch["f0"], lengths)
    logits = model.decode(tokens[:, :-1], enc, enc_mask)
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=pad_id)
    if not ctc_weight:
        return ce
    n_chars = (tokens != pad_id).sum(1) - 2  # BOS and EOS are not transcribed by CTC
    ctc = F.ctc_loss(model.ctc_log_probs(enc), tokens[:, 1:], (lengths + 1) // 2, n_chars, blank=pad_id,
                     zero_infinity=True)
    return (1 - ctc_weight) * ce + ctc_weight * ctc


def rng_state():
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, opt, tokenizer, cfg, step, best_wer):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), model_config=asdict(model.config),
                tokenizer=tokenizer.state_dict(), train_config=cfg, step=step, best_wer=best_wer, rng=rng_state())
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def prepare_out_dir(cfg):
    out = cfg["out_dir"]
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir {out!r} ({e.strerror})") from None
    if not cfg["resume"] and os.path.exists(os.path.join(out, "last.pt")):
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out_dir")


def resume(cfg, explicit):
    """Continue out_dir/last.pt: its settings, overridden only by flags given now (machine settings are
    this machine's). Refuses flags that would change the model."""
    path = os.path.join(cfg["out_dir"], "last.pt")
    model, tokenizer, ckpt = load_checkpoint(path, cfg["device"])
    cfg = {**DEFAULTS, **ckpt["train_config"], **{k: cfg[k] for k in SYSTEM}, **explicit}
    wanted = asdict(model_config(cfg, tokenizer.vocab_size))
    clash = {k: (v, wanted[k]) for k, v in ckpt["model_config"].items() if wanted.get(k) != v}
    if clash:
        raise SystemExit(f"error: {path} was trained with a different model config: "
                         + ", ".join(f"{k}={a!r} there but {b!r} now" for k, (a, b) in clash.items()))
    return cfg, model, tokenizer, ckpt


STOP = []  # set by the first Ctrl-C or SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM: what `kill` and job schedulers send


def request_stop(signum, frame):
    """First Ctrl-C (or SIGTERM): finish this step, save last.pt, exit. A second one aborts at once."""
    if STOP:
        raise KeyboardInterrupt
    STOP.append(signum)
    tqdm.write("stopping after this step and saving last.pt (Ctrl-C again to abort without saving)")


def open_log(path, step):
    """log.jsonl for appending, without rows past `step`: those came after the checkpoint we resume from."""
    rows = []
    if step and os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
    log = open(path, "w")
    log.writelines(rows)
    log.flush()
    return log


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, explicit = parse_args(argv)
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
    prepare_out_dir(cfg)
    ckpt = None
    if cfg["resume"]:
        cfg, model, tokenizer, ckpt = resume(cfg, explicit)
    device, out = cfg["device"], cfg["out_dir"]
    torch.manual_seed(cfg["seed"])
    data_args = dict(root=cfg["data_dir"], lang=cfg["lang"], base_url=cfg["base_url"], max_seconds=cfg["max_seconds"])
    synth = cfg["data"] == "synth"
    try:
        train = load_split(cfg["data"], "train", n=cfg["synth_train"] if synth else None, **data_args)
        dev = load_split(cfg["data"], "dev", n=cfg["synth_dev"] if synth else None, **data_args)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt is None:
        tokenizer = Tokenizer.build(train.texts)
        model = ASRModel(model_config(cfg, tokenizer.vocab_size)).to(device)
    opt = make_optimizer(model, cfg)
    step, best_wer = 0, float("inf")
    command = shlex.join(["python", "train.py"] + argv)
    record = dict(command=command, resumed=[], train=cfg, model=asdict(model.config), params=model.num_params())
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        step, best_wer = ckpt["step"], ckpt["best_wer"]
        set_rng_state(ckpt["rng"])
        with open(os.path.join(out, "config.json")) as f:
            record = dict(json.load(f), train=cfg)
        record["resumed"].append(dict(step=step, command=command))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(record, f, indent=1)

    train_loss = torch.compile(loss_fn, dynamic=True) if cfg["compile"] else loss_fn
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg["dtype"] == "bf16")
    dev_idx = list(range(min(cfg["eval_utts"], len(dev))))
    log = open_log(os.path.join(out, "log.jsonl"), step)
    print(f"{cfg['data']}: {len(train)} train / {len(dev)} dev utterances; model {model.num_params() / 1e6:.2f}M "
          f"params; {device} {cfg['dtype']}; steps {step} -> {cfg['steps']}; run dir {out}")

    def save(name):
        save_checkpoint(os.path.join(out, name), model, opt, tokenizer, cfg, step, best_wer)

    def run_eval():
        nonlocal best_wer
        model.eval()
        bs = cfg["batch_size"]
        with torch.no_grad(), autocast:
            losses = [loss_fn(model, make_batch(dev, dev_idx[i:i + bs], tokenizer, device), tokenizer.pad_id).item()
                      for i in range(0, len(dev_idx), bs)]
            r = evaluate(model, dev, tokenizer, dev_idx, bs, device)
        model.train()
        row = dict(step=step, dev_loss=sum(losses) / len(losses), wer=r["wer"], cer=r["cer"])
        log.write(json.dumps(row) + "\n")
        log.flush()
        tqdm.write(f"step {step}: dev loss {row['dev_loss']:.3f}, WER {100 * r['wer']:.1f}%, "
                   f"CER {100 * r['cer']:.1f}% (greedy decoding, {len(dev_idx)} dev utterances)")
        if r["wer"] < best_wer:
            best_wer = r["wer"]
            save("best.pt")

    STOP.clear()
    previous_handlers = [signal.signal(s, request_stop) for s in STOP_SIGNALS]
    model.train()
    epoch_len = len(batch_indices(train.lengths, cfg["batch_size"], shuffle=True, seed=cfg["seed"]))
    bar = tqdm(total=cfg["steps"], initial=step, desc="train", dynamic_ncols=True)
    bad, audio_s, t0, first = 0, 0.0, time.time(), step
    try:
        while step < cfg["steps"] and not STOP:
            epoch, pos = divmod(step, epoch_len)
            if pos == 0 or step == first:  # an epoch's batch order depends on (seed, epoch) alone
                order = batch_indices(train.lengths, cfg["batch_size"], shuffle=True, seed=cfg["seed"] + epoch)
            batch = make_batch(train, order[pos], tokenizer, device, specaugment=cfg["specaugment"])
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:
                loss = train_loss(model, batch, tokenizer.pad_id, cfg["ctc_weight"])
            value = loss.item()  # the one device sync of the step
            if math.isfinite(value):
                bad = 0
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                opt.step()
            else:
                bad += 1
                tqdm.write(f"warning: step {step}: loss is {value}, step skipped")
                if bad >= MAX_BAD_STEPS:
                    save("last.pt")
                    raise SystemExit(f"error: {bad} non-finite losses in a row at step {step}; "
                                     "try a lower --lr or --dtype fp32 (last.pt saved)")
            opt.zero_grad(set_to_none=True)
            step += 1
            audio_s += float(train.lengths[order[pos]].sum()) / 16000
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.1e}", audio=f"{audio_s / (time.time() - t0):.0f}x")
            if step % cfg["log_interval"] == 0:
                log.write(json.dumps(dict(step=step, loss=value, lr=lr)) + "\n")
            if step % cfg["eval_interval"] == 0 or step == cfg["steps"]:
                run_eval()
                save("last.pt")
            elif step % cfg["save_interval"] == 0:
                save("last.pt")
    finally:
        for s, handler in zip(STOP_SIGNALS, previous_handlers):
            signal.signal(s, handler)
        bar.close()
    log.close()
    if STOP:  # a finished run saved last.pt at its final evaluation
        save("last.pt")
        raise SystemExit(f"interrupted at step {step}; saved {out}/last.pt (continue with --resume --out_dir {out})")
    print(f"done: best dev WER {100 * best_wer:.1f}%; checkpoints in {out}")


if __name__ == "__main__":
    main()
