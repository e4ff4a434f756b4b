"""Language-model data: tokenizers, memory-mapped token shards and the training data path."""
