"""A model over torchrun's ranks, for inference: split by heads (tensor parallelism) or by layers (a
pipeline), each rank reading only its part of a GGUF file."""
