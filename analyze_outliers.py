"""Analyse the systematic outliers of a checkpoint (any attention variant) or of OpenAI GPT-2.

    python analyze_outliers.py out/run/ckpt.pt --data data/openwebtext/val.bin --out out/run/outliers
    python analyze_outliers.py --pretrained gpt2 --text_file ../shared/data/wikitext-2/test.txt
    python analyze_outliers.py --compare a/ckpt.pt b/ckpt.pt --data data/X/val.bin --out out/compare

Reproduces the analyses of An et al., "Systematic Outliers in Large Language Models" (ICLR 2025,
Sec. 3-4: activation / weight / attention outliers, their consistency (Table 1), lifecycle and the
per-variant comparison of Figure 11) and of "Rethinking the Outlier Distribution in LLMs" (massive
activations generated in early layers and carried by the residual stream; channel-wise outliers from
LayerNorm rescaling). Definitions: see outlier_stats.py. Streams over sequences: one forward per
batch with hooks, per-layer accumulators, capped outlier lists; memory does not grow with
--num_seqs. Writes DIR/report.md, DIR/outliers.json and PNG figures, atomically (a temporary
directory beside DIR renamed at the end; nothing is left behind on error).
"""

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from common import UserError, autocast_context, cli_main, json_safe, resolve_device, resolve_dtype, run_metadata
from data import input_tokens

