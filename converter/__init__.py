"""converter: turn a Hugging Face or GGUF model into a NanoQuant `.nq` file (torch, CPU)."""
