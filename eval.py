"""Honest WER/CER from real greedy decoding, and a table comparing runs.

    python eval.py --ckpt out/run/best.pt [--split test]   # decode a split, print WER/CER, write a TSV
    python eval.py --compare out/a out/b ...               # markdown table of runs, mean +- std over seeds

Error rates are corpus-level, as jiwer defines them: the sum of Levenshtein edits over all utterances
divided by the total number of reference words (WER) or characters (CER, spaces included). When the
references hold no words at all, the rate is the number of edits (jiwer's convention), never a division
by zero. Both sides are normalised first (see normalize).
"""
import argparse
import json
import os
import statistics
import time
import unicodedata

import torch
from tqdm import tqdm

from data import DataError, Tokenizer, load_split, make_batch
from model import ASRModel, ModelConfig

MAX_CHARS_PER_SECOND = 40  # fast read speech is ~15 characters per second


def normalize(text):
    """Lowercase, delete punctuation (Unicode category P*: . , ? ! ' " - and the like), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences: the fewest substitutions, deletions and insertions."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _error_rate(refs, hyps, split):
    if isinstance(refs, str):
        refs, hyps = [refs], [hyps]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    return edits / max(sum(len(split(r)) for r in refs), 1)


def wer(refs, hyps):
    """Word error rate: sum of word-level edits / total reference words (strings or lists of strings)."""
    return _error_rate(refs, hyps, str.split)


def cer(refs, hyps):
    """Character error rate: sum of character-level edits / total reference characters, spaces included."""
    return _error_rate(refs, hyps, lambda s: list(s.strip()))


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py -> (model, tokenizer, checkpoint dict). Clear errors if unusable."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        config = ModelConfig(**ckpt["model_config"])
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    except Exception as e:  # truncated file, not a checkpoint, fields from another version
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    model = ASRModel(config).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise SystemExit(f"error: {path} does not fit its own model config ({first})") from None
    return model, tokenizer, ckpt


@torch.no_grad()
def transcribe(model, corpus, tokenizer, indices=None, batch_size=32, device="cpu", max_len=None):
    """Greedy-decode the utterances of corpus (all, or the given indices) -> list of hypothesis strings."""
    model.eval()
    indices = list(range(len(corpus))) if indices is None else list(indices)
    order = sorted(indices, key=lambda i: corpus.lengths[i])  # similar lengths batch with little padding
    hyps = {}
    for start in tqdm(range(0, len(order), batch_size), desc="decoding", leave=False, disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        b = make_batch(corpus, idx, tokenizer, device=device)
        # cap runaway hypotheses by the audio's duration (never by the reference's length)
        cap = max_len or int(MAX_CHARS_PER_SECOND * max(corpus.lengths[i] for i in idx) / 16000) + 10
        out = model.generate(b["mel"], b["f0"], b["mel_lengths"], max_len=cap)
        hyps.update((i, tokenizer.decode(seq)) for i, seq in zip(idx, out))
    return [hyps[i] for i in indices]


def evaluate(model, corpus, tokenizer, indices=None, batch_size=32, device="cpu"):
    """WER and CER of greedy decoding over corpus -> dict(wer, cer, refs, hyps, seconds, audio_seconds)."""
    indices = list(range(len(corpus))) if indices is None else list(indices)
    t0 = time.time()
    hyps = transcribe(model, corpus, tokenizer, indices, batch_size, device)
    seconds = time.time() - t0
    refs = [normalize(corpus.texts[i]) for i in indices]
    hyps = [normalize(h) for h in hyps]
    return dict(wer=wer(refs, hyps), cer=cer(refs, hyps), refs=refs, hyps=hyps, seconds=seconds,
                audio_seconds=float(sum(corpus.lengths[i] for i in indices)) / 16000)


def _fmt(values, pct=True, digits=1):
    """'12.3' for one value, '12.3 +- 0.4' (mean +- sample std) for several; as percentages if pct.
    Missing values (None: a run not evaluated yet) are left out and the count that remains is shown."""
    present = [100 * v if pct else v for v in values if v is not None]
    if not present:
        return "-"
    text = (f"{present[0]:.{digits}f}" if len(present) == 1 else
            f"{statistics.mean(present):.{digits}f} +- {statistics.stdev(present):.{digits}f}")
    return text if len(present) == len(values) else f"{text} (n={len(present)})"


def read_run(run_dir):
    """A run's configuration, best dev WER/CER from its log and any eval_*.json summaries."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} is not a run directory (no config.json)")
    with open(path) as f:
        run = dict(config=json.load(f)["train"], dev_loss=None, dev_wer=None, dev_cer=None, evals={})
    log = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            evals = [r for r in map(json.loads, f) if "wer" in r]
        if evals:
            best = min(evals, key=lambda r: r["wer"])
            run["dev_loss"], run["dev_wer"], run["dev_cer"] = best["dev_loss"], best["wer"], best["cer"]
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("eval_") and name.endswith(".json"):
            with open(os.path.join(run_dir, name)) as f:
                run["evals"][name[5:-5]] = json.load(f)
    return run


