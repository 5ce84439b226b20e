"""Analyse the systematic outliers of a checkpoint (any attention variant) or of OpenAI GPT-2.

    python analyze_outliers.py out/run/ckpt.pt --data data/openwebtext/val.bin --out out/run/outliers
    python analyze_outliers.py --pretrained gpt2 --text_file ../shared/data/wikitext-2/test.txt
    python analyze_outliers.py --compare a/ckpt.pt b/ckpt.pt --data data/X/val.bin --out out/compare

Reproduces the analyses of An et al., "Systematic Outliers in Large Language Models" (ICLR 2025,
Sec. 3-4: activation / weight / attention outliers, their consistency (Table 1), lifecycle and the
per-variant comparison of Figure 11) and of "Rethinking the Outlier Distribution in LLMs" (massive
activations generated in early layers and carried by the residual stream; channel-wise outliers from
LayerNorm rescaling). Definitions: see analysis/definitions.py. Streams over sequences: one forward per
batch with hooks, per-layer accumulators, capped outlier lists; memory does not grow with
--num_seqs. Writes DIR/report.md, DIR/outliers.json and PNG figures, atomically (a temporary
directory beside DIR renamed at the end; nothing is left behind on error).
"""

import argparse
import functools
import math
import os
import sys
import time

import numpy as np

from runtime.cli import ArgumentParser, UserError, check_seed, cli_main
from runtime.files import json_safe, not_a_file
from runtime.outputs import check_output_dir, output_set
from runtime.reports import (layer_axis, layer_ranges, loss_curve, markdown_table, number, percent, plot_loss_curves,
                             plot_top1, plot_top3, pyplot, read_training_log, save_figure, token_code)
from runtime.system import autocast_context, check_fits, resolve_device, resolve_dtype, run_metadata
from runtime.token_data import check_vocab, input_tokens, read_text_file

