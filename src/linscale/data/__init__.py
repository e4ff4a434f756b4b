"""Training data: token shards and their preprocessing, image folders."""
