"""Keep plain transformers (curkernels not imported) from loading a checkpoint as a model with
random layers: a config.json entry it refuses, and a README.md saying how to load the folder.

transformers skips a `quantization_config` whose method it does not know, with a warning, and
fills the factored layers' missing `weight`s with random values. What it does refuse is a
`transformers_weights` entry (the weights file to load) that names no safetensors file: it
raises a ValueError quoting the entry, so the entry says what to do. With curkernels imported,
its quantizer drops the entry before transformers looks for the weights (transformers 5), and
`load_compressed` overrides it (every version).
"""

import json
from pathlib import Path

from transformers.utils import CONFIG_NAME

GUARD_FIELD = "transformers_weights"
GUARD = ("this is a curkernels checkpoint: `import curkernels` before from_pretrained "
         "(transformers >= 5), or load it with curkernels.load_compressed(folder); see the "
         "folder's README.md")
README_NAME = "README.md"
README = """# A curkernels checkpoint

This folder holds a transformers model compressed with curkernels (`pip install curkernels`):
some of its Linear layers are stored as factors (`CURLinear`), listed in `config.json` under `compression_config`.
Load it with curkernels installed and imported:

```python
import curkernels as ck
model = ck.load_compressed("path/to/this/folder")

# or, with transformers >= 5, once curkernels is imported:
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

Plain transformers, without `import curkernels`, cannot build the factored layers: it refuses
this folder (config.json's `transformers_weights` entry says why) instead of loading a model
whose factored layers are random.
"""


def mark_checkpoint(folder: str | Path) -> None:
    """Add the guard to `folder`'s config.json (transformers' save_pretrained drops the field
    on saving) and write the README.md."""
    path = Path(folder) / CONFIG_NAME
    config = json.loads(path.read_text())
    config[GUARD_FIELD] = GUARD
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (Path(folder) / README_NAME).write_text(README)


def drop_guard(config) -> None:
    """Remove the guard from a loaded config, so transformers looks for the usual weights."""
    if getattr(config, GUARD_FIELD, None) == GUARD:
        delattr(config, GUARD_FIELD)
