"""Model building blocks, one kind of op per module; tensor-parallel ones shard themselves and
declare how each parameter is loaded (``param.weight_loader``)."""
