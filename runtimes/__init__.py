"""Model runtimes: GGUF reading and sharding, and the engines that run layer ranges
(onnxruntime, tinygrad, llama.cpp for whole models, and a deterministic fake)."""
