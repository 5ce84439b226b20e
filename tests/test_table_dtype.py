"""compress_eval's precision for the paper's Table 3, whose first column is "PPL (FP16)"."""

import torch

import compress_eval


def test_auto_is_fp16_on_gpu_and_fp32_on_cpu_and_the_column_says_so():
    assert compress_eval.table_dtype("auto", "cuda") is torch.float16
    assert compress_eval.table_dtype("auto", "cuda:1") is torch.float16
    assert compress_eval.table_dtype("auto", "cpu") is torch.float32
    assert compress_eval.table_dtype("bfloat16", "cuda") is torch.bfloat16  # asked for explicitly
    assert compress_eval.DTYPE_LABELS[compress_eval.table_dtype("auto", "cuda")] == "FP16"
