"""DeepSeek-OCR model code, loadable as Hugging Face remote code from this folder
(`AutoModel.from_pretrained("checkpoints", trust_remote_code=True)`) or imported directly."""

from .configuration_deepseek_v2 import DeepseekV2Config
from .modeling_deepseekocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, DeepseekOCRModel
from .modeling_deepseekv2 import DeepseekV2Model

__all__ = [
    "DeepseekOCRConfig",
    "DeepseekOCRForCausalLM",
    "DeepseekOCRModel",
    "DeepseekV2Config",
    "DeepseekV2Model",
]
