"""kvpool's adapters to MLX's Python libraries: ``kvpool.mlx.mlx_lm`` is the only module of
kvpool that imports mlx-lm. Importing this package imports neither."""
