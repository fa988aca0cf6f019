"""What only tests and benchmarks use: the catalogue of broken ports, the layout check."""
