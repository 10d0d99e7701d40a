"""LongVQ: linear-time exact VQ-attention long-sequence models for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_longvq import LongVQConfig
from .modeling_longvq import (
    LongVQCache,
    LongVQForCausalLM,
    LongVQForSequenceClassification,
    LongVQModel,
    LongVQPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(LongVQConfig.model_type, LongVQConfig, exist_ok=True)
AutoModel.register(LongVQConfig, LongVQModel, exist_ok=True)
AutoModelForCausalLM.register(LongVQConfig, LongVQForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LongVQConfig, LongVQForSequenceClassification, exist_ok=True)

__all__ = [
    "LongVQCache",
    "LongVQConfig",
    "LongVQPreTrainedModel",
    "LongVQModel",
    "LongVQForCausalLM",
    "LongVQForSequenceClassification",
]
