"""DeepSeek-OCR and DeepSeek-OCR 2 model code, loadable as Hugging Face remote code from a folder that
holds either model's weights beside these files (`AutoModel.from_pretrained(folder, trust_remote_code=True)`:
the folder's config.json names the model) or imported directly."""

from .configuration_deepseek_v2 import DeepseekV2Config
from .modeling_deepseekocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, DeepseekOCRModel
from .modeling_deepseekocr2 import DeepseekOCR2Config, DeepseekOCR2ForCausalLM, DeepseekOCR2Model
from .modeling_deepseekv2 import DeepseekV2Model

__all__ = [
    "DeepseekOCR2Config",
    "DeepseekOCR2ForCausalLM",
    "DeepseekOCR2Model",
    "DeepseekOCRConfig",
    "DeepseekOCRForCausalLM",
    "DeepseekOCRModel",
    "DeepseekV2Config",
    "DeepseekV2Model",
]
