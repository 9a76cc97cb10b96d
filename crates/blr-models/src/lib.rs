//! Transformer models (Llama, GPT-2, ViT, DiT) written once over a backend trait; GGUF and safetensors loading; tokenizer.
