"""Everything a person or dashboard reads, rendered from one verdict dict."""
