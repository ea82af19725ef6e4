"""Integrations with serving engines (vLLM: `curkernels.integrations.vllm`, loaded by its plugin
entry point; importing this package imports no engine)."""
