"""`protege ui`: the web dashboard over the store (traces, datasets, runs, the decision,
deployments and the review queue). Server-rendered, every asset served by protege itself."""