FORMAT = "outlier-gpt/outliers"
FORMAT_VERSION = 1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint of this repo (any attention variant)")
    p.add_argument("--pretrained", help="OpenAI GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local Hugging Face GPT-2 directory")
    p.add_argument("--attention", default="default", help="attention variant for --pretrained (default: default)")
    p.add_argument("--compare", nargs="+", metavar="CKPT", help="draw top-3 activation per layer of several checkpoints on one figure (Figure 11)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="prepared token file (uint16 .bin)")
    src.add_argument("--text_file", help="UTF-8 text file")
    src.add_argument("--text", help="text given on the command line")
    p.add_argument("--num_seqs", type=int, default=100, help="number of sequences (default 100)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the block size)")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per forward (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tau", type=float, default=1000.0, help="outlier threshold tau (default 1000, the paper's)")
    p.add_argument("--tau_activation", type=float, default=None, help="tau for activation outliers (default --tau)")
    p.add_argument("--tau_weight", type=float, default=None, help="tau for weight outliers (default --tau)")
    p.add_argument("--tau_attention", type=float, default=None, help="tau_A for attention outliers (default --tau)")
    p.add_argument("--tau_channel", type=float, default=10.0,
                   help="LayerNorm channel-wise outliers: mean |y_c| over tokens > tau_channel x median over channels (default 10)")
    p.add_argument("--intervene", choices=["none", "zero", "mean"], default="none",
                   help="set the massive activations to zero / their mean where they are generated and report the loss change")
    p.add_argument("--surface_layer", type=int, default=None, help="layer of the 3-D magnitude plot (default: largest top-1)")
    p.add_argument("--max_list", type=int, default=100, help="outliers kept in each list of outliers.json (largest first; totals are counted)")
    p.add_argument("--out", help="output directory (default: beside the checkpoint, or out/outliers_<name>)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("tau_activation", "tau_weight", "tau_attention"):
        if getattr(args, name) is None:
            setattr(args, name, args.tau)
    return args


def validate_args(args):
    n_models = sum(x is not None for x in (args.ckpt, args.pretrained, args.compare))
    if n_models != 1:
        raise UserError("give exactly one of: a checkpoint path, --pretrained NAME, or --compare CKPT CKPT ...")
    for name in ("tau", "tau_activation", "tau_weight", "tau_attention", "tau_channel"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{name} must be a positive number, not {v}")
    if args.num_seqs < 1:
        raise UserError(f"--num_seqs must be at least 1, not {args.num_seqs}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq_len must be at least 1, not {args.seq_len}")
    if args.batch_size < 0:
        raise UserError("--batch_size must be >= 0 (0 = automatic)")
    if args.max_list < 1:
        raise UserError("--max_list must be at least 1")
    if args.data is None and args.text_file is None and args.text is None:
        raise UserError("no data: give --data FILE.bin, --text_file FILE or --text 'some text'")
    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty; give some text to analyse")
    from checkpoint import check_checkpoint_path
    for path in [args.ckpt] + list(args.compare or []):
        if path is not None:
            check_checkpoint_path(path)
    for path, flag in ((args.data, "--data"), (args.text_file, "--text_file")):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist")
    if args.out is None:
        if args.ckpt:
            args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "outliers")
        elif args.pretrained:
            args.out = os.path.join("out", "outliers_" + os.path.basename(os.path.normpath(args.pretrained)))
        else:
            args.out = os.path.join("out", "outliers_compare")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a directory")


# ----------------------------------------------------------------------------------------------
# inputs

def model_and_info(args, path, device):
    """(model on device in eval mode, model info for outliers.json) of checkpoint `path`, or of --pretrained."""
    from checkpoint import load_model
    if path is not None:
        model, ckpt = load_model(path, device=device)
        info = {"source": os.path.abspath(path), "iter_num": ckpt.get("iter_num")}
    else:
        model, _ = load_model(pretrained=args.pretrained, device=device, attention=args.attention)
        info = {"source": args.pretrained, "iter_num": None}
    cfg = model.config
    info.update(attention=cfg.attention, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                block_size=cfg.block_size, vocab_size=cfg.vocab_size, bias=cfg.bias)
    return model, info


def load_sequences(args, block_size):
    """-> (int64 array (N, seq_len + 1), data info dict). Inputs are [:, :-1], targets [:, 1:]."""
    if args.seq_len is not None and args.seq_len > block_size:
        raise UserError(f"--seq_len {args.seq_len} is above the model's block size {block_size}; use --seq_len {block_size} or less")
    seq_len = args.seq_len or block_size
    rng = np.random.default_rng(args.seed)
    if args.data is not None:
        tokens = input_tokens(data=args.data)  # memory-mapped: only the drawn windows are read
        if len(tokens) < seq_len + 1:
            raise UserError(f"{args.data} holds {len(tokens)} tokens; a sequence needs seq_len + 1 = {seq_len + 1}: "
                            f"lower --seq_len")
        starts = rng.integers(0, len(tokens) - seq_len, size=args.num_seqs)
        seqs = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        source = os.path.abspath(args.data)
    else:
        ids = input_tokens(text_file=args.text_file, text=args.text)
        if len(ids) < 2:
            raise UserError("the text is a single token; give at least two tokens of text")
        if len(ids) < seq_len + 1:
            if args.seq_len is not None:
                print(f"note: the text has {len(ids)} tokens; using one sequence of {len(ids) - 1}", file=sys.stderr)
            seq_len = len(ids) - 1
        n = min(args.num_seqs, (len(ids) - 1) // seq_len)
        seqs = np.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
        source = os.path.abspath(args.text_file) if args.text_file is not None else "--text"
    info = {"source": source, "num_seqs": int(seqs.shape[0]), "seq_len": int(seq_len),
            "tokens": int(seqs.shape[0] * seq_len), "seed": args.seed}
    return seqs, info


def make_token_info():
    import outlier_stats
    try:
        from tokenizer import get_tokenizer
        enc = get_tokenizer()
    except UserError as e:
        print(f"warning: token strings unavailable ({e}); tokens are shown as <id>", file=sys.stderr)
        return outlier_stats.TokenInfo(None)

    def decode_one(token_id):
        return enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
    return outlier_stats.TokenInfo(decode_one)


def batches(seqs, batch_size, device):
    import torch
    for i in range(0, len(seqs), batch_size):
        chunk = torch.from_numpy(seqs[i:i + batch_size])
        yield chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def progress(total, disable, desc):
    from tqdm import tqdm
    return tqdm(total=total, disable=disable, desc=desc, unit="seq", file=sys.stderr, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# atomic output directory

@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; renamed to `path` on success, removed on failure."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# analysis

def analyse(args, model, seqs, device, dtype, token_info):
    import outlier_stats
    bs = args.batch_size or (8 if device.startswith("cuda") else 1)
    an = outlier_stats.OutlierAnalyzer(
        model, tau_act=args.tau_activation, tau_weight=args.tau_weight, tau_attn=args.tau_attention,
        tau_channel=args.tau_channel, max_list=args.max_list, token_info=token_info, seq_len=seqs.shape[1] - 1)
    t0 = time.time()
    with progress(len(seqs), args.no_progress, "analysing") as bar:
        for X, _ in batches(seqs, bs, device):
            an.run_batch(X, autocast=autocast_context(device, dtype))
            bar.update(X.shape[0])
    result = an.result()
    timing = {"analysis_s": time.time() - t0}
    if args.intervene != "none":
        t0 = time.time()
        means = an.lifecycle.generated_means() if args.intervene == "mean" else None
        result["intervention"] = intervene(args, model, seqs, bs, device, dtype, means)
        timing["intervention_s"] = time.time() - t0
    return an, result, timing


def intervene(args, model, seqs, bs, device, dtype, means):
    """Mean loss over the sequences without and with the intervention, both through the model's
    usual attention backend (the analysis pass runs the reference path, which differs slightly)."""
    import torch
    import outlier_stats

    def mean_loss(desc):
        total = 0.0
        with progress(len(seqs), args.no_progress, desc) as bar, torch.no_grad():
            for X, Y in batches(seqs, bs, device):
                with autocast_context(device, dtype):
                    _, loss = model(X, Y)
                total += float(loss) * X.shape[0]
                bar.update(X.shape[0])
        return total / len(seqs)

    base = mean_loss("loss")
    with outlier_stats.Intervention(model, args.tau_activation, args.intervene, means) as iv:
        changed = mean_loss(f"loss with intervention ({args.intervene})")
    return {"mode": args.intervene, "activations_changed": iv.count,
            "loss": base, "perplexity": math.exp(min(base, 700)),
            "loss_intervened": changed, "perplexity_intervened": math.exp(min(changed, 700)),
            "loss_change": changed - base}


def build_json(args, model_info, data_info, an, res, timing):
    act = {"layer_output": res["layer_output"], "down_input": res["down_input"]}
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": model_info,
        "data": data_info,
        "tau": args.tau,
        "tau_by_type": {"activation": args.tau_activation, "weight": args.tau_weight,
                        "attention": args.tau_attention, "channel": args.tau_channel},
        "activation": act,
        "weight": res["weight"],
        "attention": res["attention"],
        "consistency": res["consistency"],
        "lifecycle": res["lifecycle"],
        "normalization": res["normalization"],
        "intervention": res.get("intervention"),
        "surface": {"layer": None, "tokens": None},
        "timing": timing,
        "meta": run_metadata(args.device_resolved),
    }


# ----------------------------------------------------------------------------------------------
# figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    _plt().close(fig)
    return name


def fig_activation(out_dir, acc, title, name):
    plt = _plt()
    top3, med = np.asarray(acc["top3"]), np.asarray(acc["median"])
    L = len(med)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(L)
    for k, (label, marker) in enumerate((("top 1", "o"), ("top 2", "s"), ("top 3", "^"))):
        ax.plot(x, top3[:, k], marker=marker, label=label)
    ax.plot(x, med, marker="x", color="gray", label="median")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| (mean over sequences)")
    ax.set_title(title)
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def fig_surface(out_dir, surface, layer, token_text, name="surface.png"):
    plt = _plt()
    z = surface[layer]  # (S, C)
    S, C = z.shape
    step = max(1, math.ceil(C / 256))
    if step > 1:  # max-pool channel bins so that spikes survive the downsampling
        pad = (-C) % step
        z = np.pad(z, ((0, 0), (0, pad))).reshape(S, -1, step).max(-1)
    tt, cc = np.meshgrid(np.arange(z.shape[0]), np.arange(z.shape[1]) * step, indexing="ij")
    fig = plt.figure(figsize=(7, 5))
    ax = fig.add_subplot(111, projection="3d")
    ax.plot_surface(cc, tt, z, cmap="viridis", linewidth=0, antialiased=False)
    ax.set_xlabel("channel" + (f" (max over bins of {step})" if step > 1 else ""))
    ax.set_ylabel("token position")
    ax.set_zlabel("|h|")
    ax.set_title(f"layer {layer} output, first sequence, first {S} tokens")
    return _save(fig, out_dir, name)


def fig_weights(out_dir, weight, name="weights.png"):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for module, res in weight.items():
        ax.plot(res["extremal_ratio"], marker="o", label=module)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max over columns of max|w|/mean|w|")
    ax.set_title("weight extremal ratio by layer and module")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def fig_attention(out_dir, att, name="attention.png"):
    plt = _plt()
    top2, med = np.asarray(att["top2"]), np.asarray(att["median"])
    x = np.arange(len(med))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, top2[:, 0], marker="o", label="top 1")
    ax.plot(x, top2[:, 1], marker="s", label="top 2")
    ax.plot(x, med, marker="x", color="gray", label="median")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("cumulative attention (head mean)")
    ax.set_title("cumulative attention per key: top-2 and median by layer")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def fig_heads(out_dir, att, name="attention_heads.png"):
    plt = _plt()
    ratio = np.asarray(att["head_top1"]) / np.maximum(np.asarray(att["head_median"]), 1e-12)
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(np.log10(np.maximum(ratio, 1e-12)), aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label="log10(top-1 / median) of cumulative attention")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("per-head spread of cumulative attention")
    return _save(fig, out_dir, name)


def fig_categories(out_dir, groups, name="token_categories.png"):
    plt = _plt()
    import outlier_stats
    cats = outlier_stats.CATEGORIES
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(groups), 1)
    for i, (label, counts) in enumerate(groups.items()):
        total = max(sum(counts.values()), 1)
        ax.bar(np.arange(len(cats)) + i * width, [counts[c] / total for c in cats], width, label=f"{label} (n={total})")
    ax.set_xticks(np.arange(len(cats)) + width * (len(groups) - 1) / 2)
    ax.set_xticklabels(cats)
    ax.set_ylabel("share of outlier tokens")
    ax.set_title("token categories of outlier-carrying tokens")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def fig_lifecycle(out_dir, lifecycle, name="lifecycle.png"):
    plt = _plt()
    entries = lifecycle[:3]
    fig, axes = plt.subplots(len(entries), 1, figsize=(7, 2.8 * len(entries)), squeeze=False)
    for ax, e in zip(axes[:, 0], entries):
        L = len(e["trajectory"])
        x = np.arange(L)
        ax.bar(x - 0.2, e["attn_contrib"], 0.4, label="attention branch")
        ax.bar(x + 0.2, e["mlp_contrib"], 0.4, label="MLP branch")
        ax.plot(x, e["trajectory"], marker="o", color="k", label="h after layer")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xticks(x)
        gen = e["generated_at"]
        ax.set_title(f"position {e['position']} ({e['token']!r}), channel {e['channel']}: "
                     f"generated at layer {gen if gen is not None else '-'} by {e['generated_by'] or '-'}", fontsize=9)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, name)


def make_figures(out_dir, doc, an, surface_layer):
    figs = {}
    act = doc["activation"]
    figs["activation_layer_output"] = fig_activation(out_dir, act["layer_output"], "layer outputs h: top-3 and median |h|", "activation_h.png")
    figs["activation_down_input"] = fig_activation(out_dir, act["down_input"], "down-projection inputs x_down: top-3 and median", "activation_xdown.png")
    figs["surface"] = fig_surface(out_dir, an.surface, surface_layer, an.token_info)
    figs["weights"] = fig_weights(out_dir, doc["weight"])
    figs["attention"] = fig_attention(out_dir, doc["attention"])
    figs["attention_heads"] = fig_heads(out_dir, doc["attention"])
    figs["token_categories"] = fig_categories(out_dir, {
        "h": act["layer_output"]["token_categories"], "x_down": act["down_input"]["token_categories"],
        "attention keys": doc["attention"]["token_categories"]})
    if doc["lifecycle"]:
        figs["lifecycle"] = fig_lifecycle(out_dir, doc["lifecycle"])
    return figs


# ----------------------------------------------------------------------------------------------
# report

def _f(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(header, rows):
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "\\n") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tok(s):
    return "`" + repr(s)[1:-1].replace("`", "'") + "`"


def write_report(out_dir, doc):
    m, d, t = doc["model"], doc["data"], doc["tau_by_type"]
    act_h, act_x = doc["activation"]["layer_output"], doc["activation"]["down_input"]
    att, figs = doc["attention"], doc["figures"]
    L = m["n_layer"]
    lines = [f"# Outlier analysis: {os.path.basename(str(m['source']))} ({m['attention']} attention)", ""]
    lines.append(f"Model: `{m['source']}`" + (f" (iter {m['iter_num']})" if m.get("iter_num") is not None else "")
                 + f", {m['n_layer']} layers, {m['n_head']} heads, n_embd {m['n_embd']}.  ")
    lines.append(f"Data: `{d['source']}`, {d['num_seqs']} sequences x {d['seq_len']} tokens.  ")
    lines.append(f"Thresholds: tau_activation {_f(t['activation'])}, tau_weight {_f(t['weight'])}, "
                 f"tau_attention {_f(t['attention'])}, tau_channel {_f(t['channel'])}. "
                 f"Definitions: see `outlier_stats.py`; numbers: `outliers.json`.")
    if t["attention"] >= d["seq_len"] and m["attention"] != "sigmoid":
        lines.append(f"\n> Note: with softmax the mean cumulative attention is 1, so no key can exceed tau_attention "
                     f"{_f(t['attention'])} >= seq_len {d['seq_len']}; use a smaller --tau_attention.")
    lines.append("")

    lines += ["## Activation outliers", "",
              f"An activation is an outlier when |x| > tau x mean|x| of its (tokens x channels) matrix. "
              f"Top-3 and median magnitudes are means over sequences.", ""]
    for label, acc, fig in (("Layer outputs h", act_h, figs.get("activation_layer_output")),
                            ("Down-projection inputs x_down", act_x, figs.get("activation_down_input"))):
        lines += [f"### {label}", "", f"![{label}]({fig})", ""]
        rows = []
        for l in range(L):
            top = acc["top3"][l]
            chans = ", ".join(f"{c} ({n})" for c, n in acc["channels"][l][:3]) or "–"
            pos = ", ".join(f"{p} ({n})" for p, n in acc["positions"][l][:3]) or "–"
            rows.append([l, _f(top[0]), _f(top[1]), _f(top[2]), _f(acc["median"][l]), _f(acc["ratio_top1_median"][l]),
                         acc["count"][l], chans, pos])
        lines += [_table(["layer", "top 1", "top 2", "top 3", "median", "top1/median", "# outliers",
                          "channels (count)", "positions (count)"], rows), ""]
        if acc["outliers_total"] == 0:
            lines += ["No activation outliers at this threshold.", ""]
        else:
            toks = ", ".join(f"{_tok(x['token'])} ({x['count']})" for x in acc["tokens"][:8])
            lines += [f"{acc['outliers_total']} outlier activations in total; carried by tokens: {toks}.", ""]
    if figs.get("surface"):
        lines += [f"### Magnitudes of layer {doc['surface']['layer']} (Figure 1 style)", "", f"![surface]({figs['surface']})", ""]

    lines += ["## Weight outliers", "",
              "Row-wise: |w_ij| > tau_weight x mean_j |w_ij| (W in nn.Linear (out, in) layout). "
              "Extremal ratio: max over input columns j of max_i|w_ij| / mean_i|w_ij|.", "",
              f"![weights]({figs.get('weights')})", ""]
    modules = list(doc["weight"])
    rows = []
    for l in range(L):
        row = [l]
        for mod in modules:
            w = doc["weight"][mod]
            row.append(f"{_f(w['extremal_ratio'][l])} (col {w['extremal_channel'][l]}; {w['outlier_count'][l]} outl.)")
        rows.append(row)
    lines += [_table(["layer"] + [f"{mod}: extremal ratio (column; # outliers)" for mod in modules], rows), ""]
    wd = doc["weight"].get("mlp.c_proj")
    if wd and wd["top_entries"]:
        lines += ["Largest |w|/row-mean entries of mlp.c_proj (W_down): " + ", ".join(
            f"L{e[0]} out {e[1]} in {e[2]}: {_f(e[3])}" for e in wd["top_entries"][:5]) + ".", ""]

    lines += ["## Attention outliers", "",
              "Cumulative attention of key j: sum over queries of A_ij, per head; outlier when above "
              "tau_attention x its mean over keys. Top-2 and median are over keys of the head-averaged score.", "",
              f"![attention]({figs.get('attention')})", "", f"![heads]({figs.get('attention_heads')})", ""]
    rows = []
    for l in range(L):
        keys = sum(att["head_outlier_keys"][l])
        pos = ", ".join(f"{p} ({n})" for p, n in att["positions"][l][:3]) or "–"
        extra = []
        if "sink_share" in att:
            extra.append(_f(att["sink_share"][l]))
        if "gate" in att:
            g = att["gate"]
            extra += [_f(g["first"][l]), _f(g["h_outlier"][l]), _f(g["other"][l])]
        rows.append([l, _f(att["top2"][l][0]), _f(att["top2"][l][1]), _f(att["median"][l]), keys, pos,
                     _f(att["first_token_mass"][l]), _f(att["value_norm"]["first"][l]), _f(att["value_norm"]["other"][l]),
                     _f(att["mean_logit_outlier_keys"][l]), _f(att["mean_logit_other_keys"][l])] + extra)
    header = ["layer", "top 1", "top 2", "median", "# outlier keys", "key positions (count)", "attn to pos 0",
              "|v| pos 0", "|v| others", "q.k outlier keys", "q.k other keys"]
    if "sink_share" in att:
        header.append("sink share")
    if "gate" in att:
        header += ["gate pos 0", "gate h-outlier tok.", "gate others"]
    lines += [_table(header, rows), ""]
    if "gate" in att:
        lines += ["`scaling`: the gate S(x) at position 0, at tokens that carry activation outliers in the layer input, "
                  "and at the other tokens (mean over heads).", ""]
    if att["qk_alignment"]:
        top = sorted(att["qk_alignment"], key=lambda r: -r["n_keys"])[:6]
        lines += ["q/k alignment at attention-outlier keys: mean logit q.k/sqrt(d) they receive, and the dimensions "
                  "contributing most to it: " + "; ".join(
                      f"L{r['layer']}h{r['head']} {_f(r['logit'])} (" + ", ".join(f"d{dd} {_f(v)}" for dd, v in r["dims"][:2]) + ")"
                      for r in top) + ".", ""]

    lines += ["## Token categories", "", f"![categories]({figs.get('token_categories')})", ""]
    import outlier_stats
    cats = outlier_stats.CATEGORIES
    rows = [[label] + [c[k] for k in cats] for label, c in (
        ("h outliers", act_h["token_categories"]), ("x_down outliers", act_x["token_categories"]),
        ("attention-outlier keys", att["token_categories"]))]
    lines += [_table(["outlier type"] + list(cats), rows),
              "", "Counts of (sequence, layer, position) triples that carry at least one outlier.", ""]

    c = doc["consistency"]
    lines += ["## Consistency (Table 1)", "",
              "Overlap |A∩B|/|A| of the sets below, in both directions (definitions in `outliers.json` and `outlier_stats.py`).", ""]
    rows = [[name, _pct(v["a_in_b"]), _pct(v["b_in_a"]), v["n_a"], v["n_b"], v["definition"]] for name, v in c.items()]
    lines += [_table(["pair", "A in B", "B in A", "n A", "n B", "sets"], rows), ""]

    lines += ["## Lifecycle of massive activations", ""]
    if doc["lifecycle"]:
        if figs.get("lifecycle"):
            lines += [f"![lifecycle]({figs['lifecycle']})", ""]
        rows = []
        for e in doc["lifecycle"][:10]:
            prop = [l for l, s in enumerate(e["status"]) if s == "propagated"]
            drivers = ", ".join(f"{dd['down_input_channel']} ({_pct(dd['share'])})" for dd in e["mlp_drivers"]) or "–"
            rows.append([e["position"], _tok(e["token"]), e["channel"], e["count"], _f(e["peak"]), e["first_massive_at"],
                         e["generated_at"] if e["generated_at"] is not None else "–", e["generated_by"] or "–",
                         _ranges(prop), _ranges(e["cancelled_at"]), drivers])
        lines += ["Per (position, channel), over the sequences where it is massive: first massive layer; layer where a "
                  "branch output is itself massive (generated) and which branch; layers where the residual stream only "
                  "carries it (propagated); layers where it stops being massive (cancelled); the W_down input channels "
                  "whose products w x x_down make up the generating MLP output.", "",
                  _table(["position", "token", "channel", "sequences", "peak |h|", "massive from", "generated at", "by",
                          "propagated in", "cancelled at", "W_down input channels driving it (share)"], rows), ""]
    else:
        lines += ["No massive activations at this threshold.", ""]

    lines += ["## Normalization (channel-wise outliers)", "",
              f"Channels whose mean |LayerNorm output| over tokens exceeds tau_channel ({_f(t['channel'])}) x the median "
              "channel; 'before gamma' divides out the LayerNorm gain (a ratio near 1 there means the outlier "
              "comes from gamma's rescaling).", ""]
    rows = []
    for n in doc["normalization"]:
        top = n["top"][0]
        rows.append([n["module"], len(n["outlier_channels"]), ", ".join(map(str, n["outlier_channels"][:5])) or "–",
                     top["channel"], _f(top["ratio"]), _f(top["gamma"]), _f(top["ratio_before_gamma"])])
    lines += [_table(["LayerNorm", "# outlier channels", "channels", "top channel", "ratio", "gamma", "ratio before gamma"], rows), ""]

    iv = doc.get("intervention")
    if iv:
        lines += ["## Intervention", "",
                  f"Massive activations set to **{iv['mode']}** at the layer that generates them "
                  f"({iv['activations_changed']} activations changed).", "",
                  _table(["", "loss", "perplexity"], [["original", _f(iv["loss"], 5), _f(iv["perplexity"], 5)],
                                                      ["intervened", _f(iv["loss_intervened"], 5), _f(iv["perplexity_intervened"], 5)],
                                                      ["change", _f(iv["loss_change"], 4), ""]]), ""]
    tm = doc["timing"]
    lines += ["---", f"Analysis {tm.get('analysis_s', 0):.1f} s" + (f", intervention {tm['intervention_s']:.1f} s" if "intervention_s" in tm else "")
              + f"; `{doc['meta']['command']}` at {doc['meta']['date']} (commit {doc['meta']['git_commit']}, {doc['meta']['gpu']}).", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _ranges(layers):
    layers = sorted(layers)
    if not layers:
        return "–"
    out, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if l is not None:
            start = prev = l
    return ", ".join(out)


def _write_json(path, obj):
    import json
    from common import _json_default
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# compare (Figure 11)

def run_compare(args, device, dtype, token_info):
    import torch
    import outlier_stats
    runs = []
    seqs, data_info = None, None
    for path in args.compare:
        model, info = model_and_info(args, path, device)
        if seqs is None:
            seqs, data_info = load_sequences(args, model.config.block_size)
        elif seqs.shape[1] - 1 > model.config.block_size:
            raise UserError(f"{path} has block size {model.config.block_size}, below the seq_len {seqs.shape[1] - 1} "
                            f"used for {args.compare[0]}; pass --seq_len {model.config.block_size}")
        an = outlier_stats.OutlierAnalyzer(model, tau_act=args.tau_activation, token_info=token_info,
                                           seq_len=seqs.shape[1] - 1, full=False, max_list=args.max_list)
        bs = args.batch_size or (8 if device.startswith("cuda") else 1)
        with progress(len(seqs), args.no_progress, os.path.basename(os.path.dirname(os.path.abspath(path))) or path) as bar:
            for X, _ in batches(seqs, bs, device):
                an.run_batch(X, autocast=autocast_context(device, dtype))
                bar.update(X.shape[0])
        r = an.result()["layer_output"]
        runs.append({"model": info, "label": f"{info['attention']} ({os.path.relpath(path)})",
                     "top3": r["top3"], "median": r["median"], "count": r["count"]})
        del model, an
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    with atomic_directory(args.out) as tmp:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for r in runs:
            ax.plot([t[0] for t in r["top3"]], marker="o", label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("top-1 |h| (mean over sequences)")
        ax.set_title("largest activation per layer (Figure 11)")
        ax.legend(fontsize=7)
        fig_name = _save(fig, tmp, "compare_top1.png")
        fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], runs):
            top3 = np.asarray(r["top3"])
            for k in range(3):
                ax.plot(top3[:, k], marker="os^"[k], label=f"top {k + 1}")
            ax.plot(r["median"], marker="x", color="gray", label="median")
            ax.set_yscale("log")
            ax.set_title(r["model"]["attention"], fontsize=9)
            ax.set_xlabel("layer")
        axes[0, 0].legend(fontsize=7)
        fig3 = _save(fig, tmp, "compare_top3.png")
        doc = {"format": FORMAT + "-compare", "version": FORMAT_VERSION, "data": data_info,
               "tau": args.tau_activation, "runs": runs, "meta": run_metadata(device)}
        _write_json(os.path.join(tmp, "compare.json"), doc)
        L = max(len(r["top3"]) for r in runs)
        rows = [[r["label"]] + [_f(r["top3"][l][0]) if l < len(r["top3"]) else "" for l in range(L)]
                + [_f(max(t[0] for t in r["top3"]))] for r in runs]
        lines = ["# Top activation per layer across checkpoints (Figure 11)", "",
                 f"Data: `{data_info['source']}`, {data_info['num_seqs']} x {data_info['seq_len']} tokens. "
                 f"Values: largest |h| of each layer's output, mean over sequences.", "",
                 f"![top-1]({fig_name})", "", f"![top-3]({fig3})", "",
                 _table(["checkpoint"] + [f"L{l}" for l in range(L)] + ["max"], rows), ""]
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    print(f"wrote {args.out}/report.md")
    return 0


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    import torch
    device = args.device_resolved = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    token_info = make_token_info()
    if args.compare:
        return run_compare(args, device, dtype, token_info)
    t_load = time.time()
    model, model_info = model_and_info(args, args.ckpt, device)
    if args.surface_layer is not None and not 0 <= args.surface_layer < model.config.n_layer:
        raise UserError(f"--surface_layer {args.surface_layer} is outside 0..{model.config.n_layer - 1}")
    seqs, data_info = load_sequences(args, model.config.block_size)
    load_s = time.time() - t_load
    t0 = time.time()
    an, res, timing = analyse(args, model, seqs, device, dtype, token_info)
    doc = build_json(args, model_info, data_info, an, res, timing)
    top1 = [t[0] for t in doc["activation"]["layer_output"]["top3"]]
    layer = args.surface_layer if args.surface_layer is not None else int(np.argmax(top1))
    doc["surface"] = {"layer": layer, "tokens": [token_info.text(t) for t in an.surface_tokens_ids]}
    with atomic_directory(args.out) as tmp:
        t_fig = time.time()
        doc["figures"] = make_figures(tmp, doc, an, layer)
        timing["figures_s"] = time.time() - t_fig
        timing["load_s"] = load_s
        timing["total_s"] = time.time() - t0  # model load excluded
        write_report(tmp, doc)
        _write_json(os.path.join(tmp, "outliers.json"), doc)
    h = doc["activation"]["layer_output"]
    print(f"{model_info['attention']}: max top-1 |h| {max(top1):.4g} (layer {int(np.argmax(top1))}), "
          f"{h['outliers_total']} activation outliers, {doc['attention']['outlier_keys_total']} attention-outlier keys; "
          f"wrote {args.out}/report.md in {timing['total_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main)
