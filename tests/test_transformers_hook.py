"""`import curkernels` leaves transformers unimported, and transformers' own loading still finds
curkernels' quantizer, whichever of the two a program imports first."""

import subprocess
import sys

import pytest

REGISTERED = ("from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
              "print('curkernels' in AUTO_QUANTIZER_MAPPING)")


@pytest.mark.parametrize("imports", [
    "import sys, curkernels; assert 'transformers' not in sys.modules; import transformers",
    "import transformers, curkernels",
    "import curkernels; from transformers import AutoModelForCausalLM",
    # a curkernels module that imports transformers first: the integration it triggers must
    # not import that module back while it is half initialised
    "import curkernels.checkpoint.model_reference",
])
def test_transformers_finds_the_quantizer_after_either_import_order(imports):
    result = subprocess.run([sys.executable, "-c", f"{imports}; {REGISTERED}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
