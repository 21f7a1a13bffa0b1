"""Where models are trained: recipes, MONAI transforms and engines, statistics, model cards."""
