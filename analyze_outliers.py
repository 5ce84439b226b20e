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

This file is the command line: arguments, inputs, running the analyzer (analysis/analyzer.py) and the
interventions, --compare, writing the outputs. The statistics, their report sections and figures live in
analysis/statistics/, the report's assembly in analysis/report.py.
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
from runtime.reports import (loss_curve, markdown_table, number, plot_loss_curves, plot_top1, plot_top3,
                             read_training_log)
from runtime.system import autocast_context, check_fits, resolve_device, resolve_dtype, run_metadata
from runtime.token_data import check_vocab, input_tokens, read_text_file

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


# what --compare may write into --out (runtime.outputs.output_set replaces only these, and only its own; an
# analysis writes analysis.report.output_files(): report.md, outliers.json and its statistics' figures)
COMPARE_FILES = ("report.md", "compare.json", "compare_top1.png", "compare_top3.png", "compare_loss.png")


def output_kind(args):
    """(tool name in the output manifest, the files it may write)."""
    if args.compare:
        return "analyze_outliers.py --compare", COMPARE_FILES
    from analysis.report import output_files
    return "analyze_outliers.py", output_files()


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
    """-> (the OutlierAnalyzer after every sequence, its results, the interventions' (or None), timings)."""
    from analysis.analyzer import OutlierAnalyzer
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
    intervention = None
    if args.intervene != "none":
        t0 = time.time()
        intervention = intervene(args, model, an, device, dtype, result["normalization"])
        timing["intervention_s"] = time.time() - t0
    return an, result, intervention, timing


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
    lifecycle = an.statistics["lifecycle"]
    means = {target: lifecycle.means(target) for target in INTERVENTION_TARGETS} if args.intervene == "mean" else {}
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


def build_json(args, model_info, data_info, an, res, intervention, timing):
    """outliers.json: the model and data, the thresholds, each statistic's result under its name, the
    interventions; `surface` and `figures` are filled in later."""
    from analysis.report import FORMAT, FORMAT_VERSION
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": model_info,
        "data": data_info,
        "tau": args.tau,
        "tau_by_type": {"activation": args.tau_activation, "weight": args.tau_weight,
                        "attention": args.tau_attention, "channel": args.tau_channel},
        "thresholds": an.thresholds(res),
        **res,
        "intervention": intervention,
        "surface": {"layer": None, "tokens": None},
        "timing": timing,
        "meta": run_metadata(args.device_resolved),
    }


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

    from analysis.analyzer import OutlierAnalyzer
    from analysis.report import FORMAT, FORMAT_VERSION
    from analysis.statistics.activation import layer_outputs_only
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
                             max_list=args.max_list, statistics=[layer_outputs_only])
        bs = args.batch_size or (8 if device.startswith("cuda") else 1)
        with progress(len(seqs), args.no_progress, os.path.basename(os.path.dirname(os.path.abspath(path))) or path) as bar:
            for X, _ in batches(seqs, bs, device):
                an.run_batch(X, autocast=autocast_context(device, dtype))
                bar.update(X.shape[0])
        r = an.result()["activation"]["layer_output"]
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
    an, res, intervention, timing = analyse(args, model, seqs, device, dtype, token_info)
    doc = build_json(args, model_info, data_info, an, res, intervention, timing)
    top1 = [t[0] for t in doc["activation"]["layer_output"]["top3"]]
    bad = next((l for l, v in enumerate(top1) if not math.isfinite(v)), None)
    if bad is not None:  # a later sequence overflowed: no report of NaN
        from training.checkpoint import overflow_error
        raise overflow_error(model_info["source"], model, f"top-1 |h| of layer {bad} is {top1[bad]}", dtype)
    layer = args.surface_layer if args.surface_layer is not None else int(np.argmax(top1))
    doc["surface"] = {"layer": layer,
                      "tokens": [token_info.text(t) for t in an.statistics["activation"].surface_tokens]}
    from analysis.report import draw_figures, write_report
    with output_set(args.out, *output_kind(args), inputs=input_paths(args)) as tmp:
        t_fig = time.time()
        doc["figures"] = draw_figures(tmp, doc, an.statistics)
        timing["figures_s"] = time.time() - t_fig
        timing["load_s"] = load_s
        timing["total_s"] = time.time() - t0  # model load excluded
        write_report(tmp, doc)
        _write_json(os.path.join(tmp, "outliers.json"), doc)
    h = doc["activation"]["layer_output"]
    name = model_info["attention"] if model_info["family"] == "outlier-gpt" else model_info["family"]
    print(f"{name}: max top-1 |h| {max(top1):.4g} (layer {int(np.argmax(top1))}), "
          f"{h['outliers_total']} activation outliers, {doc['attention']['outlier_keys_total']} attention-outlier keys; "
          f"wrote {args.out}/report.md in {timing['total_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main)
