"""Model building blocks: norms, rotary embeddings, linears, paged attention (sampling: sample/)."""
