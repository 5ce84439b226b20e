"""An attention variant defined outside attention_variants.py and registered at run time: the file that
reproduce.py --variants_file runs, and passes on to every stage (train.py's variants_file key, analyze_outliers.py's
and compress_eval.py's --variants_file). Half of default attention: a step on the output, which every backend runs
after default attention (no kernel change)."""

import attention_variants

HALF_ATTENTION = attention_variants.output_step_variant(
    "half_attention", "0.5 · softmax(QKᵀ/√d) V", "tests/runtime_variant.py (registered at run time)",
    step=lambda y: 0.5 * y)
attention_variants.register(HALF_ATTENTION)
