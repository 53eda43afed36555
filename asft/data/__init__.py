"""Data layer: canonical interaction table, loaders, preprocessing."""
