"""Retrofit pre-trained residual models into reversible ones (paper section 4).

    student = retrofit(model, a=0.5, iterations=1)      # same call signature and outputs
    kl = retrofit_kl(student_logits, teacher_logits)    # eq. 4.6
    log = align(student, teacher, batches, steps=100)   # KL fine-tuning, tqdm bar, KL log
    student.save_pretrained(d); from_pretrained(d)      # Hugging Face models: the same student back

`python -m revkernels.retrofit --model DIR --out DIR ...` runs the alignment from the command line.
"""
from .align import align, evaluate_kl, model_logits, retrofit_kl
from .core import (RetrofitBlock, RetrofitStack, block_calls, find_retrofit_stack, retrofit, retrofit_stack,
                   unretrofit)
from .hf_checkpoint import from_pretrained

# `import revkernels` binds `revkernels.retrofit` to the function above, not to this package, so the
# documented spelling `revkernels.retrofit.from_pretrained(d)` reads an attribute of the function.
retrofit.from_pretrained = from_pretrained

__all__ = ["retrofit", "retrofit_kl", "align", "evaluate_kl", "model_logits", "RetrofitBlock", "RetrofitStack",
           "block_calls", "find_retrofit_stack", "retrofit_stack", "unretrofit", "from_pretrained"]
