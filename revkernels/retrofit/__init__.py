"""Retrofit pre-trained residual models into reversible ones (paper section 4).

    student = retrofit(model, a=0.5, iterations=1)      # same call signature and outputs
    kl = retrofit_kl(student_logits, teacher_logits)    # eq. 4.6
    log = align(student, teacher, batches, steps=100)   # KL fine-tuning, tqdm bar, KL log

`python -m revkernels.retrofit --model DIR --out DIR ...` runs the alignment from the command line.
"""
from .align import align, evaluate_kl, model_logits, retrofit_kl
from .core import (RetrofitBlock, RetrofitStack, block_calls, find_retrofit_stack, retrofit, retrofit_stack,
                   unretrofit)

__all__ = ["retrofit", "retrofit_kl", "align", "evaluate_kl", "model_logits", "RetrofitBlock", "RetrofitStack",
           "block_calls", "find_retrofit_stack", "retrofit_stack", "unretrofit"]