FORMAT = "outlier-gpt/outliers"
FORMAT_VERSION = 1
PAPER_SEQ_LEN = 2048  # Appendix B.2: 100 samples of 2,048 tokens


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint of this repo (any attention variant)")
    p.add_argument("--pretrained", help="OpenAI GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local Hugging Face GPT-2 "
                                        "directory), or any supported Hugging Face causal LM: a hub name ORG/NAME or a "
                                        "save_pretrained directory (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi-2/3, OPT, Falcon, GPT-NeoX)")
    p.add_argument("--attention", default="default", help="attention variant for --pretrained (default: default)")
    from attention_variants import VARIANTS_FILE_HELP
    p.add_argument("--variants_file", metavar="FILE.py", help=VARIANTS_FILE_HELP)
    p.add_argument("--compare", nargs="+", metavar="CKPT", help="draw top-3 activation per layer of several checkpoints (or Hugging Face model "
                                                                      "directories) on one figure (Figure 11)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="prepared token file (uint16 .bin)")
    src.add_argument("--text_file", help="UTF-8 text file")
    src.add_argument("--text", help="text given on the command line")
    p.add_argument("--num_seqs", type=int, default=100, help="number of sequences (default 100, Appendix B.1/B.2)")
    p.add_argument("--seq_len", type=int, default=None,
                   help=f"tokens per sequence (default: {PAPER_SEQ_LEN}, Appendix B.2, or the block size when shorter)")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per forward (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tau", type=float, default=1000.0, help="outlier threshold tau (default 1000, the paper's)")
    p.add_argument("--tau_activation", type=float, default=None, help="tau for activation outliers (default --tau)")
    p.add_argument("--weight_rule", choices=["ratio", "column", "paper"], default="ratio",
                   help="ratio (default): an entry >= --weight_ratio x its column's mean |w|, the same threshold for "
                        "every module (rows / 2 where a column has fewer than 2 x --weight_ratio rows); column: an "
                        "entry holding >= --weight_share of its column's total |w| (a threshold that grows with the "
                        "row count); paper: |w_ij| > tau_weight x mean_j |w_ij| (row-wise)")
    p.add_argument("--weight_ratio", type=float, default=50.0, help="ratio rule threshold (default 50)")
    p.add_argument("--weight_share", type=float, default=0.1, help="column rule share (default 0.1)")
    p.add_argument("--tau_weight", type=float, default=None, help="tau for --weight_rule paper (default --tau)")
    p.add_argument("--attention_rule", choices=["authors", "paper"], default="authors",
                   help="authors (default, the authors' code): cumulative attention Ahat_j >= --attention_share x T; "
                        "paper: Ahat_j > tau_attention x mean(Ahat), per head")
    p.add_argument("--attention_share", type=float, default=0.1, help="authors rule share of T (default 0.1)")
    p.add_argument("--tau_attention", type=float, default=None, help="tau_A for --attention_rule paper (default --tau)")
    p.add_argument("--tau_channel", type=float, default=10.0,
                   help="LayerNorm channel-wise outliers: mean |y_c| over tokens > tau_channel x median over channels (default 10)")
    p.add_argument("--intervene", choices=["none", "zero", "mean"], default="none",
                   help="set the massive activations to zero / their mean where they are generated, where they are only "
                        "carried, and everywhere, and the gamma-driven LayerNorm channels to the median gamma; report each "
                        "loss change (each replays the analysis' forward from the first edited layer; the three "
                        "targets in one batched forward)")
    p.add_argument("--surface_layer", type=int, default=None, help="layer of the 3-D magnitude plot (default: largest top-1)")
    p.add_argument("--max_list", type=int, default=100, help="outliers kept in each list of outliers.json (largest first; totals are counted)")
    p.add_argument("--out", help="output directory (default: beside the checkpoint, or out/outliers_<name>)")
    p.add_argument("--attention_capture", choices=["auto", "eager"], default="auto",
                   help="Hugging Face models: 'auto' records q, k, v through transformers' AttentionInterface in the "
                        "layers whose attention calls it (observed during the forward; value norms, logits, q/k "
                        "alignment) and reports the others' probabilities only; 'eager': probabilities only")
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
    for name in ("tau", "tau_activation", "tau_weight", "tau_attention", "tau_channel", "weight_share", "weight_ratio",
                 "attention_share"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{name} must be a positive number, not {v}")
    for name in ("weight_share", "attention_share"):
        if getattr(args, name) > 1:
            raise UserError(f"--{name} is a fraction and must be at most 1, not {getattr(args, name)}")
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
    seen = [os.path.realpath(p) for p in args.compare or []]
    twice = [p for i, p in enumerate(args.compare or []) if seen[i] in seen[:i]]
    if twice:
        raise UserError(f"--compare names {twice[0]} twice; compare different checkpoints")
    from hf.models import is_pretrained_dir
    from training.checkpoint import check_checkpoint_path
    for path in [args.ckpt] + list(args.compare or []):
        if path is not None and not (path in (args.compare or []) and is_pretrained_dir(path)):
            check_checkpoint_path(path)
    for path, flag in ((args.data, "--data"), (args.text_file, "--text_file")):
        if path is not None and not_a_file(path):
            raise UserError(f"{flag} {path} {not_a_file(path)}")
    if args.out is None:
        if args.ckpt:
            args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "outliers")
        elif args.pretrained:
            args.out = os.path.join("out", "outliers_" + os.path.basename(os.path.normpath(args.pretrained)))
        else:
            args.out = os.path.join("out", "outliers_compare")
    check_seed(args.seed)
    check_output_dir(args.out, *output_kind(args), inputs=input_paths(args))  # before the analysis


# what each mode may write into --out (runtime.outputs.output_set replaces only these, and only its own)
ANALYSIS_FILES = ("report.md", "outliers.json", "activation_h.png", "activation_xdown.png", "surface.png", "weights.png",
                  "attention.png", "attention_heads.png", "token_categories.png", "lifecycle.png", "outlier_channels.png",
                  "down_proj_weights.png", "attention_outlier_share.png", "weight_link.png", "lifecycle_cancellation.png")
COMPARE_FILES = ("report.md", "compare.json", "compare_top1.png", "compare_top3.png", "compare_loss.png")


def output_kind(args):
    """(tool name in the output manifest, the files it may write)."""
    return ("analyze_outliers.py --compare", COMPARE_FILES) if args.compare else ("analyze_outliers.py", ANALYSIS_FILES)


def input_paths(args):
    pretrained_dir = args.pretrained if args.pretrained and os.path.isdir(args.pretrained) else None
    return [p for p in [args.ckpt, pretrained_dir, args.data, args.text_file, *(args.compare or [])] if p is not None]


# ----------------------------------------------------------------------------------------------
# inputs

def model_and_info(args, path, device):
    """(model on device in eval mode, model info for outliers.json) of checkpoint `path`, or of --pretrained."""
    from hf.models import is_pretrained_dir
    from training.checkpoint import load_model
    if path is not None and is_pretrained_dir(path):  # --compare of Hugging Face model directories
        model, _ = load_model(pretrained=path, device=device, attention=args.attention)
        info = {"source": os.path.abspath(path), "iter_num": None}
    elif path is not None:
        model, ckpt = load_model(path, device=device)
        info = {"source": os.path.abspath(path), "iter_num": ckpt.get("iter_num")}
    else:
        model, _ = load_model(pretrained=args.pretrained, device=device, attention=args.attention)
        info = {"source": args.pretrained, "iter_num": None}
    from hf.models import model_view
    cfg, view = model.config, model_view(model)
    info.update(attention=cfg.attention, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                block_size=cfg.block_size, vocab_size=cfg.vocab_size, bias=cfg.bias,
                family=getattr(cfg, "model_type", "outlier-gpt"), down_proj=view.down_name, d_ff=view.d_ff,
                parallel_residual=view.parallel)
    return model, info


def load_sequences(args, block_size, encode=None):
    """-> (int64 array (N, seq_len + 1), data info dict). Inputs are [:, :-1], targets [:, 1:] (-1: no target).
    `encode`: the model's own tokenizer for text (Hugging Face models), else GPT-2 BPE."""
    if args.seq_len is not None and args.seq_len > block_size:
        raise UserError(f"--seq_len {args.seq_len} is above the model's block size {block_size}; use --seq_len {block_size} or less")
    seq_len = args.seq_len or min(block_size, PAPER_SEQ_LEN)
    rng = np.random.default_rng(args.seed)
    if args.data is not None:
        tokens = input_tokens(data=args.data)  # memory-mapped: only the drawn windows are read
        if len(tokens) < seq_len + 1:
            raise UserError(f"{args.data} holds {len(tokens)} tokens; a sequence needs seq_len + 1 = {seq_len + 1}: "
                            f"lower --seq_len")
        windows = len(tokens) - seq_len
        if args.num_seqs > windows:
            raise UserError(f"--num_seqs {args.num_seqs:,} is more than the {windows:,} distinct windows of "
                            f"{seq_len} + 1 tokens in {args.data}; use --num_seqs {windows:,} or less")
        check_fits(args.num_seqs * (seq_len + 1) * 8, "cpu", f"--num_seqs {args.num_seqs:,} x {seq_len + 1} tokens",
                   "lower --num_seqs")
        starts = rng.integers(0, len(tokens) - seq_len, size=args.num_seqs)
        seqs = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        source = os.path.abspath(args.data)
    else:
        ids = (input_tokens(text_file=args.text_file, text=args.text) if encode is None else
               np.asarray(encode(read_text_file(args.text_file) if args.text_file is not None else args.text), dtype=np.int64))
        if len(ids) < 2:
            raise UserError("the text is a single token; give at least two tokens of text")
        if len(ids) <= seq_len:
            # a short text (the paper's Figure 10 input) is analysed whole: its last token has no target (-1,
            # which the loss ignores) rather than being dropped
            if args.seq_len is not None and len(ids) < seq_len:
                print(f"note: the text has {len(ids)} tokens; using one sequence of {len(ids)}", file=sys.stderr)
            seq_len = len(ids)
            seqs = np.append(np.asarray(ids, dtype=np.int64), -1)[None]
        else:
            # Appendix B.2's "randomly selected samples": a seeded draw of non-overlapping windows, in text order
            chunks = (len(ids) - 1) // seq_len
            picked = np.sort(rng.choice(chunks, size=min(args.num_seqs, chunks), replace=False))
            seqs = np.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in picked])
        source = os.path.abspath(args.text_file) if args.text_file is not None else "--text"
    info = {"source": source, "num_seqs": int(seqs.shape[0]), "seq_len": int(seq_len),
            "tokens": int(seqs.shape[0] * seq_len), "seed": args.seed}
    return seqs, info


@functools.lru_cache(maxsize=None)
def gpt2_token_info():
    """Token strings through GPT-2 BPE (this repo's GPT); loaded once, and only for models that use it."""
    from analysis import definitions as outlier_stats
    try:
        from runtime.tokenizer import get_tokenizer
        enc = get_tokenizer()
    except UserError as e:
        print(f"warning: token strings unavailable ({e}); tokens are shown as <id>", file=sys.stderr)
        return outlier_stats.TokenInfo(None)

    def decode_one(token_id):
        return enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
    return outlier_stats.TokenInfo(decode_one)


def model_tokenization(model, args):
    """(token info, encode): a Hugging Face model's own tokenizer, or GPT-2 BPE for this repo's GPT (encode
    None: load_sequences then uses runtime/tokenizer.py)."""
    from analysis import definitions as outlier_stats
    from hf.models import HFCausalLM, tokenization
    if not isinstance(model, HFCausalLM):
        return gpt2_token_info(), None
    encode, decode_one = tokenization(model, required=args.data is None)
    return outlier_stats.TokenInfo(decode_one), encode


def check_forward(model, seqs, source, device, dtype):
    """A forward that overflows (finite but huge weights, fp16's range) is an error now, not NaN results later."""
    from training.checkpoint import check_forward_finite
    X, Y = next(batches(seqs[:1], 1, device))
    check_forward_finite(model, X, Y, source, autocast_context(device, dtype), dtype)


def batches(seqs, batch_size, device):
    import torch
    for i in range(0, len(seqs), batch_size):
        chunk = torch.from_numpy(seqs[i:i + batch_size])
        yield chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def progress(total, disable, desc):
    from tqdm import tqdm
    return tqdm(total=total, disable=disable, desc=desc, unit="seq", file=sys.stderr, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# analysis

def analyse(args, model, seqs, device, dtype, token_info):
    from analysis.statistics import OutlierAnalyzer
    bs = args.batch_size or (8 if device.startswith("cuda") else 1)
    an = OutlierAnalyzer(
        model, tau_act=args.tau_activation, tau_weight=args.tau_weight, tau_attn=args.tau_attention,
        tau_channel=args.tau_channel, max_list=args.max_list, token_info=token_info, seq_len=seqs.shape[1] - 1,
        weight_rule=args.weight_rule, weight_share=args.weight_share, weight_ratio=args.weight_ratio,
        attention_rule=args.attention_rule, attention_share=args.attention_share,
        record_qkv=args.attention_capture == "auto", keep_replay=args.intervene != "none")
    t0 = time.time()
    with progress(len(seqs), args.no_progress, "analysing") as bar:
        for X, Y in batches(seqs, bs, device):
            # the loss (the interventions' reference) only where it is needed: this repo's GPT then computes
            # the logits of every position, not only of the last
            an.run_batch(X, Y if args.intervene != "none" else None, autocast=autocast_context(device, dtype))
            bar.update(X.shape[0])
    result = an.result()
    timing = {"analysis_s": time.time() - t0}
    if args.intervene != "none":
        t0 = time.time()
        result["intervention"] = intervene(args, model, an, device, dtype, result["normalization"])
        timing["intervention_s"] = time.time() - t0
    return an, result, timing


def intervene(args, model, an, device, dtype, normalization):
    """Mean loss over the sequences without and with each intervention: massive activations edited at each
    target of interventions.INTERVENTION_TARGETS, and the gamma-driven LayerNorm channels set to the median
    gamma. The loss without is the analysis' own; the intervened forwards replay it (same attention path)
    from the first edited layer. The top-level fields are those of the 'generated' target."""
    from analysis.interventions import INTERVENTION_TARGETS, intervention_losses

    def changed(loss):
        return {"loss_intervened": loss, "perplexity_intervened": math.exp(min(loss, 700)), "loss_change": loss - base}

    base = an.loss_sum / an.loss_n
    # 'mean': each edited value becomes the mean of the values its target edits at that (layer, channel)
    means = {target: an.lifecycle.means(target) for target in INTERVENTION_TARGETS} if args.intervene == "mean" else {}
    gamma = {n["module"]: n["gamma_driven"] for n in normalization if n["gamma_driven"]}
    with progress(an.n_seqs, args.no_progress, f"interventions ({args.intervene})") as bar:
        losses, gamma_loss = intervention_losses(model, an.replay, args.intervene, means, gamma or None,
                                                 autocast_context(device, dtype), bar)
    targets = {target: {"activations_changed": n, **changed(loss)} for target, (loss, n) in losses.items()}
    gamma_result = {"channels": gamma, "count": sum(map(len, gamma.values())),
                    "loss_intervened": None, "perplexity_intervened": None, "loss_change": None}
    if gamma:
        gamma_result.update(changed(gamma_loss))
    return {"mode": args.intervene, "loss": base, "perplexity": math.exp(min(base, 700)), **targets["generated"],
            "targets": targets, "gamma": gamma_result}


def thresholds(args, model_info, data_info, res):
    """Per outlier type: the rule applied, the absolute threshold it came to, and the paper's formula
    where the rule differs from it (the defaults are the rules that a real outlier can meet)."""
    T, C = data_info["seq_len"], model_info["n_embd"]
    act = res["layer_output"]
    weight = {name: w["threshold"] for name, w in res["weight"].items()}
    out = {
        "activation": {
            "rule": "|x| > tau x mean|x| over one sequence's (tokens x channels) matrix (the paper's formula)",
            "tau": args.tau_activation,
            "effective": {"layer_output": act["threshold"], "down_input": res["down_input"]["threshold"]},
            "max_ratio": {"layer_output": T * C, "down_input": T * model_info.get("d_ff", 4 * C)},
        },
        "weight": {
            "rule": args.weight_rule,
            "definition": weight_definition(args),
            "effective": weight,
            "paper_formula": "|w_ij| > tau_W x mean_j |w_ij| (row-wise), tau_W = 1000: the row ratio is at most the "
                             f"input size ({in_sizes(res['weight'])} in this model), so it cannot fire; the paper's "
                             "text speaks of column extremal ratios",
        },
        "attention": {
            "rule": args.attention_rule,
            "definition": (f"Ahat_j = sum_i A_ij >= {args.attention_share} x T (the authors' code), on the head-averaged "
                           f"score and on each head's score" if args.attention_rule == "authors"
                           else f"Ahat_j > {args.tau_attention} x mean_j Ahat, per head"),
            "effective": res["attention"]["threshold"],
            "paper_formula": f"Ahat_j > tau_A x mean_j Ahat per head, tau_A = 1000; softmax: mean Ahat = 1 and "
                             f"Ahat_j <= T - j, so it cannot fire at T = {T}" if T <= 1000 else
                             "Ahat_j > tau_A x mean_j Ahat per head, tau_A = 1000: only keys j < T - 1000 holding "
                             f"{1000 / T:.1%} or more of all attention",
        },
        "channel": {"rule": "mean |LayerNorm output| of a channel > tau_channel x the median channel",
                    "tau": args.tau_channel},
    }
    if args.tau_activation >= T * C:
        out["activation"]["note"] = f"tau {args.tau_activation} >= T x C = {T * C}: no activation can qualify"
    return out


def weight_definition(args):
    if args.weight_rule == "ratio":
        return (f"|w_ij| >= {number(args.weight_ratio)} x mean_i |w_ij| (W (out, in); the entry is at least "
                f"{number(args.weight_ratio)} times its input column's mean magnitude): column extremal ratio >= "
                f"{number(args.weight_ratio)} in every module with at least {number(2 * args.weight_ratio)} rows, "
                "rows / 2 in smaller ones, never below 8")
    if args.weight_rule == "column":
        return (f"|w_ij| >= {args.weight_share} x sum_i |w_ij| (W (out, in); an entry holding that share of its input "
                f"column's magnitude), i.e. column extremal ratio >= {args.weight_share} x rows (at least 8)")
    return f"|w_ij| > {args.tau_weight} x mean_j |w_ij| (row-wise)"


def in_sizes(weight):
    """'576 / 1536': the input sizes of the model's projections (what bounds the paper's row ratio)."""
    sizes = sorted({len(w["profile"]["column_max_abs"]) for w in weight.values()})
    return " / ".join(str(n) for n in sizes)


def build_json(args, model_info, data_info, an, res, timing):
    act = {"layer_output": res["layer_output"], "down_input": res["down_input"]}
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": model_info,
        "data": data_info,
        "tau": args.tau,
        "tau_by_type": {"activation": args.tau_activation, "weight": args.tau_weight,
                        "attention": args.tau_attention, "channel": args.tau_channel},
        "thresholds": thresholds(args, model_info, data_info, res),
        "activation": act,
        "weight": res["weight"],
        "weight_link": res["weight_link"],
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

def fig_activation(out_dir, acc, title, name):
    plt = pyplot()
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
    layer_axis(ax, L)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_surface(out_dir, surface, layer, token_text, name="surface.png"):
    plt = pyplot()
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
    return save_figure(fig, out_dir, name)


def fig_weights(out_dir, weight, name="weights.png"):
    """Extremal ratio per layer and module, with each module's outlier threshold (column rules): a module
    has weight outliers in a layer exactly where its curve reaches its threshold line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    L = len(next(iter(weight.values()))["extremal_ratio"])
    thresholds = {}
    for i, (module, res) in enumerate(weight.items()):
        ax.plot(res["extremal_ratio"], marker="o", ms=3, color=f"C{i}", label=module)
        if "extremal_ratio" in res["threshold"]:
            thresholds.setdefault(res["threshold"]["extremal_ratio"], []).append(i)
    for value, modules in thresholds.items():
        color = f"C{modules[0]}" if len(modules) == 1 else "k"
        ax.axhline(value, color=color, ls="--", lw=0.8)
        label = "outlier threshold" + ("" if len(modules) == len(weight) else f" ({len(modules)} modules)")
        ax.annotate(f"{label} {number(value)}", (0.99, value), xycoords=("axes fraction", "data"), fontsize=7,
                    color=color, va="bottom", ha="right")
    ax.set_yscale("log")
    layer_axis(ax, L)
    ax.set_xlabel("layer")
    ax.set_ylabel("max over columns of max|w|/mean|w|")
    ax.set_title("weight extremal ratio by layer and module")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, name)


def fig_attention(out_dir, att, name="attention.png"):
    plt = pyplot()
    top2, med = np.asarray(att["top2"]), np.asarray(att["median"])
    x = np.arange(len(med))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, top2[:, 0], marker="o", label="top 1")
    ax.plot(x, top2[:, 1], marker="s", label="top 2")
    ax.plot(x, med, marker="x", color="gray", label="median")
    ax.set_yscale("log")
    layer_axis(ax, len(med))
    ax.set_xlabel("layer")
    ax.set_ylabel("cumulative attention (head mean)")
    ax.set_title("cumulative attention per key: top-2 and median by layer")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_heads(out_dir, att, name="attention_heads.png"):
    plt = pyplot()
    ratio = np.asarray(att["head_top1"]) / np.maximum(np.asarray(att["head_median"]), 1e-12)
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(np.log10(np.maximum(ratio, 1e-12)), aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label="log10(top-1 / median) of cumulative attention")
    layer_axis(ax, ratio.shape[0], "y", limits=False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("per-head spread of cumulative attention")
    return save_figure(fig, out_dir, name)


def fig_categories(out_dir, groups, name="token_categories.png"):
    from analysis.definitions import CATEGORIES as cats
    plt = pyplot()
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
    return save_figure(fig, out_dir, name)


def position_label(e):
    """'position 5 ('the')', or where the position holds different tokens in different sequences (position
    0 does) how many."""
    if e.get("distinct_tokens", 1) <= 1:
        return f"position {e['position']} ({e['token']!r})"
    return f"position {e['position']} ({e['distinct_tokens']} different tokens in {e['count']} sequences)"


def stage_summary(e):
    """'early 2-8 (L2 mlp); generated 11 (mlp); cancelled 28 (mlp)': the stages of one lifecycle entry."""
    def writers(ws):
        return ", ".join(f"{w['layer']} ({w['branch']})" for w in ws)
    parts = []
    if e.get("early_stage"):
        parts.append(f"early {layer_ranges(e['early_stage']['layers'])}"
                     + (f" (written at {writers(e['early_stage']['writers'])})" if e["early_stage"]["writers"] else ""))
    if e["generation"]:
        parts.append(f"generated at {writers(e['generation'])}")
    elif e.get("emerged_at") is not None:
        parts.append(f"emerged at {e['emerged_at']}")
    parts.append(f"cancelled at {writers(e['cancellation'])}" if e["cancellation"] else "not cancelled")
    return "; ".join(parts)


def shade_stages(ax, e):
    """Bands behind a lifecycle plot: the early stage, the generation and the cancellation layers."""
    for layers, color in ((e["early_stage"]["layers"] if e.get("early_stage") else [], "tab:orange"),
                          (e["generated_at"], "tab:green"), (e["cancelled_at"], "tab:red")):
        for l in layers:
            ax.axvspan(l - 0.5, l + 0.5, color=color, alpha=0.15, lw=0)


def fig_lifecycle(out_dir, lifecycle, name="lifecycle.png"):
    """The largest massive activations' |h| along the layers on a log scale, against the layer's median |h|
    and the tau threshold: an early stage reads as a value far above the median before the generation, a
    value kept while the threshold rises stays flat. Bands: early stage, generation, cancellation layers."""
    plt = pyplot()
    entries = lifecycle[:3]
    fig, axes = plt.subplots(len(entries), 1, figsize=(8, 2.9 * len(entries)), squeeze=False)
    for ax, e in zip(axes[:, 0], entries):
        L = len(e["trajectory"])
        x = np.arange(L)
        shade_stages(ax, e)
        ax.plot(x, np.abs(e["trajectory"]), marker="o", ms=3, color="k", label=f"|h| at channel {e['channel']}")
        ax.plot(x, e["threshold"], color="tab:purple", ls=":", label="tau x mean|h| (massive above)")
        ax.plot(x, e["median"], color="gray", ls="--", label="median |h| of the layer")
        ax.set_yscale("log")
        layer_axis(ax, L)
        ax.set_xlabel("layer")
        ax.set_title(f"{position_label(e)}, channel {e['channel']}\n{stage_summary(e)}", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    return save_figure(fig, out_dir, name)


def fig_channel_scatter(out_dir, act, name="outlier_channels.png"):
    """Figures 3c / 4b-c: the channel index of activation outliers per layer (h and x_down)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], (("layer_output", "layer outputs h"), ("down_input", "down-projection inputs x_down"))):
        pts = np.asarray(act[key]["channel_scatter"], dtype=float).reshape(-1, 3)
        if len(pts):
            size = 12 + 60 * pts[:, 2] / pts[:, 2].max()
            sc = ax.scatter(pts[:, 0], pts[:, 1], s=size, c=np.log10(pts[:, 2]), cmap="viridis")
            fig.colorbar(sc, ax=ax, label="log10(# outliers)")
        layer_axis(ax, len(act[key]["count"]))
        ax.set_xlabel("layer")
        ax.set_ylabel("channel")
        ax.set_title(f"{label}: outlier channels ({len(pts)})", fontsize=9)
    return save_figure(fig, out_dir, name)


