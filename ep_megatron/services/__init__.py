"""Services that act on a model's MoE layers: rebalancing and layout-free checkpoints."""
