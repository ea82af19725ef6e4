"""Load a dense transformers model (and its tokenizer) by folder or hub name."""

import torch
import transformers


def model_class_for(config) -> type:
    """The class config.json names (e.g. LlamaForCausalLM, BertModel), else AutoModel."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_dense_model(name_or_path: str, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer or None when the folder ships none)."""
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "compression_config", None):
        raise ValueError(f"{name_or_path} is already a curkernels checkpoint: load it with "
                         f"curkernels.load_compressed")
    model = model_class_for(config).from_pretrained(
        name_or_path, dtype=dtype if dtype is not None else "auto").to(device).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