def down_proj_name(doc):
    """The down projection's name in doc['weight'] (this repo's GPT: mlp.c_proj; LLaMA: mlp.down_proj, ...)."""
    return doc["model"].get("down_proj", "mlp.c_proj")


def fig_down_weights(out_dir, weight, name="down_proj_weights.png", down="mlp.c_proj"):
    """Figures 5b-c: W_down magnitudes of the layer with the largest column extremal ratio: max |w| of
    every input column (= x_down channel), outlier columns marked, and |w| along the extremal column."""
    plt = pyplot()
    w = weight[down]
    prof = w["profile"]
    l, j = prof["layer"], prof["column"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    ax = axes[0, 0]
    cols = np.asarray(prof["column_max_abs"])
    ax.plot(cols, lw=0.6, color="tab:blue")
    marked = w["outlier_channels"][l]
    ax.scatter(marked, cols[marked], color="tab:red", zorder=3, label=f"weight-outlier columns ({len(marked)})")
    ax.set_xlabel("input column (x_down channel)")
    ax.set_ylabel("max_i |w_ij|")
    ax.set_title(f"{down} layer {l}: column maxima", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    col = np.asarray(prof["column_abs"])
    ax.bar(np.arange(len(col)), col, width=1.0, color="tab:gray")
    i = int(np.argmax(col))
    ax.bar([i], [col[i]], width=1.0, color="tab:red")
    ax.scatter([i], [col[i]], color="tab:red", zorder=3, label=f"row {i}")  # one bar of hundreds is a pixel wide
    ax.set_xlabel("output row (h channel)")
    ax.set_ylabel(f"|w_i,{j}|")
    ax.set_title(f"column {j} (extremal ratio {number(w['extremal_ratio'][l])})", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def fig_outlier_key_share(out_dir, att, name="attention_outlier_share.png"):
    """Figure 6c: per layer, the share of each head's attention taken by the outlier keys of the
    head-averaged score: mean over heads with the min-max range."""
    plt = pyplot()
    share = np.asarray(att["outlier_key_share_by_head"])  # (L, H)
    x = np.arange(share.shape[0])
    mean, lo, hi = share.mean(1), share.min(1), share.max(1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o-", capsize=3, label="mean over heads (min-max)")
    ax.set_ylim(0, 1.02)
    layer_axis(ax, len(x))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention share of outlier keys")
    ax.set_title("share of attention taken by attention-outlier keys", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_weight_link(out_dir, link, name="weight_link.png"):
    """Figure 7: the MLP units of the layer that generates the largest massive activation (or, without one,
    of the layer with the most x_down spikes): up-projection row norm against down-projection column max;
    the units whose x_down spikes and the units that drive the massive activation are marked."""
    plt = pyplot()
    prof = link["profile"]
    norms, cols = np.asarray(prof["fc_row_norm"]), np.asarray(prof["down_column_max_abs"])
    units, drivers = prof["units"], prof.get("drivers", [])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(norms, cols, s=6, color="tab:gray", label="MLP units")
    if units:
        ax.scatter(norms[units], cols[units], s=30, color="tab:red", label=f"units with x_down outliers ({len(units)})")
    if drivers:
        ax.scatter(norms[drivers], cols[drivers], s=80, facecolors="none", edgecolors="tab:blue", lw=1.5,
                   label="units generating the largest massive activation")
    for k in list(dict.fromkeys(drivers + sorted(units, key=lambda k: -cols[k])))[:5]:
        ax.annotate(str(k), (norms[k], cols[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("|up-projection row| (L2)")
    ax.set_ylabel("max |down-projection column|")
    ax.set_title(f"layer {prof['layer']}: up-projection rows and down-projection columns of the MLP units", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def fig_cancellation(out_dir, lifecycle, name="lifecycle_cancellation.png"):
    """Figures 8-9 in values: per layer the attention and MLP branch outputs at the coordinate and the value
    h after the layer, all as a share of the peak value (signed along it, so that the peak is +1): a
    generation is a bar up to the line, a cancellation a bar down with the line falling after it. The
    dashed lines are the rules' 25% of the peak (a branch that adds / removes that much generates /
    cancels) and half the peak (below it the value counts as cancelled)."""
    plt = pyplot()
    entries = lifecycle[:3]
    fig, axes = plt.subplots(len(entries), 1, figsize=(8, 2.9 * len(entries)), squeeze=False)
    for ax, e in zip(axes[:, 0], entries):
        L = len(e["trajectory"])
        x = np.arange(L)
        peak = e["trajectory"][e["peak_layer"]] or 1.0
        shade_stages(ax, e)
        ax.bar(x - 0.2, np.asarray(e["attn_contrib"]) / peak, 0.4, color="tab:blue", label="attention branch / peak")
        ax.bar(x + 0.2, np.asarray(e["mlp_contrib"]) / peak, 0.4, color="tab:orange", label="MLP branch / peak")
        ax.plot(x, np.asarray(e["trajectory"]) / peak, marker="o", ms=3, color="k", label="h after the layer / peak")
        for y, style in ((0.25, "--"), (-0.25, "--"), (0.5, ":")):
            ax.axhline(y, color="gray", ls=style, lw=0.7)
        ax.axhline(0, color="gray", lw=0.5)
        for c in e["cancellation"]:
            right = c["layer"] > 0.75 * L  # keep the label inside the axes
            ax.annotate(f"L{c['layer']} {c['branch']}: {-c['share']:+.0%} of the peak", (c["layer"], -c["share"]),
                        fontsize=7, color="tab:red", ha="right" if right else "left", va="top",
                        xytext=(-4 if right else 4, -2), textcoords="offset points")
        ax.set_ylim(min(-1.1, ax.get_ylim()[0]), max(1.25, ax.get_ylim()[1]))
        layer_axis(ax, L)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of the peak")
        ax.set_title(f"{position_label(e)}, channel {e['channel']}, peak {number(peak)} at layer {e['peak_layer']}\n"
                     f"{stage_summary(e)}", fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    return save_figure(fig, out_dir, name)


def json_figures(out_dir, doc):
    """The figures drawn from outliers.json alone (tests redraw them from the written file)."""
    figs = {"outlier_channels": fig_channel_scatter(out_dir, doc["activation"]),
            "down_proj_weights": fig_down_weights(out_dir, doc["weight"], down=down_proj_name(doc)),
            "attention_outlier_share": fig_outlier_key_share(out_dir, doc["attention"])}
    if doc["weight_link"]["profile"] is not None:
        figs["weight_link"] = fig_weight_link(out_dir, doc["weight_link"])
    if doc["lifecycle"]:
        figs["lifecycle_cancellation"] = fig_cancellation(out_dir, doc["lifecycle"])
    return figs


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
    figs.update(json_figures(out_dir, doc))
    return figs


# ----------------------------------------------------------------------------------------------
# report: one function per section, each returning its lines

def write_report(out_dir, doc):
    lines = []
    for section in (report_header, report_activations, report_weights, report_attention, report_token_categories,
                    report_consistency, report_lifecycle, report_normalization, report_intervention, report_footer):
        lines += section(doc)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def report_header(doc):
    m, d, t, th = doc["model"], doc["data"], doc["tau_by_type"], doc["thresholds"]
    kind = f"{m['attention']} attention" if m.get("family", "outlier-gpt") == "outlier-gpt" else m["family"]
    lines = [f"# Outlier analysis: {os.path.basename(str(m['source']))} ({kind})", ""]
    lines.append(f"Model: `{m['source']}`" + (f" (iter {m['iter_num']})" if m.get("iter_num") is not None else "")
                 + f", {m['n_layer']} layers, {m['n_head']} heads, n_embd {m['n_embd']}.  ")
    lines.append(f"Data: `{d['source']}`, {d['num_seqs']} sequences x {d['seq_len']} tokens.  ")
    lines += ["", "Thresholds (rule, and the absolute threshold it came to; `thresholds` in `outliers.json`):", "",
              f"- activation: {th['activation']['rule']}, tau = {number(th['activation']['tau'])}; |h| threshold per "
              "layer " + ", ".join(number(x) for x in th["activation"]["effective"]["layer_output"]) + ".",
              f"- weight ({th['weight']['rule']}): {th['weight']['definition']}"
              + weight_thresholds_text(th["weight"]) + f". Paper: {th['weight']['paper_formula']}.",
              f"- attention ({th['attention']['rule']}): {th['attention']['definition']}; Ahat threshold per layer "
              + ", ".join(number(x) for x in th["attention"]["effective"]) + f". Paper: {th['attention']['paper_formula']}.",
              f"- channel: {th['channel']['rule']}, tau_channel = {number(t['channel'])}.", "",
              "Definitions: see `analysis/definitions.py`; numbers: `outliers.json`."]
    if th["attention"]["rule"] == "paper" and t["attention"] >= d["seq_len"] and m["attention"] != "sigmoid":
        lines.append(f"\n> Note: with softmax the mean cumulative attention is 1, so no key can exceed tau_attention "
                     f"{number(t['attention'])} >= seq_len {d['seq_len']}; use a smaller --tau_attention.")
    return lines + [""]


def weight_thresholds_text(th):
    """'; extremal-ratio threshold 50 in every module' or per module with its row count (column rules)."""
    if th["rule"] == "paper":
        return ""
    eff = th["effective"]
    values = {v["extremal_ratio"] for v in eff.values()}
    if len(values) == 1:
        rows = sorted({v["rows"] for v in eff.values()})
        return (f"; extremal-ratio threshold {number(values.pop())} in every module of this model (rows "
                + " / ".join(map(str, rows)) + ")")
    return "; extremal-ratio threshold per module (rows): " + ", ".join(
        f"{k} {number(v['extremal_ratio'])} ({v['rows']})" for k, v in eff.items())


def report_activations(doc):
    figs, L = doc["figures"], doc["model"]["n_layer"]
    lines = ["## Activation outliers", "",
             "An activation is an outlier when |x| > tau x mean|x| of its (tokens x channels) matrix. "
             "Top-3 and median magnitudes are means over sequences.", ""]
    for label, acc, fig in (("Layer outputs h", doc["activation"]["layer_output"], figs.get("activation_layer_output")),
                            ("Down-projection inputs x_down", doc["activation"]["down_input"],
                             figs.get("activation_down_input"))):
        lines += [f"### {label}", "", f"![{label}]({fig})", ""]
        rows = []
        for l in range(L):
            top = acc["top3"][l]
            chans = ", ".join(f"{c} ({n})" for c, n in acc["channels"][l][:3]) or "–"
            pos = ", ".join(f"{p} ({n})" for p, n in acc["positions"][l][:3]) or "–"
            rows.append([l, number(top[0]), number(top[1]), number(top[2]), number(acc["median"][l]),
                         number(acc["ratio_top1_median"][l]), acc["count"][l], chans, pos])
        lines += [markdown_table(["layer", "top 1", "top 2", "top 3", "median", "top1/median", "# outliers",
                                  "channels (count)", "positions (count)"], rows), ""]
        if acc["outliers_total"] == 0:
            lines += ["No activation outliers at this threshold.", ""]
        else:
            toks = ", ".join(f"{token_code(x['token'])} ({x['count']})" for x in acc["tokens"][:8])
            lines += [f"{acc['outliers_total']} outlier activations in total; carried by tokens: {toks}.", ""]
    if figs.get("outlier_channels"):
        lines += ["### Outlier channels per layer (Figures 3c, 4b-c)", "", f"![outlier channels]({figs['outlier_channels']})", ""]
    if figs.get("surface"):
        lines += [f"### Magnitudes of layer {doc['surface']['layer']} (Figure 1 style)", "", f"![surface]({figs['surface']})", ""]
    return lines


def report_weights(doc):
    figs, L = doc["figures"], doc["model"]["n_layer"]
    lines = ["## Weight outliers", "",
             f"Outliers: {doc['thresholds']['weight']['definition']} (W in nn.Linear (out, in) layout). "
             "Extremal ratio: max over input columns j of max_i|w_ij| / mean_i|w_ij|.", "",
             f"![weights]({figs.get('weights')})", ""]
    modules = list(doc["weight"])
    rows = [[l] + [f"{number(w['extremal_ratio'][l])} (col {w['extremal_channel'][l]}; {w['outlier_count'][l]} outl.)"
                   for w in (doc["weight"][mod] for mod in modules)] for l in range(L)]
    lines += [markdown_table(["layer"] + [f"{mod}: extremal ratio (column; # outliers)" for mod in modules], rows), ""]
    wd = doc["weight"].get(down_proj_name(doc))
    if wd and wd["top_entries"]:
        score = {"ratio": "|w|/column-mean", "column": "column share |w|/sum|w|",
                 "paper": "|w|/row-mean"}[doc["thresholds"]["weight"]["rule"]]
        lines += [f"Largest {score} entries of {down_proj_name(doc)} (W_down): " + ", ".join(
            f"L{e[0]} out {e[1]} in {e[2]}: {number(e[3])}" for e in wd["top_entries"][:5]) + ".", ""]
    if figs.get("down_proj_weights"):
        lines += ["### Down-projection magnitudes (Figures 5b-c)", "", f"![down projection]({figs['down_proj_weights']})", ""]
    return lines + report_weight_link(doc)


def report_weight_link(doc):
    link, figs = doc["weight_link"], doc["figures"]
    if not link["units"]:
        return []
    lines = ["### Weight-outlier link (Figure 7)", "",
             "MLP units whose output x_down spikes: their up-projection row (L2 norm over the median row; largest "
             "entry) and down-projection (W_down) column (extremal ratio; share and row of its largest entry). The "
             f"figure shows layer {link['profile']['layer'] if link['profile'] else '–'}"
             + (", whose MLP generates the largest massive activation (through units "
                + ", ".join(map(str, link["profile"]["drivers"])) + ")" if link["profile"] and link["profile"].get("drivers")
                else ", the layer with the most x_down spikes") + ".", ""]
    if figs.get("weight_link"):
        lines += [f"![weight link]({figs['weight_link']})", ""]
    gated = any("gate_row_norm_ratio" in u for u in link["units"])  # SwiGLU: also the gate projection
    rows = [[u["layer"], u["unit"], u["spikes"], number(u["fc_row_norm_ratio"]),
             f"{u['fc_top_input']} ({number(u['fc_top_weight'])})"]
            + ([number(u.get("gate_row_norm_ratio")), f"{u.get('gate_top_input')} ({number(u.get('gate_top_weight'))})"]
               if gated else [])
            + [number(u["down_extremal_ratio"]), f"{percent(u['down_top_share'])} (row {u['down_top_output']})"]
            for u in link["units"]]
    return lines + [markdown_table(["layer", "unit", "x_down outliers", "up row norm / median", "up top input (w)"]
                                   + (["gate row norm / median", "gate top input (w)"] if gated else [])
                                   + ["W_down col. extremal ratio", "W_down top share (row)"], rows), ""]


def report_attention(doc):
    att, figs, L = doc["attention"], doc["figures"], doc["model"]["n_layer"]
    lines = ["## Attention outliers", "",
             f"Cumulative attention of key j: Ahat_j = sum over queries of A_ij. Outlier: "
             f"{doc['thresholds']['attention']['definition']}. '# outlier keys' counts (sequence, head, key) triples; "
             "'head-avg keys' the outlier keys of the head-averaged score. Top-2 and median are over keys of the "
             "head-averaged score.", "",
             f"![attention]({figs.get('attention')})", "", f"![heads]({figs.get('attention_heads')})", ""]
    header = ["layer", "top 1", "top 2", "median", "# outlier keys", "head-avg keys", "key positions (count)",
              "attn to pos 0", "|v| pos 0", "|v| others", "q.k outlier keys", "q.k other keys"]
    header += ["sink share"] if "sink_share" in att else []
    header += ["gate pos 0", "gate h-outlier tok.", "gate others"] if "gate" in att else []
    lines += [markdown_table(header, [attention_row(att, l) for l in range(L)]), ""]
    if "gate" in att:
        lines += [f"Gate: {att.get('gate_meaning', 'the variant output gate')}; shown at position 0, at tokens "
                  "that carry activation outliers in the layer input, and at the other tokens (mean over heads).", ""]
    qkv = att.get("qkv")
    if qkv and qkv["missing"]:
        recorded = qkv["recorded_layers"]
        lines += [f"q/k/v statistics (|v|, q.k, q/k alignment) are given for {len(recorded)} of {L} layers"
                  + (f" ({layer_ranges(recorded)})" if recorded else "") + "; "
                  + "; ".join(f"layers {layer_ranges(m['layers'])}: {m['reason']}" for m in qkv["missing"]) + ".", ""]
    if att["qk_alignment"]:
        top = sorted(att["qk_alignment"], key=lambda r: -r["n_keys"])[:6]
        lines += ["q/k alignment at attention-outlier keys: mean logit q.k/sqrt(d) they receive, and the dimensions "
                  "contributing most to it: " + "; ".join(
                      f"L{r['layer']}h{r['head']} {number(r['logit'])} ("
                      + ", ".join(f"d{dd} {number(v)}" for dd, v in r["dims"][:2]) + ")" for r in top) + ".", ""]
    if figs.get("attention_outlier_share"):
        lines += ["Share of each head's attention taken by the outlier keys of the head-averaged score (Figure 6c):", "",
                  f"![outlier key share]({figs['attention_outlier_share']})", ""]
    return lines


def attention_row(att, l):
    pos = ", ".join(f"{p} ({n})" for p, n in att["positions"][l][:3]) or "–"
    row = [l, number(att["top2"][l][0]), number(att["top2"][l][1]), number(att["median"][l]),
           sum(att["head_outlier_keys"][l]), att["mean_outlier_count"][l], pos, number(att["first_token_mass"][l]),
           number(att["value_norm"]["first"][l]), number(att["value_norm"]["other"][l]),
           number(att["mean_logit_outlier_keys"][l]), number(att["mean_logit_other_keys"][l])]
    if "sink_share" in att:
        row.append(number(att["sink_share"][l]))
    if "gate" in att:
        row += [number(att["gate"][g][l]) for g in ("first", "h_outlier", "other")]
    return row


def report_token_categories(doc):
    from analysis.definitions import CATEGORIES
    act, att = doc["activation"], doc["attention"]
    rows = [[label] + [c[k] for k in CATEGORIES] for label, c in (
        ("h outliers", act["layer_output"]["token_categories"]), ("x_down outliers", act["down_input"]["token_categories"]),
        ("attention-outlier keys", att["token_categories"]))]
    return ["## Token categories", "", f"![categories]({doc['figures'].get('token_categories')})", "",
            markdown_table(["outlier type"] + list(CATEGORIES), rows),
            "", "Counts of (sequence, layer, position) triples that carry at least one outlier.", ""]


def report_consistency(doc):
    c = doc["consistency"]
    rows = [[name, percent(v["a_in_b"]), percent(v["b_in_a"]), v["n_a"], v["n_b"], v["definition"]]
            for name, v in c.items()]
    ha = c["h_vs_attention"]
    by_layer = [[l, percent(v["a_in_b"]), percent(v["b_in_a"]), v["n_a"], v["n_b"]] for l, v in enumerate(ha["by_layer"])]
    return ["## Consistency (Table 1)", "",
            "Overlap |A∩B|/|A| of the sets below, in both directions (definitions in `outliers.json` and "
            "`analysis/definitions.py`).", "",
            markdown_table(["pair", "A in B", "B in A", "n A", "n B", "sets"], rows), "",
            "Row 4 (h vs attention, Appendix B.2) per layer: the overall value averages over the (sample, layer, head) "
            f"triples of layers {layer_ranges(ha['layers'])} (those whose output h_l has activation outliers).", "",
            markdown_table(["layer", "A in B", "B in A", "n A", "n B"], by_layer), ""]


def report_lifecycle(doc):
    figs = doc["figures"]
    lines = ["## Lifecycle of massive activations", ""]
    if not doc["lifecycle"]:
        return lines + ["No massive activations at this threshold.", ""]
    lines += ["Each (position, channel) that is an activation outlier of some layer output, followed by its **value** "
              "along the layers (never by the threshold, which grows with depth while the value stays), over the "
              "sequences where it is massive; a stage is listed where it holds in at least half of them. Peak: the "
              "largest |h| along the layers (mean over those sequences). **Generated** at every layer (up to the peak) whose attention or MLP branch adds at least "
              "25% of the peak (share in parentheses); **emerged** where no branch does (the first layer at half the "
              "peak); **propagated** while the residual stream carries it; **cancelled** at the layers after the peak "
              "whose branch removes at least 25% of it, once the value falls below half of it. **Early stage**: "
              "before the generation, the value is already at least 100x the median |h| of its layer (Sun et al. "
              "call |x| > 100 and ~1000x the median massive); its writers add 25% of that stage's peak. Drivers: the "
              "down-projection inputs k whose products w[c, k] x_down[k] make up the generating MLP output.", ""]
    if figs.get("lifecycle"):
        lines += [f"![lifecycle]({figs['lifecycle']})", ""]
    lines += [markdown_table(["position", "tokens", "channel", "sequences", "peak |h| (layer)", "massive from",
                              "early stage (x median; written at)", "generated at (share)", "propagated in",
                              "cancelled at (share removed)", "down-projection inputs driving it (share)"],
                             [lifecycle_row(e) for e in doc["lifecycle"][:10]]), ""]
    if len(doc["lifecycle"]) > 10:
        lines += [f"{len(doc['lifecycle']) - 10} more in `outliers.json`.", ""]
    early = [(e, w) for e in doc["lifecycle"][:10] if e.get("early_stage") for w in e["early_stage"]["writers"]
             if w.get("drivers")]
    if early:
        lines += ["Early-stage writers' down-projection inputs: " + "; ".join(
            f"position {e['position']} channel {e['channel']}, layer {w['layer']}: " + drivers_text(w["drivers"])
            for e, w in early) + ".", ""]
    if figs.get("lifecycle_cancellation"):
        lines += ["Branch outputs and the value as a share of the peak (Figures 8-9 in values; a cancellation is a "
                  "bar down to where the line falls):", "", f"![cancellation]({figs['lifecycle_cancellation']})", ""]
    rows = [[e["position"], e["channel"], c["layer"], c["branch"], number(c["previous"]), number(c["branch_output"]),
             percent(c["share"]), "yes" if c["opposite_sign"] else "no"] for e in doc["lifecycle"] for c in e["cancellation"]]
    if rows:
        lines += [markdown_table(["position", "channel", "cancelled at", "by", "h before", "branch output",
                                  "share of the peak removed", "opposite sign"], rows), ""]
    return lines


def drivers_text(drivers):
    """'1229 (73.2%), 1487 (26.4%)' (with the SwiGLU gate and up values where recorded)."""
    return ", ".join(f"{d['down_input_channel']} ({percent(d['share'])}"
                     + (f"; gate {number(d['gate'])}, up {number(d['up'])}" if "gate" in d else "") + ")"
                     for d in drivers) or "–"


def lifecycle_row(e):
    prop = [l for l, s in enumerate(e["status"]) if s == "propagated"]
    early = e.get("early_stage")
    early_text = (f"{layer_ranges(early['layers'])} ({number(early['peak_over_median'])}x; "
                  + (", ".join(f"L{w['layer']} {w['branch']}" for w in early["writers"]) or "–") + ")") if early else "–"
    gen = ", ".join(f"{w['layer']} {w['branch']} ({percent(w['share'])})" for w in e["generation"])
    if not gen:
        gen = f"– (emerged at {e['emerged_at']})" if e.get("emerged_at") is not None else "–"
    cancel = ", ".join(f"{c['layer']} {c['branch']} ({percent(c['share'])})" for c in e["cancellation"]) or "–"
    tokens = token_code(e["token"]) if e.get("distinct_tokens", 1) <= 1 else f"{e['distinct_tokens']} different"
    return [e["position"], tokens, e["channel"], e["count"], f"{number(e['peak'])} ({e['peak_layer']})",
            e["first_massive_at"], early_text, gen, layer_ranges(prop), cancel, drivers_text(e["mlp_drivers"])]


def listed(items, n=5):
    """The first n items, comma-separated, and '… (+k more)' when some are left out ('–' when none)."""
    items = list(items)
    text = ", ".join(map(str, items[:n])) or "–"
    return text + (f", … (+{len(items) - n} more)" if len(items) > n else "")


def report_normalization(doc):
    rows = []
    for n in doc["normalization"]:
        top = n["top"][0]
        rows.append([n["module"], len(n["outlier_channels"]), listed(n["outlier_channels"]), listed(n["gamma_driven"]),
                     top["channel"], number(top["ratio"]), number(top["gamma"]), number(top["ratio_before_gamma"])])
    return ["## Normalization (channel-wise outliers)", "",
            f"Channels whose mean |LayerNorm output| over tokens exceeds tau_channel "
            f"({number(doc['tau_by_type']['channel'])}) x the median "
            "channel, largest first; 'before gamma' divides out the LayerNorm gain (a ratio near 1 there means the "
            "outlier comes from gamma's rescaling). 'gamma-driven': outlier channels whose ratio before gamma is at "
            "most tau_channel (gamma alone makes them outliers).", "",
            markdown_table(["LayerNorm", "# outlier channels", "channels", "gamma-driven", "top channel", "ratio",
                            "gamma", "ratio before gamma"], rows), ""]


def report_intervention(doc):
    iv = doc.get("intervention")
    if not iv:
        return []
    rows = ([["none", "", number(iv["loss"], 5), number(iv["perplexity"], 5), ""]]
            + [[k, v["activations_changed"], number(v["loss_intervened"], 5), number(v["perplexity_intervened"], 5),
                number(v["loss_change"], 4)] for k, v in iv["targets"].items()]
            + [["gamma", iv["gamma"]["count"], number(iv["gamma"]["loss_intervened"], 5),
                number(iv["gamma"]["perplexity_intervened"], 5), number(iv["gamma"]["loss_change"], 4)]])
    return ["## Intervention", "",
            f"Massive activations set to **{iv['mode']}**"
            + (" (the mean of the values the target edits at that layer and channel)" if iv["mode"] == "mean" else "")
            + ": at their generation layers (generated; each layer of a value written in several steps), only where "
            "the residual stream carries them (propagated), or both (all); the layers are those of the clean "
            "forward's lifecycle. And the LayerNorm channels whose outlier comes from gamma alone set to the "
            "median gamma (gamma). The loss without is the analysis' own; each intervened forward replays it (the "
            "same attention path) from the first edited layer.", "",
            markdown_table(["intervention", "activations / channels changed", "loss", "perplexity", "loss change"],
                           rows), ""]


def report_footer(doc):
    tm, meta = doc["timing"], doc["meta"]
    return ["---", f"Analysis {tm.get('analysis_s', 0):.1f} s"
            + (f", intervention {tm['intervention_s']:.1f} s" if "intervention_s" in tm else "")
            + f"; `{meta['command']}` at {meta['date']} (commit {meta['git_commit']}, {meta['gpu']}).", ""]


def _write_json(path, obj):
    import json

    from runtime.files import _json_default
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# compare (Figure 11)

def fig_loss_curves(out_dir, runs, name="compare_loss.png"):
    """Figure 12: training and validation loss of the compared runs (those with a log.jsonl)."""
    return plot_loss_curves(out_dir, name, [(r["label"], r["loss_curve"]) for r in runs])


def run_compare(args, device, dtype):
    import torch

    from analysis.statistics import OutlierAnalyzer
    runs = []
    seqs, data_info = None, None
    for path in args.compare:
        model, info = model_and_info(args, path, device)
        token_info, encode = model_tokenization(model, args)
        if seqs is None:  # text: the first model's tokenizer; check_vocab refuses ids another model lacks
            seqs, data_info = load_sequences(args, model.config.block_size, encode)
        check_vocab(seqs, model.config.vocab_size, data_info["source"])
        if seqs.shape[1] - 1 > model.config.block_size:
            raise UserError(f"{path} has block size {model.config.block_size}, below the seq_len {seqs.shape[1] - 1} "
                            f"used for {args.compare[0]}; pass --seq_len {model.config.block_size}")
        check_forward(model, seqs, path, device, dtype)
        an = OutlierAnalyzer(model, tau_act=args.tau_activation, token_info=token_info, seq_len=seqs.shape[1] - 1,
                             full=False, max_list=args.max_list)
        bs = args.batch_size or (8 if device.startswith("cuda") else 1)
        with progress(len(seqs), args.no_progress, os.path.basename(os.path.dirname(os.path.abspath(path))) or path) as bar:
            for X, _ in batches(seqs, bs, device):
                an.run_batch(X, autocast=autocast_context(device, dtype))
                bar.update(X.shape[0])
        r = an.result()["layer_output"]
        kind = info["attention"] if info["family"] == "outlier-gpt" else info["family"]
        runs.append({"model": info, "label": f"{kind} ({os.path.relpath(path)})",
                     "top3": r["top3"], "median": r["median"], "count": r["count"],
                     "loss_curve": loss_curve(read_training_log(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                             "log.jsonl")))})
        del model, an
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    with output_set(args.out, *output_kind(args), inputs=input_paths(args)) as tmp:
        fig_name = plot_top1(tmp, "compare_top1.png", [(r["label"], r["top3"]) for r in runs])
        fig3 = plot_top3(tmp, "compare_top3.png", [(r["model"]["attention"], r["top3"], r["median"]) for r in runs])
        fig_loss = fig_loss_curves(tmp, runs) if any(r["loss_curve"] for r in runs) else None
        doc = {"format": FORMAT + "-compare", "version": FORMAT_VERSION, "data": data_info,
               "tau": args.tau_activation, "runs": runs, "meta": run_metadata(device),
               "figures": {"top1": fig_name, "top3": fig3, **({"loss": fig_loss} if fig_loss else {})}}
        _write_json(os.path.join(tmp, "compare.json"), doc)
        L = max(len(r["top3"]) for r in runs)
        rows = [[r["label"]] + [number(r["top3"][l][0]) if l < len(r["top3"]) else "" for l in range(L)]
                + [number(max(t[0] for t in r["top3"]))] for r in runs]
        lines = ["# Top activation per layer across checkpoints (Figure 11)", "",
                 f"Data: `{data_info['source']}`, {data_info['num_seqs']} x {data_info['seq_len']} tokens. "
                 f"Values: largest |h| of each layer's output, mean over sequences.", "",
                 f"![top-1]({fig_name})", "", f"![top-3]({fig3})", "",
                 *([f"![loss curves]({fig_loss})", ""] if fig_loss else ["No log.jsonl beside the checkpoints: no loss curves.", ""]),
                 markdown_table(["checkpoint"] + [f"L{l}" for l in range(L)] + ["max"], rows), ""]
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    print(f"wrote {args.out}/report.md")
    return 0


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    import torch

    import attention_variants
    attention_variants.load_variant_file(args.variants_file)
    device = args.device_resolved = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.compare:
        return run_compare(args, device, dtype)
    t_load = time.time()
    model, model_info = model_and_info(args, args.ckpt, device)
    token_info, encode = model_tokenization(model, args)
    if args.surface_layer is not None and not 0 <= args.surface_layer < model.config.n_layer:
        raise UserError(f"--surface_layer {args.surface_layer} is outside 0..{model.config.n_layer - 1}")
    seqs, data_info = load_sequences(args, model.config.block_size, encode)
    check_vocab(seqs, model.config.vocab_size, data_info["source"])
    check_forward(model, seqs, model_info["source"], device, dtype)
    load_s = time.time() - t_load
    t0 = time.time()
    an, res, timing = analyse(args, model, seqs, device, dtype, token_info)
    doc = build_json(args, model_info, data_info, an, res, timing)
    top1 = [t[0] for t in doc["activation"]["layer_output"]["top3"]]
    bad = next((l for l, v in enumerate(top1) if not math.isfinite(v)), None)
    if bad is not None:  # a later sequence overflowed: no report of NaN
        from training.checkpoint import overflow_error
        raise overflow_error(model_info["source"], model, f"top-1 |h| of layer {bad} is {top1[bad]}", dtype)
    layer = args.surface_layer if args.surface_layer is not None else int(np.argmax(top1))
    doc["surface"] = {"layer": layer, "tokens": [token_info.text(t) for t in an.surface_tokens_ids]}
    with output_set(args.out, *output_kind(args), inputs=input_paths(args)) as tmp:
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
