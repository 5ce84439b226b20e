"""The fused kernel's flags as data: which attention core one call of ``fused_attention`` runs.

Imports neither torch nor triton, so the attention-variant registry (attention_variants.py) holds a
`KernelFlags` in every entry without importing the kernels; the register/spill check
(benchmarks/kernel_registers.py) and the README's variant table derive from those entries.
"""

from dataclasses import dataclass, fields
from typing import Optional

SINKS = (None, "learned", "context", "zero")


@dataclass(frozen=True)
class KernelFlags:
    """The flag keywords of ``fused_attention``; per head, s the score scale, S = Q K^T s (causal):

    sink      None       softmax(S) V
              "learned"  softmax over [q.k' s ; S] with values [v' ; V] (needs k_bias, v_bias)
              "context"  softmax(S) V + sigmoid(q.k' s - lse(S)) v' (needs k_bias, v_bias)
              "zero"     a column of logit 0 and value 0 in the softmax (softmax off by one)
    sigmoid   sigmoid(S + b) V, no normalisation; no sink
    """
    sink: Optional[str] = None
    sigmoid: bool = False

    def __post_init__(self):
        if self.sink not in SINKS:
            raise ValueError(f"fused_attention: unknown sink {self.sink!r}; expected one of {SINKS}")
        if self.sigmoid and self.sink is not None:
            raise ValueError("fused_attention: sigmoid attention has no softmax for a sink to join")
        # built once (the flags are frozen): AttentionVariant.triton passes them on every attention call
        object.__setattr__(self, "_kwargs", {f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def sink_params(self) -> bool:
        """True when the core reads a sink key / value (k_bias, v_bias) and has their gradients."""
        return self.sink in ("learned", "context")

    def kwargs(self) -> dict:
        """As keyword arguments of ``fused_attention``."""
        return dict(self._kwargs)

    def describe(self) -> str:
        """In words (the README's "fused kernel" column): the flags that differ from the default kernel."""
        changed = [f"`{f.name}={getattr(self, f.name)!r}`" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return "flag " + ", ".join(changed) if changed else "default kernel"

    def switches(self) -> dict:
        """The kernels' ``tl.constexpr`` switches by name; each kernel takes the ones among its parameters."""
        return {
            "SIGMOID": bool(self.sigmoid),                     # sigmoid(S + b) instead of softmax
            "LEARNED_SINK": self.sink == "learned",            # k'/v' column inside the softmax
            "CONTEXT_SINK": self.sink == "context",            # k'/v' term beside the softmax
            "ZERO_SINK": self.sink == "zero",                  # logit-0, value-0 column inside the softmax
            "SINK_PARAMS": self.sink_params,                   # reads k'/v' (and has their gradients)
        }


SWITCHES = tuple(KernelFlags().switches())  # every switch name (part of the autotuning key)
