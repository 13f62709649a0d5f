"""The model zoo: a decoder-only transformer with a dense or mixture-of-experts FFN.

Public names: :class:`TransformerConfig`, :func:`build_model`, :func:`count_params`,
:func:`flops_per_token`.
"""

from workloads.models.accounting import count_params, flops_per_token
from workloads.models.config import TransformerConfig
from workloads.models.transformer import Transformer, build_model

__all__ = ["Transformer", "TransformerConfig", "build_model", "count_params", "flops_per_token"]