COMPARE_KEYS = ["data", "rope", "band", "radii", "theta_mod", "pitch_bias", "d_model", "steps"]


def compare(run_dirs):
    """Markdown table: one row per configuration, seeds pooled as mean +- std."""
    groups = {}
    for d in run_dirs:
        run = read_run(d)
        key = tuple(str(run["config"].get(k)) for k in COMPARE_KEYS)
        groups.setdefault(key, []).append(run)
    eval_names = sorted({name for runs in groups.values() for r in runs for name in r["evals"]})
    head = (COMPARE_KEYS + ["seeds", "dev loss", "dev WER %", "dev CER %"]
            + [f"{n} {m} %" for n in eval_names for m in ("WER", "CER")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in groups.items():
        cells = list(key) + [str(len(runs)), _fmt([r["dev_loss"] for r in runs], pct=False, digits=3),
                             _fmt([r["dev_wer"] for r in runs]), _fmt([r["dev_cer"] for r in runs])]
        for n in eval_names:
            cells += [_fmt([r["evals"].get(n, {}).get(m) for r in runs]) for m in ("wer", "cer")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Greedy-decoding WER/CER of a checkpoint, or a comparison of runs.")
    ap.add_argument("--ckpt", help="checkpoint written by train.py (e.g. out/run/best.pt)")
    ap.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_utts", type=int, default=None, help="decode only the first N utterances")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data_dir", default=None, help="override the data directory recorded in the run")
    ap.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print a table of these runs")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return
    if not args.ckpt:
        ap.error("give --ckpt PATH or --compare RUN_DIR ...")
    model, tokenizer, ckpt = load_checkpoint(args.ckpt, args.device)
    cfg = ckpt["train_config"]
    try:
        corpus = load_split(cfg["data"], args.split, root=args.data_dir or cfg["data_dir"], lang=cfg["lang"],
                            base_url=cfg["base_url"], max_seconds=cfg["max_seconds"],
                            n=cfg[f"synth_{args.split}"] if cfg["data"] == "synth" else None)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    n = len(corpus) if args.max_utts is None else min(args.max_utts, len(corpus))
    r = evaluate(model, corpus, tokenizer, range(n), args.batch_size, args.device)
    unk = tokenizer.unk_count
    print(f"{args.ckpt} on {cfg['data']} {args.split}: {n} utterances, WER {100 * r['wer']:.2f}%, "
          f"CER {100 * r['cer']:.2f}%, decoding {r['audio_seconds'] / r['seconds']:.1f}x real time "
          f"({n / r['seconds']:.1f} utt/s on {args.device})" + (f", {unk} unknown characters" if unk else ""))
    run_dir, name = os.path.dirname(args.ckpt) or ".", os.path.splitext(os.path.basename(args.ckpt))[0]
    stem = os.path.join(run_dir, f"eval_{args.split}_{name}")
    with open(stem + ".tsv", "w") as f:
        f.write("reference\thypothesis\tword_edits\tref_words\tchar_edits\tref_chars\n")
        for ref, hyp in zip(r["refs"], r["hyps"]):
            f.write(f"{ref}\t{hyp}\t{edit_distance(ref.split(), hyp.split())}\t{len(ref.split())}\t"
                    f"{edit_distance(ref, hyp)}\t{len(ref)}\n")
    with open(stem + ".json", "w") as f:
        json.dump(dict(wer=r["wer"], cer=r["cer"], utterances=n, step=ckpt["step"],
                       real_time_factor=r["audio_seconds"] / r["seconds"]), f, indent=1)
    print(f"wrote {stem}.tsv and {stem}.json")


if __name__ == "__main__":
    main()
