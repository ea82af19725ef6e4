"""Generate text with a compressed checkpoint (or any model), streaming it to the terminal.

    python python/generate.py CHECKPOINT "Once upon a time" --max-new-tokens 64
    python python/generate.py CHECKPOINT "Once upon a time" --compile --dtype bfloat16
    python python/generate.py DENSE_MODEL "Once upon a time" --draft DRAFT --num-draft-tokens 4

CHECKPOINT is a folder written by `curkernels.save_compressed` (or `curkernels compress`) that
holds the tokenizer, or pass --tokenizer; a dense transformers folder, a GGUF file or the
bundled name `smollm2` works too. --compile compiles the decode step into one graph (CUDA
graphs on a GPU): the first tokens wait for compilation, the rest run much faster. --draft
decodes speculatively with a draft saved by `curkernels.save_draft`: the model is then the
dense model the draft was cut from, and the output is that model's own, produced in fewer of
its forwards. This is `curkernels generate` as a program of its own (`--help` lists the rest).
"""

from curkernels.cli import generate, run_program

if __name__ == "__main__":
    run_program(generate)
