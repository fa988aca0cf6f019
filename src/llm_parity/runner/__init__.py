"""Running the engines: model resolution, tokenization, the precision and performance
runs, golden stores, stand-in checkpoints."""
